"""What the clients share: each op's argument checks, wire Struct and reply conversion.

Every public command is one function here returning a :data:`Call`, the pair
``(op, convert)``: ``op`` is the protocol Struct to send and ``convert`` turns the OK
reply's ``value`` into the Python result. ``Client``, ``AsyncClient`` and both pipelines
only move frames; they never build an op or interpret a value themselves, so a command
behaves the same whichever way it is sent. Argument misuse raises ``TypeError`` or
``ValueError`` here, when the command is called (or queued), before anything is sent.

Rules
-----
Rule 1: a reply value of the wrong shape raises ProtocolError, never a stray TypeError.
Rule 2: TTLs are seconds in Python and whole milliseconds on the wire, rounded up, so any
        positive TTL is at least 1 ms.
Rule 3: request ids run 1 .. 2**64-1 and wrap to 1. Id 0 is never used: it is the id a
        server gives an error about a request whose id it could not read.

No I/O and no zmq here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Self

import msgspec

from shardd import protocol
from shardd.errors import ProtocolError, ServerError, SharddError, Timeout, error_for_status
from shardd.hashing import shard_for

DEFAULT_ENDPOINT = "tcp://127.0.0.1:7400"
DEFAULT_TIMEOUT = 1.0  # seconds; a local round trip is ~0.2 ms, so this only trips on trouble

U64 = (1 << 64) - 1
_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
_NO_TTL = -1
_MISSING = -2

Key = bytes | str
Value = bytes | bytearray | memoryview
Items = Mapping[Key, Value] | Iterable[tuple[Key, Value]]
Convert = Callable[[Any], Any]
Call = tuple[protocol.Op, Convert]


def next_id(last: int) -> int:
    """The request id after ``last`` (Rule 3)."""
    return last % U64 + 1


# --- argument checks -------------------------------------------------------------------


def key_bytes(key: object) -> bytes:
    """A key as wire bytes; str keys are UTF-8 encoded."""
    if type(key) is bytes:
        return key
    if isinstance(key, str):
        return key.encode()
    if isinstance(key, bytes):
        return bytes(key)
    raise TypeError(f"key must be bytes or str, not {type(key).__name__}")


def value_bytes(value: object) -> bytes:
    if type(value) is bytes:
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    hint = " (encode it first)" if isinstance(value, str) else ""
    raise TypeError(f"value must be bytes, bytearray or memoryview, not {type(value).__name__}{hint}")


def ttl_ms(ttl: object) -> int:
    """Seconds (int or float, > 0) as whole milliseconds, rounded up (Rule 2)."""
    if type(ttl) is int:
        if ttl <= 0:
            raise ValueError(f"ttl must be > 0 seconds, got {ttl}")
        ms = ttl * 1000
    elif isinstance(ttl, int | float) and not isinstance(ttl, bool):
        if not 0 < ttl < math.inf:  # also rejects NaN
            raise ValueError(f"ttl must be a finite number of seconds > 0, got {ttl}")
        # Allow for float representation error (0.003 * 1000 == 3.0000000000000004), which
        # would otherwise add a whole millisecond; then at least 1 ms.
        ms = max(1, math.ceil(ttl * 1000 - 1e-6))
    else:
        raise TypeError(f"ttl must be an int or float number of seconds, not {type(ttl).__name__}")
    if ms > protocol.MAX_TTL_MS:
        raise ValueError(f"ttl is too large: {ttl} seconds (at most {protocol.MAX_TTL_MS // 1000} s)")
    return ms


def check_timeout(timeout: object) -> float:
    """A client timeout in seconds: a finite number > 0."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    if not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout}")
    return float(timeout)


def _opt_ttl_ms(ttl: object) -> int | None:
    return None if ttl is None else ttl_ms(ttl)


def _int_arg(name: str, value: object) -> int:
    if type(value) is int or (isinstance(value, int) and not isinstance(value, bool)):
        return int(value)
    raise TypeError(f"{name} must be an int, not {type(value).__name__}")


def _key_list(keys: object) -> list[Any]:
    if isinstance(keys, str | bytes | bytearray | memoryview):
        raise TypeError("keys must be an iterable of keys, not a single key")
    return list(keys)  # type: ignore[call-overload]


# --- reply conversions (Rule 1) -------------------------------------------------------


def _bad(what: str, value: Any) -> ProtocolError:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return ProtocolError(f"expected {what} in reply, got {text}")


def _to_bytes_or_none(value: Any) -> bytes | None:
    if value is None or type(value) is bytes:
        return value
    raise _bad("bytes or nil", value)


def _to_bool(value: Any) -> bool:
    if type(value) is bool:
        return value
    raise _bad("a bool", value)


def _to_int(value: Any) -> int:
    if type(value) is int:
        return value
    raise _bad("an int", value)


def _to_ttl(value: Any) -> float | None:
    if type(value) is int:
        if value >= 0:
            return value / 1000
        if value == _NO_TTL:
            return math.inf
        if value == _MISSING:
            return None
    raise _bad("milliseconds, -1 or -2", value)


def _to_versioned(value: Any) -> tuple[bytes, int] | None:
    if value is None:
        return None
    if type(value) is list and len(value) == 2 and type(value[0]) is bytes and type(value[1]) is int:
        return value[0], value[1]
    raise _bad("[value, version] or nil", value)


def _to_cas(value: Any) -> bool | None:
    if value is None or type(value) is bool:
        return value
    raise _bad("a bool or nil", value)


def _to_dict(value: Any) -> dict[Any, Any]:
    if type(value) is dict:
        return value
    raise _bad("a map", value)


# --- commands: arguments -> (op, convert) ----------------------------------------------


def get(key: Key) -> Call:
    return protocol.Get(key_bytes(key)), _to_bytes_or_none


def set(key: Key, value: Value, ttl: float | None = None, nx: bool = False, xx: bool = False) -> Call:
    if nx and xx:
        raise ValueError("nx and xx are mutually exclusive")
    cond = protocol.IF_ABSENT if nx else protocol.IF_PRESENT if xx else protocol.ALWAYS
    return protocol.Set(key_bytes(key), value_bytes(value), _opt_ttl_ms(ttl), cond), _to_bool


def delete(key: Key) -> Call:
    return protocol.Delete(key_bytes(key)), _to_bool


def exists(key: Key) -> Call:
    return protocol.Exists(key_bytes(key)), _to_bool


def expire(key: Key, ttl: float) -> Call:
    return protocol.Expire(key_bytes(key), ttl_ms(ttl)), _to_bool


def ttl(key: Key) -> Call:
    return protocol.Ttl(key_bytes(key)), _to_ttl


def persist(key: Key) -> Call:
    return protocol.Persist(key_bytes(key)), _to_bool


def incr(key: Key, amount: int = 1) -> Call:
    return _incr(key, _int_arg("amount", amount))


def decr(key: Key, amount: int = 1) -> Call:
    return _incr(key, -_int_arg("amount", amount))


def _incr(key: Key, delta: int) -> Call:
    if not _I64_MIN <= delta <= _I64_MAX:
        raise ValueError(f"amount must fit in a signed 64-bit integer, got {abs(delta)}")
    return protocol.Incr(key_bytes(key), delta), _to_int


def gets(key: Key) -> Call:
    return protocol.Gets(key_bytes(key)), _to_versioned


def cas(key: Key, value: Value, version: int, ttl: float | None = None) -> Call:
    version = _int_arg("version", version)
    if not 0 <= version <= U64:
        raise ValueError(f"version must be an unsigned 64-bit integer, got {version}")
    return protocol.Cas(key_bytes(key), value_bytes(value), version, _opt_ttl_ms(ttl)), _to_cas


def get_many(keys: Iterable[Key]) -> Call:
    originals = _key_list(keys)
    wire = [key_bytes(k) for k in originals]

    def convert(values: Any) -> dict[Any, bytes]:
        if type(values) is not list or len(values) != len(originals):
            raise _bad(f"a list of {len(originals)} values", values)
        found = {}
        for key, value in zip(originals, values, strict=True):
            if value is not None:
                if type(value) is not bytes:
                    raise _bad("bytes or nil", value)
                found[key] = value
        return found

    return protocol.GetMany(wire), convert


def set_many(items: Items, ttl: float | None = None) -> Call:
    pairs = items.items() if isinstance(items, Mapping) else items
    wire = []
    for pair in pairs:
        try:
            key, value = pair
        except (TypeError, ValueError):
            raise TypeError(f"set_many wants a mapping or (key, value) pairs, got item {pair!r}") from None
        wire.append((key_bytes(key), value_bytes(value)))
    return protocol.SetMany(wire, _opt_ttl_ms(ttl)), _to_int


def delete_many(keys: Iterable[Key]) -> Call:
    return protocol.DeleteMany([key_bytes(k) for k in _key_list(keys)]), _to_int


def flush() -> Call:
    return protocol.Flush(), _to_int


def ping() -> Call:
    return protocol.Ping(), _to_int


def stats() -> Call:
    return protocol.Stats(), _to_dict


def health(deadline: float = 1.0) -> Call:
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not 0 < deadline <= 60:
        raise ValueError(f"deadline must be a number of seconds in (0, 60], got {deadline!r}")
    return protocol.Health(max(1, math.ceil(deadline * 1000))), _to_dict


def maintenance(on: bool | None = None) -> Call:
    if on is not None and type(on) is not bool:
        raise TypeError(f"on must be True, False or None, got {on!r}")
    return protocol.Maintenance(on), _to_bool


def hotkeys(top: int = 10) -> Call:
    top = _int_arg("top", top)
    if not 1 <= top <= 10_000:
        raise ValueError(f"top must be in [1, 10000], got {top}")
    return protocol.Hotkeys(top), _to_dict


def tune(settings: dict[str, Any]) -> Call:
    unknown = sorted(k for k in settings if k not in protocol.TUNABLE)  # (`set` is the SET op here)
    if unknown or not settings:
        raise ValueError(f"tune accepts {', '.join(protocol.TUNABLE)}; got {', '.join(unknown) or 'nothing'}")
    return protocol.Tune(dict(settings)), _to_int


def topology() -> Call:
    return protocol.Topology(), _to_dict


def resize(shards: int) -> Call:
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= 1024:
        raise ValueError(f"shards must be an int between 1 and 1024, got {shards!r}")
    return protocol.Resize(shards), _to_dict


def resize_start(shards: int) -> Call:
    return protocol.ResizeStart(shards), _to_bool


def drain() -> Call:
    return protocol.Drain(), _to_bool


def snapshot(directory: str) -> Call:
    if not isinstance(directory, str) or not directory:
        raise TypeError("directory must be a non-empty str")
    return protocol.Snapshot(directory), _to_list


def _to_list(value: Any) -> list[Any]:
    if type(value) is list:
        return value
    raise _bad("an array", value)


def configure(settings: dict[str, Any]) -> Call:
    if not isinstance(settings, dict) or not all(isinstance(k, str) for k in settings):
        raise TypeError("settings must be a dict of config keys to values")
    return protocol.Configure(dict(settings)), _to_int


# --- replies -------------------------------------------------------------------------


def decode(frame: bytes) -> protocol.Reply:
    """Decode one reply frame; a frame that is not a Reply raises ProtocolError."""
    try:
        return protocol.decode_reply(frame)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable reply frame ({len(frame)} bytes): {exc}") from None


def server_error(reply: protocol.Reply) -> ServerError:
    value = reply.value
    return error_for_status(reply.status, value if isinstance(value, str) else repr(value))


def result(reply: protocol.Reply, convert: Convert) -> Any:
    """The converted value of ``reply``; an error status raises its ServerError."""
    if reply.status != protocol.OK:
        raise server_error(reply)
    return convert(reply.value)


def outcome(reply: protocol.Reply, convert: Convert) -> Any:
    """Like :func:`result`, but an error is returned instead of raised (for pipelines)."""
    if reply.status != protocol.OK:
        return server_error(reply)
    try:
        return convert(reply.value)
    except ProtocolError as exc:
        return exc


def op_name(op: protocol.Op) -> str:
    return op.__struct_config__.tag  # type: ignore[return-value]


def timeout_error(endpoint: str, timeout: float, op: protocol.Op) -> Timeout:
    return Timeout(f"no reply from {endpoint} within {timeout:g} s to {op_name(op)}")


UNANSWERED: Any = object()
"""Placeholder in a pipeline's result list for a request with no reply yet."""


def finish(results: list[Any], raise_on_error: bool, endpoint: str, timeout: float) -> list[Any]:
    """Pipeline results in call order, a Timeout in each unanswered slot.

    With ``raise_on_error`` the first error in call order is raised instead.
    """
    missing = results.count(UNANSWERED)
    if missing:
        text = (
            f"{missing} of {len(results)} pipelined requests got no reply"
            f" from {endpoint} within {timeout:g} s"
        )
        results = [Timeout(text) if r is UNANSWERED else r for r in results]
    if raise_on_error:
        for item in results:
            if isinstance(item, SharddError):
                raise item
    return results


# --- pipelines -----------------------------------------------------------------------


class PipelineBase:
    """Queues commands for one round of sends; subclasses add ``execute``.

    Each command method checks its arguments at once, queues the request and returns the
    pipeline, so calls chain. Nothing is sent until ``execute``.
    """

    def __init__(self) -> None:
        self._calls: list[Call] = []

    def __len__(self) -> int:
        return len(self._calls)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.reset()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.reset()

    def reset(self) -> None:
        """Drop every queued command without sending it."""
        self._calls = []

    def _take(self) -> list[Call]:
        calls, self._calls = self._calls, []
        return calls

    def _queue(self, call: Call) -> Self:
        self._calls.append(call)
        return self

    def get(self, key: Key) -> Self:
        """Queue get(key)."""
        return self._queue(get(key))

    def set(
        self, key: Key, value: Value, ttl: float | None = None, nx: bool = False, xx: bool = False
    ) -> Self:
        """Queue set(key, value, ttl, nx, xx)."""
        return self._queue(set(key, value, ttl, nx, xx))

    def delete(self, key: Key) -> Self:
        """Queue delete(key)."""
        return self._queue(delete(key))

    def exists(self, key: Key) -> Self:
        """Queue exists(key)."""
        return self._queue(exists(key))

    def expire(self, key: Key, ttl: float) -> Self:
        """Queue expire(key, ttl)."""
        return self._queue(expire(key, ttl))

    def ttl(self, key: Key) -> Self:
        """Queue ttl(key)."""
        return self._queue(ttl(key))

    def persist(self, key: Key) -> Self:
        """Queue persist(key)."""
        return self._queue(persist(key))

    def incr(self, key: Key, amount: int = 1) -> Self:
        """Queue incr(key, amount)."""
        return self._queue(incr(key, amount))

    def decr(self, key: Key, amount: int = 1) -> Self:
        """Queue decr(key, amount)."""
        return self._queue(decr(key, amount))

    def gets(self, key: Key) -> Self:
        """Queue gets(key)."""
        return self._queue(gets(key))

    def cas(self, key: Key, value: Value, version: int, ttl: float | None = None) -> Self:
        """Queue cas(key, value, version, ttl)."""
        return self._queue(cas(key, value, version, ttl))

    def get_many(self, keys: Iterable[Key]) -> Self:
        """Queue get_many(keys)."""
        return self._queue(get_many(keys))

    def set_many(self, items: Items, ttl: float | None = None) -> Self:
        """Queue set_many(items, ttl)."""
        return self._queue(set_many(items, ttl))

    def delete_many(self, keys: Iterable[Key]) -> Self:
        """Queue delete_many(keys)."""
        return self._queue(delete_many(keys))

    def flush(self) -> Self:
        """Queue flush()."""
        return self._queue(flush())

    def ping(self) -> Self:
        """Queue ping()."""
        return self._queue(ping())

    def stats(self) -> Self:
        """Queue stats()."""
        return self._queue(stats())


# --- direct mode: multi-key ops split by the client -------------------------------------

to_dict = _to_dict


Curve = tuple[bytes, bytes, bytes]  # server public key, client public key, client secret key


def load_curve(auth_dir: str, name: str = "admin") -> Curve:
    """The keys a client needs for a daemon with ``auth_dir`` (see ``shardd keys generate``)."""
    import os

    import zmq.auth

    server_public, _ = zmq.auth.load_certificate(os.path.join(auth_dir, "server.key"))
    public, secret = zmq.auth.load_certificate(os.path.join(auth_dir, f"{name}.key_secret"))
    if secret is None:
        raise ValueError(f"{auth_dir}/{name}.key_secret holds no secret key")
    return server_public, public, secret


def secure(sock: Any, curve: Curve | None) -> None:
    """Make ``sock`` a CURVE client of the daemon (before it connects); nothing without keys."""
    if curve is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve


def connect_dealer(ctx: Any, endpoint: str, curve: Curve | None) -> Any:
    """A client DEALER to ``endpoint``: no linger, queue only on a live connection (shardd.client,
    Rule 4), CURVE keys when given. Works for zmq and zmq.asyncio contexts alike."""
    import zmq

    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        secure(sock, curve)
        sock.connect(endpoint)
    except BaseException:
        sock.close(0)
        raise
    return sock


def attach_workers(topology: dict[str, Any], cache: dict[str, Any], ctx: Any,
                   curve: Curve | None = None) -> tuple[int, list[Any]]:
    """(shards to place by, a DEALER per shard) for a topology, reusing ``cache``d sockets.

    Placement is by the topology's shard count, which during a resize is still the old one
    (MOVED names new owners). 0 means "not usable yet": some shard has not published its
    endpoint, so the router is used meanwhile.
    """
    workers: list[Any] = []
    for endpoint in topology["endpoints"]:
        if not endpoint:
            workers.append(None)
            continue
        sock = cache.get(endpoint)
        if sock is None:
            sock = cache[endpoint] = connect_dealer(ctx, endpoint, curve)
        workers.append(sock)
    shards = topology["shards"] if all(workers[: topology["shards"]]) else 0
    return shards, workers


def split_by_shard(op: Any, shards: int) -> dict[int, tuple[Any, list[int]]]:
    """One sub-op per owning shard, with the positions of its keys in the original op."""
    groups: dict[int, list[int]] = {}
    keys = [item[0] for item in op.items] if type(op) is protocol.SetMany else op.keys
    for position, key in enumerate(keys):
        groups.setdefault(shard_for(key, shards), []).append(position)
    parts = {}
    for shard, positions in groups.items():
        if type(op) is protocol.SetMany:
            sub: Any = protocol.SetMany([op.items[i] for i in positions], op.ttl_ms)
        else:
            sub = type(op)([op.keys[i] for i in positions])
        parts[shard] = (sub, positions)
    return parts


def merge_split(op: Any, results: dict[int, tuple[Any, list[int]]]) -> protocol.Reply:
    """The Reply the router would have sent for ``op``, from the per-shard replies."""
    if type(op) is protocol.GetMany:
        values: list[Any] = [None] * len(op.keys)
        for part, positions in results.values():
            for position, value in zip(positions, part, strict=True):
                values[position] = value
        return protocol.Reply(0, protocol.OK, values)
    return protocol.Reply(0, protocol.OK, sum(part for part, _ in results.values()))
