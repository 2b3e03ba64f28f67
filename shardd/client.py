"""The blocking shardd client: the I/O of every command, over one connection to the router.

Theory of operation
-------------------
Each request is one frame ``[version, id, op]`` and each reply one frame
``[id, status, value]`` (see :mod:`shardd.protocol`). The client numbers its requests
with a private counter and matches replies by id, because the daemon may answer
pipelined requests in any order. The commands are written once in
:mod:`shardd.commands`; this class only sends what they build (``_call``). Its collaborators
are constructor arguments, as in pymemcache's ``HashClient``: the connection
(:mod:`shardd.transport_client`), the value serde (:mod:`shardd.serde`) and, in direct mode,
the placement and retry policy (:class:`shardd.placement.Placement`).

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
Rule 4: a request that timed out while the daemon was unreachable is not delivered later
        (the connection queues only on a live connection: transport_client, Invariant 2).
Rule 5: a client is not thread-safe: use one per thread. Create it in the process that
        uses it; a client carried across ``fork`` refuses to work.
Rule 6: with ``direct=True`` (or a ``placement``) keyed and multi-key ops skip the router and
        go to the owning worker's own endpoint, as :mod:`shardd.placement` decides; this class
        only does the I/O that policy asks for. Admin ops and pipelines always go through
        the router.

The client owns its connections (to the router, and in direct mode to each worker); the
ZeroMQ Context is shared and never terminated here.
"""

from __future__ import annotations

import os
import time
from typing import Any

from shardd import protocol
from shardd.client_common import (
    DEFAULT_ENDPOINT,
    DEFAULT_TIMEOUT,
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
from shardd.errors import SharddError, Timeout
from shardd.near_cache import MISS
from shardd.placement import REDIRECTS, ROUTER, Placement, Plan
from shardd.protocol import Reply, encode_request
from shardd.transport_client import Dealer

__all__ = ["DEFAULT_ENDPOINT", "DEFAULT_TIMEOUT", "Client", "Pipeline"]

_monotonic = time.monotonic
_Get = protocol.Get
_getpid = os.getpid


class Client(ClientBase):
    """A blocking shardd client; one per thread (see the module docstring).

    Arguments: see :class:`shardd.client_common.ClientBase` (``context``: a ``zmq.Context``).
    """

    _dealer = Dealer

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections; calling it again does nothing."""
        link, self._link = self._link, None
        if link is not None:
            self._close_links(link)

    def pipeline(self) -> Pipeline:
        """A Pipeline that queues commands and sends them together on ``execute()``."""
        return Pipeline(self)

    # --- one call ------------------------------------------------------------------------

    def _live(self) -> Dealer:
        link = self._link
        if link is None:
            raise self._closed_error()
        if self._pid != _getpid():
            self._check_process()
        return link

    def _call(self, op: protocol.Op, convert: Convert) -> Any:
        near = self._near
        if near is not None:
            if type(op) is _Get:
                return self._near_get(op.key, convert)
            near.wrote(op)  # read-your-writes (near_cache, Rule 4)
        return result(self._reply(op), convert)

    def _reply(self, op: protocol.Op) -> Reply:
        link = self._live()
        placement = self.placement
        if placement is not None:
            shard = placement.route(op)
            if shard != ROUTER:
                reply = self._direct(placement, shard, op)
                if reply is not None:
                    return reply
        return self._exchange(link, op, self.endpoint)

    def _near_get(self, key: bytes, convert: Convert) -> Any:
        """A GET through the near cache (shardd.near_cache): a kept copy, or near_get and maybe keep it."""
        now = _monotonic()
        if self._feed is not None:
            value = self._near_lookup(key, now)
            if value is not MISS:
                return convert(value)
        if self._near_due(now):  # a hot key came from a feed we do not follow: learn where they are (<= 1/s)
            self._follow_feeds(now)
        near = self._near
        assert near is not None
        writes = near.writes
        reply = self._reply(near.request(key))
        if reply.status == protocol.BAD_REQUEST:  # a daemon without near_get: plain GETs from now on
            self._near_off()
            return result(self._reply(_Get(key)), convert)
        return convert(self._near_admit(key, reply, now, writes))

    def _follow_feeds(self, now: float) -> None:
        """Learn (again) where the workers' invalidation feeds are; a failure is retried a second later."""
        self._near_retry_at = now + 1.0
        try:
            if self.placement is not None:
                self._refresh_topology()  # learns the feeds too (ClientBase._learn)
            else:
                self._near_learn(result(self._exchange(self._live(), protocol.Topology(), self.endpoint), to_dict))
        except SharddError:
            pass  # reads go to the daemon meanwhile

    def _exchange(self, link: Dealer, op: protocol.Op, where: str | int, send_within: float | None = None) -> Reply:
        """Send ``op`` on ``link`` and return its Reply; raises Timeout (Rule 2). With ``send_within``
        (a worker's link, direct mode), NotSent if it could not even be queued in that time."""
        rid = self._last_id = self._last_id % U64 + 1
        now = _monotonic()
        deadline = now + self.timeout
        send_by = deadline if send_within is None else min(deadline, now + send_within)
        if not link.send(encode_request(rid, op), send_by):
            if send_within is None:
                raise timeout_error(where, self.timeout, op)
            raise not_sent_error(where, op)
        reply = self._await(link, rid, deadline)
        if reply is not None:
            return reply
        raise timeout_error(where, self.timeout, op)

    def _await(self, link: Dealer, rid: int, deadline: float) -> Reply | None:
        """The Reply with id ``rid`` from ``link``, or None at ``deadline`` (Rules 1 and 3)."""
        while (frame := link.recv(deadline)) is not None:
            reply = decode(frame)
            if reply.id == rid:
                return reply
        return None

    # --- direct mode: the I/O that shardd.placement asks for ------------------------------

    def _direct(self, placement: Placement, shard: int, op: protocol.Op) -> Reply | None:
        """The Reply from the owning worker(s), or None to use the router instead."""
        if shard < 0:
            return self._drive(placement.plan(op))
        try:
            reply: Any = self._exchange(self._workers[shard], op, shard, WORKER_SEND_GRACE_S)
        except Timeout as exc:
            reply = exc
        else:
            if reply.status not in REDIRECTS:
                return reply
        return self._drive(placement.plan(op, shard, reply))

    def _drive(self, plan: Plan) -> Reply | None:
        """Run a placement plan to its end, doing each step's I/O."""
        try:
            step = next(plan)
            while True:
                try:
                    done = self._step(step)
                except Timeout as exc:
                    step = plan.throw(exc)
                else:
                    step = plan.send(done)
        except StopIteration as stop:
            return stop.value

    def _scatter(self, steps: list[tuple[int, protocol.Op]]) -> list[Any]:
        """Send every (shard, op) before awaiting any; a Reply, Timeout or None (not sent) each."""
        now = _monotonic()
        deadline = now + self.timeout
        send_by = min(deadline, now + WORKER_SEND_GRACE_S)  # a worker not connected: the router takes it
        sent = []
        for shard, op in steps:
            rid = self._last_id = self._last_id % U64 + 1
            link = self._to(shard)
            sent.append((link, rid) if link.send(encode_request(rid, op), deadline if shard < 0 else send_by) else None)
        outcomes: list[Any] = []
        for (shard, op), out in zip(steps, sent, strict=True):
            reply = self._await(*out, deadline) if out is not None else None
            if reply is None and out is not None:
                reply = timeout_error(shard, self.timeout, op)
            outcomes.append(reply)
        return outcomes

    def _refresh_topology(self) -> None:
        """Fetch the topology through the router, learn it, connect to every worker it names."""
        self._learn(result(self._exchange(self._live(), protocol.Topology(), self.endpoint), to_dict))

    # --- pipelines -------------------------------------------------------------------------

    def _execute(self, calls: list[Call], raise_on_error: bool) -> list[Any]:
        link = self._live()
        if not calls:
            return []
        near = self._near
        if near is not None:
            for op, _ in calls:
                near.wrote(op)
        deadline = _monotonic() + self.timeout
        waiting: dict[int, int] = {}  # request id -> index in calls
        for index, (op, _) in enumerate(calls):
            rid = self._last_id = self._last_id % U64 + 1
            if not link.send(encode_request(rid, op), deadline):
                break
            waiting[rid] = index
        results: list[Any] = [UNANSWERED] * len(calls)
        while waiting and (frame := link.recv(deadline)) is not None:
            reply = decode(frame)
            index = waiting.pop(reply.id, -1)
            if index >= 0:
                results[index] = outcome(reply, calls[index][1])
        return finish(results, raise_on_error, self.endpoint, self.timeout)


class Pipeline(PipelineBase):
    """Commands queued on a Client and sent together; not thread-safe, like its Client."""

    __slots__ = ()

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Send every queued command, then return their results in call order (see Client rules)."""
        return self._client._execute(self._take(), raise_on_error)
