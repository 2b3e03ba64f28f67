"""The asyncio shardd client: one zmq.asyncio DEALER socket shared by many coroutines.

Theory of operation
-------------------
Requests and replies are the frames of :mod:`shardd.protocol`, as for
:class:`shardd.client.Client`. Any number of coroutines may call one AsyncClient at
once: each call registers a future under its request id, sends its frame, and waits. A
single reader task, started lazily inside the running loop, receives every reply and
resolves the future registered under the reply's id.

Rules
-----
Rule 1: a reply whose id has no registered future is dropped. A call removes its entry
        when it ends, however it ends, so the late reply of a request that timed out
        can never resolve a later call.
Rule 2: ``timeout`` bounds each call, sending included (one shared deadline for a whole
        pipeline); past it the call raises :class:`~shardd.errors.Timeout`. The request
        is not withdrawn, so the daemon may still have applied it.
Rule 3: a reply frame that cannot be decoded cannot be matched to a call, so every call
        waiting at that moment raises ProtocolError.
Rule 4: an AsyncClient belongs to one event loop at a time, and to the process that
        created it. ``aclose()`` cancels the reader and fails any waiting call with
        ConnectionClosed.

The client owns only its socket; the Context is shared
(``zmq.asyncio.Context.instance()`` by default) and never terminated here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable
from typing import Any

import zmq
import zmq.asyncio

from shardd import _ops, protocol
from shardd.errors import ConnectionClosed, ProtocolError, Timeout
from shardd.hashing import shard_for
from shardd.protocol import Reply, encode_request

__all__ = ["AsyncClient", "AsyncPipeline"]

_result = _ops.result


_MULTI_OPS = frozenset(protocol.MULTI_KEY_OPS)
_DIRECT_OPS = frozenset((*protocol.SINGLE_KEY_OPS, *protocol.MULTI_KEY_OPS))

class AsyncClient:
    """An asyncio shardd client; safe to share between the coroutines of one loop."""

    def __init__(
        self,
        endpoint: str = _ops.DEFAULT_ENDPOINT,
        timeout: float = _ops.DEFAULT_TIMEOUT,
        context: zmq.asyncio.Context | None = None,
        direct: bool = False,
        curve: _ops.Curve | None = None,
    ) -> None:
        if not isinstance(endpoint, str):
            raise TypeError(f"endpoint must be a str such as {_ops.DEFAULT_ENDPOINT!r}")
        self.endpoint = endpoint
        self.timeout = _ops.check_timeout(timeout)
        ctx = context if context is not None else zmq.asyncio.Context.instance()
        sock = _ops.connect_dealer(ctx, endpoint, curve)
        self._sock: zmq.asyncio.Socket | None = sock
        self._pid = os.getpid()
        self._last_id = 0
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: asyncio.Task[None] | None = None
        # Direct mode: as shardd.client (Rule 6), with one reader task per worker socket, all
        # resolving futures in the same ``_pending`` (ids are unique per client).
        self.direct = bool(direct)
        self._curve = curve
        self._ctx = ctx
        self._shards = 0
        self._workers: list[zmq.asyncio.Socket | None] = []
        self._worker_sockets: dict[str, zmq.asyncio.Socket] = {}
        self._worker_readers: dict[str, asyncio.Task[None]] = {}

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else "open"
        return f"<shardd.AsyncClient {self.endpoint} timeout={self.timeout:g} {state}>"

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        """True once aclose() has been called."""
        return self._sock is None

    async def aclose(self) -> None:
        """Stop the reader, fail waiting calls and close the socket; calling it again does nothing."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        reader, self._reader = self._reader, None
        readers = [reader, *self._worker_readers.values()]
        self._worker_readers.clear()
        for task in readers:
            if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._fail_pending(lambda: ConnectionClosed(f"this AsyncClient for {self.endpoint} was closed"))
        if self._pid == os.getpid():  # a socket inherited through fork belongs to the parent
            sock.close(0)
            for worker in self._worker_sockets.values():
                worker.close(0)
        self._worker_sockets.clear()
        self._workers = []

    def _fail_pending(self, make_error: Any) -> None:
        """Fail every waiting call with a fresh ``make_error()`` and forget them all."""
        pending = self._pending
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(make_error())
        pending.clear()

    def _socket(self) -> zmq.asyncio.Socket:
        """The socket, checked for use after close, after fork and from another loop."""
        sock = self._sock
        if sock is None:
            raise ConnectionClosed(f"this AsyncClient for {self.endpoint} is closed")
        if self._pid != os.getpid():
            raise RuntimeError(
                f"this AsyncClient was created in process {self._pid}; create a new one in each process"
            )
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._bind(loop)
        reader = self._reader
        if reader is None or reader.done():
            self._reader = loop.create_task(self._read_replies(sock), name=f"shardd reader {self.endpoint}")
        return sock

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        old = self._loop
        if old is not None and not old.is_closed():
            raise RuntimeError(
                "this AsyncClient is in use by another event loop; create one AsyncClient per loop"
            )
        # The previous loop is gone (e.g. a finished asyncio.run), and with it its reader
        # and every call that was waiting in it.
        self._loop, self._reader = loop, None
        self._worker_readers.clear()
        self._pending.clear()

    async def _read_replies(self, sock: zmq.asyncio.Socket) -> None:
        """The reader task: resolve the future registered under each reply's id (Rule 1)."""
        pending = self._pending
        try:
            while True:
                frame = await sock.recv()
                try:
                    reply = _ops.decode(frame)
                except ProtocolError as exc:  # Rule 3
                    message = str(exc)
                    self._fail_pending(lambda message=message: ProtocolError(message))
                    continue
                fut = pending.pop(reply.id, None)
                if fut is not None and not fut.done():
                    fut.set_result(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the socket failed: let no caller wait for a reply that cannot come
            message = f"receiving from {self.endpoint} failed: {exc!r}"
            self._fail_pending(lambda: ConnectionClosed(message))

    async def _call(self, call: _ops.Call) -> Any:
        sock = self._socket()
        op, convert = call
        if self.direct and type(op) in _DIRECT_OPS:
            reply = await self._call_direct(op)
            if reply is not None:
                return _result(reply, convert)
        return _result(await self._exchange(sock, op, self.endpoint), convert)

    async def _exchange(self, sock: zmq.asyncio.Socket, op: Any, endpoint: str) -> Reply:
        """Send ``op`` on ``sock`` (whose reader task is running) and await its Reply; raises Timeout."""
        rid = self._last_id = _ops.next_id(self._last_id)
        fut: asyncio.Future[Reply] = self._loop.create_future()  # type: ignore[union-attr]
        pending = self._pending
        pending[rid] = fut
        try:
            async with asyncio.timeout(self.timeout):
                await sock.send(encode_request(rid, op))
                return await fut
        except TimeoutError:
            raise _ops.timeout_error(endpoint, self.timeout, op) from None
        finally:
            pending.pop(rid, None)

    # --- direct mode ------------------------------------------------------------------

    async def _refresh_topology(self) -> None:
        topology = _result(await self._exchange(self._socket(), protocol.Topology(), self.endpoint), _ops.to_dict)
        self._shards, self._workers = _ops.attach_workers(topology, self._worker_sockets, self._ctx, self._curve)
        for endpoint, sock in self._worker_sockets.items():
            reader = self._worker_readers.get(endpoint)
            if reader is None or reader.done():
                self._worker_readers[endpoint] = self._loop.create_task(  # type: ignore[union-attr]
                    self._read_replies(sock), name=f"shardd reader {endpoint}")

    async def _shard_removed(self, shard: int) -> bool:
        """As shardd.client.Client._shard_removed."""
        await self._refresh_topology()
        return shard >= len(self._workers)

    def _worker(self, shard: int) -> zmq.asyncio.Socket | None:
        return self._workers[shard] if shard < len(self._workers) else None

    async def _call_direct(self, op: Any) -> Reply | None:
        """The Reply from the owning worker(s), or None to use the router instead."""
        if not self._shards:
            await self._refresh_topology()
            if not self._shards:
                return None
        if type(op) in _MULTI_OPS:
            return await self._multi_direct(op)
        shard = shard_for(op.key, self._shards)
        for _ in range(3):
            sock = self._worker(shard)
            if sock is None:
                return None
            try:
                reply = await self._exchange(sock, op, f"shard {shard}")
            except Timeout:
                if not await self._shard_removed(shard):
                    raise
                return None
            if reply.status == protocol.TRYAGAIN:
                return None  # mid-resize, its entry may be on the way here: the router orders the two
            if reply.status != protocol.MOVED:
                return reply
            await self._refresh_topology()
            moved_to = reply.value.get("shard") if isinstance(reply.value, dict) else None
            shard = moved_to if isinstance(moved_to, int) else shard_for(op.key, max(1, self._shards))
        return None

    async def _multi_direct(self, op: Any) -> Reply:
        parts = _ops.split_by_shard(op, self._shards)

        async def ask(shard: int, sub: Any) -> Any:
            sock = self._worker(shard)
            return await self._exchange(sock, sub, f"shard {shard}") if sock is not None else None

        # All parts in flight at once: the shards work on them in parallel.
        replies = await asyncio.gather(*(ask(shard, sub) for shard, (sub, _) in parts.items()),
                                       return_exceptions=True)
        results: dict[int, Any] = {}
        for (shard, (sub, positions)), reply in zip(parts.items(), replies, strict=True):
            if isinstance(reply, Timeout):
                if not await self._shard_removed(shard):
                    raise reply
                reply = None
            elif isinstance(reply, BaseException):
                raise reply
            if reply is None or reply.status == protocol.MOVED or reply.status == protocol.TRYAGAIN:
                self._shards = 0
                reply = await self._exchange(self._socket(), sub, self.endpoint)
            if reply.status != protocol.OK:
                return reply
            results[shard] = (reply.value, positions)
        return _ops.merge_split(op, results)

    async def _execute(self, calls: list[_ops.Call], raise_on_error: bool) -> list[Any]:
        sock = self._socket()
        if not calls:
            return []
        loop = self._loop
        assert loop is not None
        deadline = loop.time() + self.timeout
        pending = self._pending
        futures: list[asyncio.Future[Reply]] = []
        ids: list[int] = []
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    for op, _ in calls:
                        rid = self._last_id = _ops.next_id(self._last_id)
                        fut = loop.create_future()
                        pending[rid] = fut
                        ids.append(rid)
                        futures.append(fut)
                        await sock.send(encode_request(rid, op))
            if futures:
                await asyncio.wait(futures, timeout=max(0.0, deadline - loop.time()))
        finally:
            for rid in ids:
                pending.pop(rid, None)
        results: list[Any] = [_ops.UNANSWERED] * len(calls)
        for index, fut in enumerate(futures):
            if fut.done():
                exc = fut.exception()
                results[index] = exc if exc is not None else _ops.outcome(fut.result(), calls[index][1])
            else:
                fut.cancel()
        return _ops.finish(results, raise_on_error, self.endpoint, self.timeout)

    def pipeline(self) -> AsyncPipeline:
        """An AsyncPipeline that queues commands and sends them together on ``await execute()``."""
        return AsyncPipeline(self)

    async def get(self, key: _ops.Key) -> bytes | None:
        """The value of ``key``, or None if it does not exist."""
        return await self._call(_ops.get(key))

    async def set(
        self, key: _ops.Key, value: _ops.Value, ttl: float | None = None, nx: bool = False, xx: bool = False
    ) -> bool:
        """Store ``value`` (only if absent with ``nx``, only if present with ``xx``); True if stored."""
        return await self._call(_ops.set(key, value, ttl, nx, xx))

    async def delete(self, key: _ops.Key) -> bool:
        """Remove ``key``; True if it existed."""
        return await self._call(_ops.delete(key))

    async def exists(self, key: _ops.Key) -> bool:
        """True if ``key`` exists."""
        return await self._call(_ops.exists(key))

    async def expire(self, key: _ops.Key, ttl: float) -> bool:
        """Make ``key`` expire ``ttl`` seconds from now; True if it existed."""
        return await self._call(_ops.expire(key, ttl))

    async def ttl(self, key: _ops.Key) -> float | None:
        """Seconds until ``key`` expires: math.inf without a TTL, None if it does not exist."""
        return await self._call(_ops.ttl(key))

    async def persist(self, key: _ops.Key) -> bool:
        """Remove the TTL of ``key``; True if the key existed."""
        return await self._call(_ops.persist(key))

    async def incr(self, key: _ops.Key, amount: int = 1) -> int:
        """Add ``amount`` to the integer at ``key`` (missing counts as 0); the new value."""
        return await self._call(_ops.incr(key, amount))

    async def decr(self, key: _ops.Key, amount: int = 1) -> int:
        """Subtract ``amount`` from the integer at ``key`` (missing counts as 0); the new value."""
        return await self._call(_ops.decr(key, amount))

    async def gets(self, key: _ops.Key) -> tuple[bytes, int] | None:
        """``(value, version)`` of ``key`` for a later cas(), or None if it does not exist."""
        return await self._call(_ops.gets(key))

    async def cas(
        self, key: _ops.Key, value: _ops.Value, version: int, ttl: float | None = None
    ) -> bool | None:
        """Store ``value`` if ``key`` is still at ``version``: True stored, False stale, None missing."""
        return await self._call(_ops.cas(key, value, version, ttl))

    async def get_many(self, keys: Iterable[_ops.Key]) -> dict[Any, bytes]:
        """The values of the keys that exist, keyed by the key objects given."""
        return await self._call(_ops.get_many(keys))

    async def set_many(self, items: _ops.Items, ttl: float | None = None) -> int:
        """Store every (key, value) of a mapping or iterable of pairs; the number stored."""
        return await self._call(_ops.set_many(items, ttl))

    async def delete_many(self, keys: Iterable[_ops.Key]) -> int:
        """Remove the keys; the number that existed."""
        return await self._call(_ops.delete_many(keys))

    async def flush(self) -> int:
        """Remove every key on every shard; the number removed."""
        return await self._call(_ops.flush())

    async def ping(self) -> int:
        """The number of shards that answered."""
        return await self._call(_ops.ping())

    async def stats(self) -> dict[Any, Any]:
        """The daemon's statistics, as it sent them."""
        return await self._call(_ops.stats())

    async def hotkeys(self, top: int = 10) -> dict[Any, Any]:
        """The ``top`` most accessed keys over all shards (see Client.hotkeys)."""
        return await self._call(_ops.hotkeys(top))

    async def health(self, deadline: float = 1.0) -> dict[Any, Any]:
        """Each shard's state ("ok", "down", "timeout") as the router saw it within ``deadline`` seconds."""
        return await self._call(_ops.health(deadline))

    async def tune(self, **settings: Any) -> int:
        """Change ``mailbox_limit``, ``max_memory`` or ``eviction_policy`` on every shard now; returns shards."""
        return await self._call(_ops.tune(settings))

    async def topology(self) -> dict[str, Any]:
        """Epoch, shard count, hash spec and worker endpoints, as the router sees them now."""
        return await self._call(_ops.topology())

    async def resize(self, shards: int) -> dict[str, Any]:
        """Change the shard count while serving; returns {from, to, moved, total, seconds, epoch}."""
        return await self._call(_ops.resize(shards))

    async def maintenance(self, on: bool | None = None) -> bool:
        """Turn maintenance mode (writes refused) on or off; None just asks. Returns the mode now."""
        return await self._call(_ops.maintenance(on))


class AsyncPipeline(_ops.PipelineBase):
    """Commands queued on an AsyncClient and sent together by ``await execute()``."""

    def __init__(self, client: AsyncClient) -> None:
        super().__init__()
        self._client = client

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Send every queued command, then return their results in call order (see AsyncClient rules)."""
        return await self._client._execute(self._take(), raise_on_error)
