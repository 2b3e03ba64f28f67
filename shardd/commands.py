"""Every public command, written once, for Client, AsyncClient and both pipelines.

Theory of operation
-------------------
As redis-py's ``return self.execute_command("APPEND", key, value)``: each command of
:class:`Commands` checks its arguments, builds the protocol Struct to send and picks the
conversion of the OK reply's value, then returns ``self._call(op, convert)``. Each class
that mixes it in decides what a call is: :class:`~shardd.client.Client` sends the op and
returns the result, :class:`~shardd.aclient.AsyncClient`'s ``_call`` is a coroutine function
so the command returns an awaitable, and a pipeline queues the pair and returns itself.
No command knows which of them it serves.

Rules
-----
Rule 1: argument misuse raises TypeError or ValueError when the command is called (or queued),
        before anything is sent; for an AsyncClient that is at the call, before any await.
Rule 2: a reply value of the wrong shape raises ProtocolError, never a stray TypeError.
Rule 3: TTLs are seconds in Python and whole milliseconds on the wire, rounded up, so any
        positive TTL is at least 1 ms.
Rule 4: values go through the client's :class:`Codec` (its serde, :mod:`shardd.serde`): each
        value a command sends through ``codec.dumps``, each value it returns through ``codec``'s
        converters. Without a serde both are the plain bytes checks, at no extra cost.

Commands are data and admin ops; the supervisor's control-only ops are in :mod:`shardd.control`.
No I/O here.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from itertools import compress, repeat
from operator import is_not
from typing import Any, TypeVar, Union

from shardd import protocol
from shardd.errors import ProtocolError
from shardd.hashing import MAX_SHARDS
from shardd.serde import Serde

__all__ = ["COMMANDS", "Codec", "Commands", "key_bytes", "ttl_ms", "value_bytes"]

U64 = (1 << 64) - 1
_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
_NO_TTL = -1
_MISSING = -2

Key = bytes | str
Value = Any  # bytes-like without a serde; whatever the serde accepts with one
Items = Mapping[Key, Value] | Iterable[tuple[Key, Value]]
Convert = Callable[[Any], Any]
T = TypeVar("T")
Response = Union[T, Awaitable[T]]  # noqa: UP007 - a generic alias: the result, or (AsyncClient) an awaitable of it


# --- argument checks (Rule 1) ----------------------------------------------------------


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
    """A value as wire bytes, without a serde: bytes, bytearray or memoryview only."""
    if type(value) is bytes:
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    hint = " (encode it first, or give the client a serde)" if isinstance(value, str) else ""
    raise TypeError(f"value must be bytes, bytearray or memoryview, not {type(value).__name__}{hint}")


def ttl_ms(ttl: object) -> int:
    """Seconds (int or float, > 0) as whole milliseconds, rounded up (Rule 3)."""
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


def keys_bytes(keys: list[Any]) -> list[bytes]:
    """``[key_bytes(k) for k in keys]``, with no Python call per key when the keys are all bytes
    or all str (one C-level pass over their types decides). ``keys`` itself may come back."""
    kinds = set(map(type, keys))
    if kinds <= _BYTES:
        return keys
    if kinds == _STR:
        return list(map(str.encode, keys))
    return [key_bytes(k) for k in keys]


def _pairs_bytes(items: Items, dumps: Callable[[Any], bytes]) -> list[tuple[bytes, bytes]]:
    """set_many's (key, value) pairs as wire bytes; a mapping, or 2-tuples / 2-lists, in C-level passes."""
    if isinstance(items, Mapping):
        keys: Any = list(items.keys())
        values: Any = list(items.values())
    else:
        pairs = list(items)
        if not pairs:
            return []
        if not (set(map(type, pairs)) <= _PAIR_TYPES and set(map(len, pairs)) == _TWO):
            return [_pair_bytes(pair, dumps) for pair in pairs]  # anything else: checked one by one
        keys, values = zip(*pairs, strict=True)
    if dumps is value_bytes and set(map(type, values)) <= _BYTES:
        return list(zip(keys_bytes(list(keys)), values, strict=True))
    return list(zip(keys_bytes(list(keys)), map(dumps, values), strict=True))


def _pair_bytes(pair: Any, dumps: Callable[[Any], bytes]) -> tuple[bytes, bytes]:
    try:
        key, value = pair
    except (TypeError, ValueError):
        raise TypeError(f"set_many wants a mapping or (key, value) pairs, got item {pair!r}") from None
    return key_bytes(key), dumps(value)


_BYTES = frozenset((bytes,))
_STR = frozenset((str,))
_BYTES_OR_NONE = frozenset((bytes, type(None)))
_PAIR_TYPES = frozenset((tuple, list))
_TWO = frozenset((2,))


def _incr(key: Key, delta: int) -> protocol.Incr:
    if not _I64_MIN <= delta <= _I64_MAX:
        raise ValueError(f"amount must fit in a signed 64-bit integer, got {abs(delta)}")
    return protocol.Incr(key_bytes(key), delta)


# --- reply conversions (Rule 2) -------------------------------------------------------


def bad_reply(what: str, value: Any) -> ProtocolError:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return ProtocolError(f"expected {what} in reply, got {text}")


def _to_bytes_or_none(value: Any) -> bytes | None:
    if value is None or type(value) is bytes:
        return value
    raise bad_reply("bytes or nil", value)


def to_bool(value: Any) -> bool:
    if type(value) is bool:
        return value
    raise bad_reply("a bool", value)


def to_int(value: Any) -> int:
    if type(value) is int:
        return value
    raise bad_reply("an int", value)


def _to_ttl(value: Any) -> float | None:
    if type(value) is int:
        if value >= 0:
            return value / 1000
        if value == _NO_TTL:
            return math.inf
        if value == _MISSING:
            return None
    raise bad_reply("milliseconds, -1 or -2", value)


def _to_versioned(value: Any) -> tuple[bytes, int] | None:
    if value is None:
        return None
    if type(value) is list and len(value) == 2 and type(value[0]) is bytes and type(value[1]) is int:
        return value[0], value[1]
    raise bad_reply("[value, version] or nil", value)


def _to_cas(value: Any) -> bool | None:
    if value is None or type(value) is bool:
        return value
    raise bad_reply("a bool or nil", value)


def to_dict(value: Any) -> dict[Any, Any]:
    if type(value) is dict:
        return value
    raise bad_reply("a map", value)


def _to_str(value: Any) -> str:
    if type(value) is not str:
        raise ProtocolError(f"expected a str reply, got {type(value).__name__}")
    return value


def to_list(value: Any) -> list[Any]:
    if type(value) is list:
        return value
    raise bad_reply("an array", value)


def _identity(data: bytes) -> bytes:
    return data


class Codec:
    """A client's value conversions, built once from its serde (Rule 4)."""

    __slots__ = ("dumps", "loads", "value", "versioned")

    def __init__(self, serde: Serde | None = None) -> None:
        self.loads: Callable[[bytes], Any] = _identity
        if serde is None:  # Invariant 2 of shardd.serde: today's bytes-only path, nothing added
            self.dumps: Callable[[Any], bytes] = value_bytes
            self.value: Convert = _to_bytes_or_none
            self.versioned: Convert = _to_versioned
            return
        dumps, loads = serde.dumps, serde.loads

        def dump(value: Any) -> bytes:
            data = dumps(value)
            if type(data) is not bytes:
                raise TypeError(f"{type(serde).__name__}.dumps returned {type(data).__name__}, not bytes")
            return data

        def load(data: bytes) -> Any:
            try:
                return loads(data)
            except Exception as exc:  # stored by another client, or by another serde
                raise ProtocolError(f"a stored value cannot be read by {type(serde).__name__}: {exc}") from None

        def value(reply: Any) -> Any:
            data = _to_bytes_or_none(reply)
            return None if data is None else load(data)

        def versioned(reply: Any) -> Any:
            pair = _to_versioned(reply)
            return None if pair is None else (load(pair[0]), pair[1])

        self.dumps, self.loads, self.value, self.versioned = dump, load, value, versioned

    def many(self, originals: list[Any]) -> Convert:
        """The conversion of a get_many reply: {key object given: value} for the keys that exist."""
        loads = None if self.loads is _identity else self.loads

        def convert(values: Any) -> dict[Any, Any]:
            # C-level passes only: check the types, then keep the pairs whose value is not None.
            if type(values) is not list or len(values) != len(originals):
                raise bad_reply(f"a list of {len(originals)} values", values)
            if not set(map(type, values)) <= _BYTES_OR_NONE:
                raise bad_reply("bytes or nil", next(v for v in values if v is not None and type(v) is not bytes))
            found = dict(compress(zip(originals, values, strict=True), map(is_not, values, repeat(None))))
            return found if loads is None else {key: loads(value) for key, value in found.items()}

        return convert


# --- the commands ------------------------------------------------------------------------


class Commands:
    """The public commands; a subclass supplies ``_call(op, convert)`` and ``_codec``."""

    __slots__ = ()
    _codec: Codec

    def _call(self, op: protocol.Op, convert: Convert) -> Any:
        raise NotImplementedError

    def get(self, key: Key) -> Response[Any]:
        """The value of ``key``, or None if it does not exist."""
        return self._call(protocol.Get(key_bytes(key)), self._codec.value)

    def set(self, key: Key, value: Value, ttl: float | None = None, nx: bool = False,
            xx: bool = False) -> Response[bool]:
        """Store ``value`` (only if absent with ``nx``, only if present with ``xx``); True if stored."""
        if nx and xx:
            raise ValueError("nx and xx are mutually exclusive")
        cond = protocol.IF_ABSENT if nx else protocol.IF_PRESENT if xx else protocol.ALWAYS
        return self._call(protocol.Set(key_bytes(key), self._codec.dumps(value), _opt_ttl_ms(ttl), cond), to_bool)

    def delete(self, key: Key) -> Response[bool]:
        """Remove ``key``; True if it existed."""
        return self._call(protocol.Delete(key_bytes(key)), to_bool)

    def exists(self, key: Key) -> Response[bool]:
        """True if ``key`` exists."""
        return self._call(protocol.Exists(key_bytes(key)), to_bool)

    def expire(self, key: Key, ttl: float) -> Response[bool]:
        """Make ``key`` expire ``ttl`` seconds from now; True if it existed."""
        return self._call(protocol.Expire(key_bytes(key), ttl_ms(ttl)), to_bool)

    def ttl(self, key: Key) -> Response[float | None]:
        """Seconds until ``key`` expires: math.inf without a TTL, None if it does not exist."""
        return self._call(protocol.Ttl(key_bytes(key)), _to_ttl)

    def persist(self, key: Key) -> Response[bool]:
        """Remove the TTL of ``key``; True if the key existed."""
        return self._call(protocol.Persist(key_bytes(key)), to_bool)

    def incr(self, key: Key, amount: int = 1) -> Response[int]:
        """Add ``amount`` to the integer at ``key`` (missing counts as 0); the new value."""
        return self._call(_incr(key, _int_arg("amount", amount)), to_int)

    def decr(self, key: Key, amount: int = 1) -> Response[int]:
        """Subtract ``amount`` from the integer at ``key`` (missing counts as 0); the new value."""
        return self._call(_incr(key, -_int_arg("amount", amount)), to_int)

    def append(self, key: Key, value: Value) -> Response[int]:
        """Append ``value`` to the bytes at ``key`` (a missing key is created); the new length in bytes."""
        return self._call(protocol.Append(key_bytes(key), self._codec.dumps(value)), to_int)

    def getdel(self, key: Key) -> Response[Any]:
        """The value of ``key`` (None if it does not exist), deleting it in the same step."""
        return self._call(protocol.GetDel(key_bytes(key)), self._codec.value)

    def touch(self, key: Key, ttl: float | None = None) -> Response[bool]:
        """True if ``key`` exists; counts as an access, and with ``ttl`` (seconds) also sets its TTL."""
        return self._call(protocol.Touch(key_bytes(key), _opt_ttl_ms(ttl)), to_bool)

    def gets(self, key: Key) -> Response[tuple[Any, int] | None]:
        """``(value, version)`` of ``key`` for a later cas(), or None if it does not exist."""
        return self._call(protocol.Gets(key_bytes(key)), self._codec.versioned)

    def cas(self, key: Key, value: Value, version: int, ttl: float | None = None) -> Response[bool | None]:
        """Store ``value`` if ``key`` is still at ``version``: True stored, False stale, None missing."""
        version = _int_arg("version", version)
        if not 0 <= version <= U64:
            raise ValueError(f"version must be an unsigned 64-bit integer, got {version}")
        op = protocol.Cas(key_bytes(key), self._codec.dumps(value), version, _opt_ttl_ms(ttl))
        return self._call(op, _to_cas)

    def get_many(self, keys: Iterable[Key]) -> Response[dict[Any, Any]]:
        """The values of the keys that exist, keyed by the key objects given."""
        originals = _key_list(keys)
        return self._call(protocol.GetMany(keys_bytes(originals)), self._codec.many(originals))

    def set_many(self, items: Items, ttl: float | None = None) -> Response[int]:
        """Store every (key, value) of a mapping or iterable of pairs; the number stored."""
        return self._call(protocol.SetMany(_pairs_bytes(items, self._codec.dumps), _opt_ttl_ms(ttl)), to_int)

    def delete_many(self, keys: Iterable[Key]) -> Response[int]:
        """Remove the keys; the number that existed."""
        return self._call(protocol.DeleteMany(keys_bytes(_key_list(keys))), to_int)

    def flush(self) -> Response[int]:
        """Remove every key on every shard; the number removed."""
        return self._call(protocol.Flush(), to_int)

    def ping(self) -> Response[int]:
        """The number of shards that answered."""
        return self._call(protocol.Ping(), to_int)

    def stats(self) -> Response[dict[Any, Any]]:
        """The daemon's statistics, as it sent them."""
        return self._call(protocol.Stats(), to_dict)

    def hotkeys(self, top: int = 10) -> Response[dict[Any, Any]]:
        """The ``top`` most accessed keys of all shards: {"window_s", "keys": [[key, shard, rate, count, error]]}."""
        top = _int_arg("top", top)
        if not 1 <= top <= 10_000:
            raise ValueError(f"top must be in [1, 10000], got {top}")
        return self._call(protocol.Hotkeys(top), to_dict)

    def health(self, deadline: float = 1.0) -> Response[dict[Any, Any]]:
        """Each shard's state ("ok", "down", "timeout") as the router saw it within ``deadline`` seconds."""
        if isinstance(deadline, bool) or not isinstance(deadline, int | float) or not 0 < deadline <= 60:
            raise ValueError(f"deadline must be a number of seconds in (0, 60], got {deadline!r}")
        return self._call(protocol.Health(max(1, math.ceil(deadline * 1000))), to_dict)

    def maintenance(self, on: bool | None = None) -> Response[bool]:
        """Turn maintenance mode (writes refused) on or off; None just asks. Returns the mode now."""
        if on is not None and type(on) is not bool:
            raise TypeError(f"on must be True, False or None, got {on!r}")
        return self._call(protocol.Maintenance(on), to_bool)

    def tune(self, **settings: Any) -> Response[int]:
        """Change ``mailbox_limit``, ``max_memory`` or ``eviction_policy`` on every shard now; returns shards."""
        unknown = sorted(k for k in settings if k not in protocol.TUNABLE)
        if unknown or not settings:
            raise ValueError(f"tune accepts {', '.join(protocol.TUNABLE)}; got {', '.join(unknown) or 'nothing'}")
        return self._call(protocol.Tune(dict(settings)), to_int)

    def topology(self) -> Response[dict[str, Any]]:
        """Epoch, shard count, hash spec and worker endpoints, as the router sees them now."""
        return self._call(protocol.Topology(), to_dict)

    def leave(self) -> Response[str]:
        """Cluster mode: hand this node's slots to the other members, then stop the node."""
        return self._call(protocol.Leave(), _to_str)

    def resize(self, shards: int) -> Response[dict[str, Any]]:
        """Change the shard count while serving; returns {from, to, moved, total, seconds, epoch}.

        Blocks until every moving key has moved: give the client a timeout to match the data.
        """
        if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
            raise ValueError(f"shards must be an int between 1 and {MAX_SHARDS}, got {shards!r}")
        return self._call(protocol.Resize(shards), to_dict)


# Every public command name: what Client, AsyncClient and both pipelines share (tests check it).
COMMANDS = frozenset(name for name in vars(Commands) if not name.startswith("_"))
