"""The blocking shardd client: one ZeroMQ DEALER socket to the router.

Theory of operation
-------------------
Each request is one frame ``[version, id, op]`` and each reply one frame
``[id, status, value]`` (see :mod:`shardd.protocol`). The client numbers its requests
with a private counter and matches replies by id, because the daemon may answer
pipelined requests in any order.

Rules
-----
Rule 1: a call waits for the reply whose id it sent and discards any other reply it
        receives. Such a reply is a late answer to a request that already raised Timeout;
        it must never be taken for the answer to a later call.
Rule 2: ``timeout`` bounds the whole call, sending included: a call (or a whole pipeline)
        raises :class:`~shardd.errors.Timeout` once ``timeout`` seconds have passed
        without its reply(s). The request is not withdrawn, so the daemon may still have
        applied it.
Rule 3: a frame that cannot be decoded cannot be matched to a request, so the call (or
        pipeline) that receives it raises ProtocolError.
Rule 4: the socket only queues a request once a connection exists (``IMMEDIATE``), so a
        request that timed out while the daemon was unreachable is not delivered later.
Rule 5: a client is not thread-safe: use one per thread. Create it in the process that
        uses it; a client carried across ``fork`` refuses to work.

The client owns only its socket; the Context is shared (``zmq.Context.instance()`` by
default) and never terminated here.
Rule 6: with ``direct=True`` single- and multi-key ops skip the router: the client fetches
        the topology, places each key with ``shard_for`` and talks to the owning worker's own
        endpoint. A worker that no longer owns a key answers MOVED without applying anything;
        the client re-reads the topology and retries there (or, for a part of a multi-key op,
        through the router). During a resize a worker answers TRYAGAIN for a key whose entry
        may still be on its way to it; the client then sends that request through the router,
        which orders it after the entry. Admin ops and pipelines always go through the router.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from typing import Any

import zmq

from shardd import _ops, protocol
from shardd.errors import ConnectionClosed, Timeout
from shardd.hashing import shard_for
from shardd.protocol import encode_request

__all__ = ["DEFAULT_ENDPOINT", "DEFAULT_TIMEOUT", "Client", "Pipeline"]

DEFAULT_ENDPOINT = _ops.DEFAULT_ENDPOINT
DEFAULT_TIMEOUT = _ops.DEFAULT_TIMEOUT

# Plain ints: enum arithmetic and enum-typed flags cost ~0.5 µs per call (docs/design.md).
_NOBLOCK = int(zmq.NOBLOCK)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)

_monotonic = time.monotonic
_decode = _ops.decode
_result = _ops.result
_UNANSWERED = _ops.UNANSWERED
_MULTI_OPS = frozenset(protocol.MULTI_KEY_OPS)
_TIMED_OUT = object()
_DIRECT_OPS = frozenset((*protocol.SINGLE_KEY_OPS, *protocol.MULTI_KEY_OPS))


def _ms(seconds: float) -> int:
    """A poll timeout in whole milliseconds, rounded up so a poll never wakes early."""
    return math.ceil(seconds * 1000) if seconds > 0 else 0


class Client:
    """A blocking shardd client; one per thread (see the module docstring)."""

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        timeout: float = DEFAULT_TIMEOUT,
        context: zmq.Context | None = None,
        direct: bool = False,
        curve: _ops.Curve | None = None,
    ) -> None:
        if not isinstance(endpoint, str):
            raise TypeError(f"endpoint must be a str such as {DEFAULT_ENDPOINT!r}")
        self.endpoint = endpoint
        self.timeout = _ops.check_timeout(timeout)
        ctx = context if context is not None else zmq.Context.instance()
        sock = _ops.connect_dealer(ctx, endpoint, curve)
        self._sock: zmq.Socket | None = sock
        self._pid = os.getpid()
        self._last_id = 0
        # Direct mode (Rule 6): single- and multi-key ops go to the owning worker's own
        # endpoint, placed by the daemon's topology; everything else goes through the router.
        self.direct = bool(direct)
        self._curve = curve
        self._ctx = ctx
        self._shards = 0                                  # 0: topology not fetched (or unusable)
        self._workers: list[zmq.Socket | None] = []
        self._worker_sockets: dict[str, zmq.Socket] = {}  # endpoint → socket, reused across epochs

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else "open"
        return f"<shardd.Client {self.endpoint} timeout={self.timeout:g} {state}>"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """True once close() has been called."""
        return self._sock is None

    def close(self) -> None:
        """Close the socket; calling it again does nothing."""
        sock, self._sock = self._sock, None
        # A socket inherited through fork belongs to the parent: leave it alone.
        if sock is not None and self._pid == os.getpid():
            sock.close(0)
            for worker in self._worker_sockets.values():
                worker.close(0)
        self._worker_sockets.clear()
        self._workers = []

    def _socket(self) -> zmq.Socket:
        sock = self._sock
        if sock is None:
            raise ConnectionClosed(f"this Client for {self.endpoint} is closed")
        if self._pid != os.getpid():
            raise RuntimeError(
                f"this Client was created in process {self._pid}; create a new Client in each process"
            )
        return sock

    def _send(self, sock: zmq.Socket, frame: bytes, deadline: float) -> bool:
        """Send one frame by ``deadline``; False if it could not be queued in time."""
        try:
            sock.send(frame, _NOBLOCK)
            return True
        except zmq.Again:
            pass
        while sock.poll(_ms(deadline - _monotonic()), _POLLOUT):
            try:
                sock.send(frame, _NOBLOCK)
                return True
            except zmq.Again:
                continue
        return False

    def _call(self, call: _ops.Call) -> Any:
        sock = self._socket()
        op, convert = call
        if self.direct and type(op) in _DIRECT_OPS:
            reply = self._call_direct(op)
            if reply is not None:
                return _result(reply, convert)
        return _result(self._exchange(sock, op, self.endpoint), convert)

    def _exchange(self, sock: zmq.Socket, op: Any, endpoint: str) -> Any:
        """Send ``op`` on ``sock`` and return its Reply; raises Timeout."""
        rid = self._last_id = _ops.next_id(self._last_id)
        deadline = _monotonic() + self.timeout
        if self._send(sock, encode_request(rid, op), deadline):
            reply = self._await(sock, rid, deadline)
            if reply is not _TIMED_OUT:
                return reply
        raise _ops.timeout_error(endpoint, self.timeout, op)

    # --- direct mode ------------------------------------------------------------------

    def _refresh_topology(self) -> None:
        """Fetch the topology from the router and connect to every worker it names."""
        topology = _result(self._exchange(self._socket(), protocol.Topology(), self.endpoint), _ops.to_dict)
        self._shards, self._workers = _ops.attach_workers(topology, self._worker_sockets, self._ctx, self._curve)

    def _send_parts(self, parts: list[tuple[zmq.Socket | None, Any]]) -> list[tuple[Any, int, float]]:
        """Send each (socket, op); returns (socket or None if not sent, request id, deadline) each."""
        deadline = _monotonic() + self.timeout
        sent = []
        for sock, op in parts:
            rid = self._last_id = _ops.next_id(self._last_id)
            ok = sock is not None and self._send(sock, encode_request(rid, op), deadline)
            sent.append((sock if ok else None, rid, deadline))
        return sent

    def _await(self, sock: zmq.Socket, rid: int, deadline: float) -> Any:
        """The Reply with id ``rid`` from ``sock``, or _TIMED_OUT at ``deadline``."""
        while sock.poll(_ms(deadline - _monotonic()), _POLLIN):
            try:
                frame = sock.recv(_NOBLOCK)
            except zmq.Again:
                continue
            reply = _decode(frame)
            if reply.id == rid:
                return reply
            # Rule 1: a late reply to an abandoned request; drop it.
        return _TIMED_OUT

    def _shard_removed(self, shard: int) -> bool:
        """After a timeout from a worker: True if a shrink removed it (the request was not applied:
        a removed shard holds no keys and answers MOVED until it stops), so retrying is safe."""
        self._refresh_topology()
        return shard >= len(self._workers)

    def _worker(self, shard: int) -> zmq.Socket | None:
        return self._workers[shard] if shard < len(self._workers) else None

    def _call_direct(self, op: Any) -> Any:
        """The Reply from the owning worker(s), or None to use the router instead."""
        if not self._shards:
            self._refresh_topology()
            if not self._shards:
                return None
        if type(op) in _MULTI_OPS:
            return self._multi_direct(op)
        shard = shard_for(op.key, self._shards)
        for _ in range(3):
            sock = self._worker(shard)
            if sock is None:
                return None
            try:
                reply = self._exchange(sock, op, f"shard {shard}")
            except Timeout:
                if not self._shard_removed(shard):
                    raise
                return None  # its worker was removed by a shrink, before it saw our request
            if reply.status == protocol.TRYAGAIN:
                return None  # mid-resize, its entry may be on the way here: the router orders the two
            if reply.status != protocol.MOVED:
                return reply
            # Not applied there: the key lives elsewhere now. Learn the new placement, retry.
            self._refresh_topology()
            moved_to = reply.value.get("shard") if isinstance(reply.value, dict) else None
            shard = moved_to if isinstance(moved_to, int) else shard_for(op.key, max(1, self._shards))
        return None

    def _multi_direct(self, op: Any) -> Any:
        """Split a multi-key op per owning worker; any part answered MOVED goes through the router."""
        parts = _ops.split_by_shard(op, self._shards)
        # Every part is sent before any reply is awaited: the shards work on them in parallel.
        sent = self._send_parts([(self._worker(shard), sub) for shard, (sub, _) in parts.items()])
        results: dict[int, Any] = {}
        for (shard, (sub, positions)), (sock, rid, deadline) in zip(parts.items(), sent, strict=True):
            reply = self._await(sock, rid, deadline) if sock is not None else None
            if reply is _TIMED_OUT:
                if not self._shard_removed(shard):
                    raise _ops.timeout_error(f"shard {shard}", self.timeout, sub)
                reply = None
            if reply is None or reply.status == protocol.MOVED or reply.status == protocol.TRYAGAIN:
                self._shards = 0
                reply = self._exchange(self._socket(), sub, self.endpoint)
            if reply.status != protocol.OK:
                return reply
            results[shard] = (reply.value, positions)
        return _ops.merge_split(op, results)

    def _execute(self, calls: list[_ops.Call], raise_on_error: bool) -> list[Any]:
        sock = self._socket()
        if not calls:
            return []
        deadline = _monotonic() + self.timeout
        waiting: dict[int, int] = {}  # request id -> index in calls
        for index, (op, _) in enumerate(calls):
            rid = self._last_id = _ops.next_id(self._last_id)
            if not self._send(sock, encode_request(rid, op), deadline):
                break
            waiting[rid] = index
        results: list[Any] = [_UNANSWERED] * len(calls)
        while waiting and sock.poll(_ms(deadline - _monotonic()), _POLLIN):
            try:
                frame = sock.recv(_NOBLOCK)
            except zmq.Again:
                continue
            reply = _decode(frame)
            index = waiting.pop(reply.id, -1)
            if index >= 0:
                results[index] = _ops.outcome(reply, calls[index][1])
        return _ops.finish(results, raise_on_error, self.endpoint, self.timeout)

    def pipeline(self) -> Pipeline:
        """A Pipeline that queues commands and sends them together on ``execute()``."""
        return Pipeline(self)

    def get(self, key: _ops.Key) -> bytes | None:
        """The value of ``key``, or None if it does not exist."""
        return self._call(_ops.get(key))

    def set(
        self, key: _ops.Key, value: _ops.Value, ttl: float | None = None, nx: bool = False, xx: bool = False
    ) -> bool:
        """Store ``value`` (only if absent with ``nx``, only if present with ``xx``); True if stored."""
        return self._call(_ops.set(key, value, ttl, nx, xx))

    def delete(self, key: _ops.Key) -> bool:
        """Remove ``key``; True if it existed."""
        return self._call(_ops.delete(key))

    def exists(self, key: _ops.Key) -> bool:
        """True if ``key`` exists."""
        return self._call(_ops.exists(key))

    def expire(self, key: _ops.Key, ttl: float) -> bool:
        """Make ``key`` expire ``ttl`` seconds from now; True if it existed."""
        return self._call(_ops.expire(key, ttl))

    def ttl(self, key: _ops.Key) -> float | None:
        """Seconds until ``key`` expires: math.inf without a TTL, None if it does not exist."""
        return self._call(_ops.ttl(key))

    def persist(self, key: _ops.Key) -> bool:
        """Remove the TTL of ``key``; True if the key existed."""
        return self._call(_ops.persist(key))

    def incr(self, key: _ops.Key, amount: int = 1) -> int:
        """Add ``amount`` to the integer at ``key`` (missing counts as 0); the new value."""
        return self._call(_ops.incr(key, amount))

    def decr(self, key: _ops.Key, amount: int = 1) -> int:
        """Subtract ``amount`` from the integer at ``key`` (missing counts as 0); the new value."""
        return self._call(_ops.decr(key, amount))

    def gets(self, key: _ops.Key) -> tuple[bytes, int] | None:
        """``(value, version)`` of ``key`` for a later cas(), or None if it does not exist."""
        return self._call(_ops.gets(key))

    def cas(self, key: _ops.Key, value: _ops.Value, version: int, ttl: float | None = None) -> bool | None:
        """Store ``value`` if ``key`` is still at ``version``: True stored, False stale, None missing."""
        return self._call(_ops.cas(key, value, version, ttl))

    def get_many(self, keys: Iterable[_ops.Key]) -> dict[Any, bytes]:
        """The values of the keys that exist, keyed by the key objects given."""
        return self._call(_ops.get_many(keys))

    def set_many(self, items: _ops.Items, ttl: float | None = None) -> int:
        """Store every (key, value) of a mapping or iterable of pairs; the number stored."""
        return self._call(_ops.set_many(items, ttl))

    def delete_many(self, keys: Iterable[_ops.Key]) -> int:
        """Remove the keys; the number that existed."""
        return self._call(_ops.delete_many(keys))

    def flush(self) -> int:
        """Remove every key on every shard; the number removed."""
        return self._call(_ops.flush())

    def ping(self) -> int:
        """The number of shards that answered."""
        return self._call(_ops.ping())

    def stats(self) -> dict[Any, Any]:
        """The daemon's statistics, as it sent them."""
        return self._call(_ops.stats())

    def hotkeys(self, top: int = 10) -> dict[Any, Any]:
        """The ``top`` most accessed keys of all shards: {"window_s", "keys": [[key, shard, rate, count, error]]}."""
        return self._call(_ops.hotkeys(top))

    def health(self, deadline: float = 1.0) -> dict[Any, Any]:
        """Each shard's state ("ok", "down", "timeout") as the router saw it within ``deadline`` seconds."""
        return self._call(_ops.health(deadline))

    def maintenance(self, on: bool | None = None) -> bool:
        """Turn maintenance mode (writes refused) on or off; None just asks. Returns the mode now."""
        return self._call(_ops.maintenance(on))

    def tune(self, **settings: Any) -> int:
        """Change ``mailbox_limit``, ``max_memory`` or ``eviction_policy`` on every shard now; returns shards."""
        return self._call(_ops.tune(settings))

    def topology(self) -> dict[str, Any]:
        """Epoch, shard count, hash spec and worker endpoints, as the router sees them now."""
        return self._call(_ops.topology())

    def resize(self, shards: int) -> dict[str, Any]:
        """Change the shard count while serving; returns {from, to, moved, total, seconds, epoch}.

        Blocks until every moving key has moved: give the client a timeout to match the data.
        """
        return self._call(_ops.resize(shards))

    def resize_start(self, shards: int) -> bool:
        """Control endpoint only (the supervisor): the workers for ``shards`` are running."""
        return self._call(_ops.resize_start(shards))

    def drain(self) -> bool:
        """Control endpoint only: refuse new client requests; returns once nothing is in flight."""
        return self._call(_ops.drain())

    def snapshot(self, directory: str) -> list[dict[str, Any]]:
        """Control endpoint only: every shard writes its keys into ``directory``; per-shard results."""
        return self._call(_ops.snapshot(directory))

    def configure(self, settings: dict[str, Any]) -> int:
        """Apply live settings (control endpoint only); returns the number of shards that applied them."""
        return self._call(_ops.configure(settings))


class Pipeline(_ops.PipelineBase):
    """Commands queued on a Client and sent together; not thread-safe, like its Client."""

    def __init__(self, client: Client) -> None:
        super().__init__()
        self._client = client

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Send every queued command, then return their results in call order (see Client rules)."""
        return self._client._execute(self._take(), raise_on_error)
