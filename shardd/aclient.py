"""The asyncio shardd client: one connection to the router shared by many coroutines.

Theory of operation
-------------------
Requests and replies are the frames of :mod:`shardd.protocol`, and the commands those of
:mod:`shardd.commands`, as for :class:`shardd.client.Client`; here ``_call`` is a coroutine
function, so every command returns an awaitable. Any number of coroutines may call one
AsyncClient at once: each call registers a future under its request id, sends its frame,
and waits. A single reader task per connection, started lazily inside the running loop,
receives every reply and resolves the future registered under the reply's id. Direct mode
follows the same :class:`shardd.placement.Placement` policy as Client (its Rule 6), with a
reader task per worker connection, all resolving futures in the one ``_pending`` (ids are
unique per client).

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
        created it. ``aclose()`` cancels the readers and fails any waiting call with
        ConnectionClosed.
Rule 5: argument misuse raises when the command is called, before it is awaited
        (shardd.commands, Rule 1).

The client owns its connections; the ZeroMQ Context is shared and never terminated here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

from shardd import protocol
from shardd.client_common import (
    U64,
    UNANSWERED,
    WORKER_SEND_GRACE_S,
    Call,
    ClientBase,
    PipelineBase,
    decode,
    finish,
    not_sent_error,
    outcome,
    result,
    timeout_error,
)
from shardd.commands import Convert, to_dict
from shardd.errors import ConnectionClosed, ProtocolError, SharddError, Timeout
from shardd.near_cache import MISS
from shardd.placement import REDIRECTS, ROUTER, Placement, Plan
from shardd.protocol import Reply, encode_request
from shardd.transport_client import AsyncDealer

__all__ = ["AsyncClient", "AsyncPipeline"]

_getpid = os.getpid
_Get = protocol.Get


class AsyncClient(ClientBase):
    """An asyncio shardd client; safe to share between the coroutines of one loop.

    Arguments: see :class:`shardd.client_common.ClientBase` (``context``: a ``zmq.asyncio.Context``).
    """

    _dealer = AsyncDealer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: asyncio.Task[None] | None = None
        self._worker_readers: dict[str, asyncio.Task[None]] = {}

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the readers, fail waiting calls and close the connections; calling it again does nothing."""
        link, self._link = self._link, None
        if link is None:
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
        self._close_links(link)

    def pipeline(self) -> AsyncPipeline:
        """An AsyncPipeline that queues commands and sends them together on ``await execute()``."""
        return AsyncPipeline(self)

    # --- the connection and its reader -------------------------------------------------------

    def _fail_pending(self, make_error: Any) -> None:
        """Fail every waiting call with a fresh ``make_error()`` and forget them all."""
        pending = self._pending
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(make_error())
        pending.clear()

    def _live(self) -> AsyncDealer:
        """The router connection, checked for use after close, after fork and from another loop."""
        link = self._link
        if link is None:
            raise self._closed_error()
        if self._pid != _getpid():
            self._check_process()
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._bind(loop)
        reader = self._reader
        if reader is None or reader.done():
            self._reader = loop.create_task(self._read_replies(link), name=f"shardd reader {self.endpoint}")
        return link

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        old = self._loop
        if old is not None and not old.is_closed():
            raise RuntimeError(
                "this AsyncClient is in use by another event loop; create one AsyncClient per loop"
            )
        # The previous loop is gone (e.g. a finished asyncio.run), and with it its readers
        # and every call that was waiting in it.
        self._loop, self._reader = loop, None
        self._worker_readers.clear()
        self._pending.clear()

    async def _read_replies(self, link: AsyncDealer) -> None:
        """A reader task: resolve the future registered under each reply's id (Rule 1)."""
        pending = self._pending
        try:
            while True:
                frame = await link.recv()
                try:
                    reply = decode(frame)
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

    # --- one call ------------------------------------------------------------------------

    async def _call(self, op: protocol.Op, convert: Convert) -> Any:
        near = self._near
        if near is not None:
            if type(op) is _Get:
                return await self._near_get(op.key, convert)
            near.wrote(op)  # read-your-writes (near_cache, Rule 4)
        return result(await self._reply(op), convert)

    async def _reply(self, op: protocol.Op) -> Reply:
        link = self._live()
        placement = self.placement
        if placement is not None:
            shard = placement.route(op)
            if shard != ROUTER:
                reply = await self._direct(placement, shard, op)
                if reply is not None:
                    return reply
        return await self._exchange(link, op, self.endpoint)

    async def _near_get(self, key: bytes, convert: Convert) -> Any:
        """A GET through the near cache (shardd.near_cache): a kept copy, or near_get and maybe keep it."""
        now = time.monotonic()
        if self._feed is not None:
            value = self._near_lookup(key, now)
            if value is not MISS:
                return convert(value)
        if self._near_due(now):  # a hot key came from a feed we do not follow: learn where they are (<= 1/s)
            await self._follow_feeds(now)
        near = self._near
        assert near is not None
        writes = near.writes  # a write of ours sent while this read is out: not kept (near_cache, Rule 1)
        reply = await self._reply(near.request(key))
        if reply.status == protocol.BAD_REQUEST:  # a daemon without near_get: plain GETs from now on
            self._near_off()
            return result(await self._reply(_Get(key)), convert)
        return convert(self._near_admit(key, reply, now, writes))

    async def _follow_feeds(self, now: float) -> None:
        """Learn (again) where the workers' invalidation feeds are; a failure is retried a second later."""
        self._near_retry_at = now + 1.0
        try:
            if self.placement is not None:
                await self._refresh_topology()  # learns the feeds too (ClientBase._learn)
            else:
                self._near_learn(result(await self._exchange(self._live(), protocol.Topology(), self.endpoint),
                                        to_dict))
        except SharddError:
            pass  # reads go to the daemon meanwhile

    async def _exchange(self, link: AsyncDealer, op: protocol.Op, where: str | int,
                        send_within: float | None = None) -> Reply:
        """Send ``op`` on ``link`` (whose reader task is running) and await its Reply; raises Timeout.
        With ``send_within`` (a worker's link, direct mode), NotSent if it could not even be queued
        in that time."""
        rid = self._last_id = self._last_id % U64 + 1
        fut: asyncio.Future[Reply] = self._loop.create_future()  # type: ignore[union-attr]
        pending = self._pending
        pending[rid] = fut
        sent = False
        try:
            async with asyncio.timeout(self.timeout):
                if send_within is None:
                    await link.send(encode_request(rid, op))
                else:
                    async with asyncio.timeout(min(send_within, self.timeout)):
                        await link.send(encode_request(rid, op))
                sent = True
                return await fut
        except TimeoutError:
            if not sent and send_within is not None:
                raise not_sent_error(where, op) from None
            raise timeout_error(where, self.timeout, op) from None
        finally:
            pending.pop(rid, None)

    # --- direct mode: the I/O that shardd.placement asks for ------------------------------

    async def _direct(self, placement: Placement, shard: int, op: protocol.Op) -> Reply | None:
        """The Reply from the owning worker(s), or None to use the router instead."""
        if shard < 0:
            return await self._drive(placement.plan(op))
        try:
            reply: Any = await self._exchange(self._workers[shard], op, shard,  # type: ignore[arg-type]
                                              WORKER_SEND_GRACE_S)
        except Timeout as exc:
            reply = exc
        else:
            if reply.status not in REDIRECTS:
                return reply
        return await self._drive(placement.plan(op, shard, reply))

    async def _drive(self, plan: Plan) -> Reply | None:
        """Run a placement plan to its end, doing each step's I/O."""
        try:
            step = next(plan)
            while True:
                try:
                    done = await self._step(step)
                except Timeout as exc:
                    step = plan.throw(exc)
                else:
                    step = plan.send(done)
        except StopIteration as stop:
            return stop.value

    async def _scatter(self, steps: list[tuple[int, protocol.Op]]) -> list[Any]:
        """Every (shard, op) in flight at once; a Reply or Timeout each (other failures raise)."""
        outcomes = await asyncio.gather(
            *(self._exchange(self._to(shard), op, shard, None if shard < 0 else WORKER_SEND_GRACE_S)
              for shard, op in steps), return_exceptions=True)
        for out in outcomes:
            if isinstance(out, BaseException) and not isinstance(out, Timeout):
                raise out
        return outcomes

    async def _refresh_topology(self) -> None:
        """Fetch the topology through the router, learn it, connect to and read every worker it names."""
        self._learn(result(await self._exchange(self._live(), protocol.Topology(), self.endpoint), to_dict))
        readers = self._worker_readers
        for endpoint, link in self._worker_links.items():
            reader = readers.get(endpoint)
            if reader is None or reader.done():
                readers[endpoint] = self._loop.create_task(  # type: ignore[union-attr]
                    self._read_replies(link), name=f"shardd reader {endpoint}")

    # --- pipelines -------------------------------------------------------------------------

    async def _execute(self, calls: list[Call], raise_on_error: bool) -> list[Any]:
        link = self._live()
        if not calls:
            return []
        near = self._near
        if near is not None:
            for op, _ in calls:
                near.wrote(op)
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
                        rid = self._last_id = self._last_id % U64 + 1
                        fut = loop.create_future()
                        pending[rid] = fut
                        ids.append(rid)
                        futures.append(fut)
                        await link.send(encode_request(rid, op))
            if futures:
                await asyncio.wait(futures, timeout=max(0.0, deadline - loop.time()))
        finally:
            for rid in ids:
                pending.pop(rid, None)
        results: list[Any] = [UNANSWERED] * len(calls)
        for index, fut in enumerate(futures):
            if fut.done():
                exc = fut.exception()
                results[index] = exc if exc is not None else outcome(fut.result(), calls[index][1])
            else:
                fut.cancel()
        return finish(results, raise_on_error, self.endpoint, self.timeout)


class AsyncPipeline(PipelineBase):
    """Commands queued on an AsyncClient and sent together by ``await execute()``."""

    __slots__ = ()

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Send every queued command, then return their results in call order (see AsyncClient rules)."""
        return await self._client._execute(self._take(), raise_on_error)
