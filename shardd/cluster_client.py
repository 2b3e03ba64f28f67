"""Cluster clients: every shardd command against a cluster of nodes (docs/cluster.md).

Theory of operation
-------------------
:class:`ClusterClient` (blocking) and :class:`AsyncClusterClient` (asyncio) mix in
:class:`shardd.commands.Commands`, like :class:`~shardd.client.Client`, so they have the same
commands with the same arguments and results. Their ``_call`` only does I/O: which node gets
each request, and what to do when a node answers MOVED, TRYAGAIN or UNAVAILABLE ``cluster:``
or does not answer at all, is :mod:`shardd.cluster_routing`'s sans-IO policy (its Rules),
written once and driven here as :class:`shardd.placement.Placement`'s plans are driven by
the clients:

* a keyed op whose slot has a known owner goes to that node at once (``route``); a reply the
  policy does not need to see is the result, with no plan and no extra cost;
* anything else runs a plan: each :class:`~shardd.cluster_routing.Send` is one exchange with
  a node, a list of them is sent before any is awaited, a :class:`~shardd.cluster_routing.Sleep`
  is a wait. A node's Timeout is handed back to the plan, which decides (Rule 5 there).

The I/O to one node is a plain :class:`~shardd.client.Client` or
:class:`~shardd.aclient.AsyncClient`, created on first use and kept for the life of the cluster
client, whatever the map's epoch. With ``direct=True`` (the default) it is in direct mode: a
keyed op goes straight to the owning worker of the owning node (slot → node → shard), which
checks the slot as the node's router would; a cluster answer (MOVED with a slot, TRYAGAIN or
UNAVAILABLE ``cluster:``) goes to the cluster policy, an in-node one (a resize's MOVED, a
worker gone) to the node client's own direct-mode policy (shardd.placement). A node whose
topology lists no worker endpoints (replicas on: writes must pass its router) is used through
its router. Multi-key and fan-out ops always go through the node's router. Values are encoded
once, by the cluster client's serde, before a node client sees them.

Rules
-----
Rule 1: ``timeout`` bounds each exchange with one node, as for Client. A call retries within
        ``failover_timeout`` seconds of its first trouble (shardd.cluster_routing, Rule 6), so
        it returns or raises within about ``failover_timeout`` plus 3 ``timeout``s (the first
        exchange, and a map fetch and a retry started just before that deadline). When a node
        dies, reads and writes alike are retried on the slot's new owner once the map names
        one: the dead node's copy is gone with it (cluster_routing, Rule 5, also says when a
        write can count twice).
Rule 2: the map is learnt lazily, from the seeds, by the first call; ``topology()`` refreshes
        it. If no seed gives a cluster map and one is a single daemon, not a cluster node, the
        call raises ConfigError ("tcp://… is not a cluster node"): treating it as a one-node
        cluster would hide a wrong seed list.
Rule 3: a pipeline sends one round with every op whose nodes the map names (keyed ops to their
        owner, multi-key ops split by node, fan-out ops to every node; each node gets its share
        in call order), then plans each op that needs more (MOVED, a timeout …) on its own, in
        call order. Results are in call order, errors in place, as Client's pipeline. It is not
        a transaction: an op that needed more may land after later ops of the same key, and
        each request a stale map sent to the wrong node costs one MOVED.
Rule 4: not thread-safe, like Client: one per thread (an AsyncClusterClient: one per event
        loop, shared by its coroutines). ``close()`` / ``aclose()`` close every node's
        connection.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, ClassVar

from shardd import protocol
from shardd.aclient import AsyncClient
from shardd.client import Client
from shardd.client_common import (
    DEFAULT_TIMEOUT,
    U64,
    WORKER_SEND_GRACE_S,
    PipelineBase,
    check_endpoint,
    check_timeout,
    decode,
    finish,
    not_sent_error,
    outcome,
    result,
    timeout_error,
)
from shardd.cluster_routing import ClusterRouting, Plan, Send, needs_plan
from shardd.commands import Codec, Commands, Convert
from shardd.errors import ConnectionClosed, Timeout
from shardd.placement import REDIRECTS
from shardd.protocol import Reply, encode_request
from shardd.serde import Serde
from shardd.slots import SlotMap

__all__ = ["AsyncClusterClient", "AsyncClusterPipeline", "ClusterClient", "ClusterPipeline"]

# How long a request may wait for a connection to a node before it counts as not sent (NotSent:
# nothing applied, the node is likely down): a live connection queues at once.
SEND_GRACE_S = WORKER_SEND_GRACE_S

_monotonic = time.monotonic
_sleep = time.sleep
_KEYED = frozenset(protocol.SINGLE_KEY_OPS)


def from_cluster(reply: Reply) -> bool:
    """A worker's answer that is the cluster's business (its slot is not served there now),
    not the node's own direct-mode policy's (a resize inside the node)."""
    value = reply.value
    if reply.status == protocol.MOVED:
        return type(value) is dict and "slot" in value
    return type(value) is str and value.startswith("cluster:")


def _seed_list(seeds: object) -> list[str]:
    """Seeds as a list: one endpoint, a comma-separated string of them, or a list."""
    if isinstance(seeds, str):
        seeds = [part.strip() for part in seeds.split(",") if part.strip()]
    elif isinstance(seeds, list | tuple):
        seeds = [check_endpoint(seed) for seed in seeds]
    else:
        raise TypeError(f"seeds must be an endpoint str or a list of them, not {type(seeds).__name__}")
    if not seeds:
        raise ValueError("a cluster client needs at least one seed endpoint")
    return seeds


class _ClusterBase(Commands):
    """What ClusterClient and AsyncClusterClient hold alike: settings, the policy, node clients.

    ``seeds``: one or more node endpoints to learn the slot map from (a list, or a str with
    commas). ``timeout``: seconds per exchange with a node. ``curve``: keys from
    :func:`shardd.load_curve`, the same for every node. ``serde``: as for Client.
    ``failover_timeout``: seconds a call keeps retrying after its first trouble (see the
    module's Rule 1). ``context``: the ZeroMQ Context (``zmq.Context`` for ClusterClient,
    ``zmq.asyncio.Context`` for AsyncClusterClient; default: the shared instance).
    """

    _node_client: ClassVar[type]  # the plain client used for one node's I/O

    def __init__(self, seeds: str | list[str], timeout: float = DEFAULT_TIMEOUT, curve: Any = None, *,
                 serde: Serde | None = None, failover_timeout: float = 10.0, context: Any = None,
                 direct: bool = True) -> None:
        self.seeds = _seed_list(seeds)
        self.direct = direct
        self._learned: set[str] = set()  # nodes whose in-node topology was fetched (direct mode)
        self.timeout = check_timeout(timeout)
        self.serde = serde
        self._codec = Codec(serde)
        self._curve = curve
        self._context = context
        self._routing = ClusterRouting(self.seeds, failover_timeout)
        self._nodes: dict[str, Any] = {}  # endpoint -> node client, kept across epochs
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<shardd.{type(self).__name__} {','.join(self.seeds)} epoch={self._routing.epoch} {state}>"

    @property
    def closed(self) -> bool:
        """True once the client has been closed."""
        return self._closed

    @property
    def cluster_map(self) -> SlotMap | None:
        """The slot map learnt so far (None before the first call)."""
        return self._routing.map

    @property
    def failover_timeout(self) -> float:
        return self._routing.failover_timeout

    @property
    def redirects(self) -> int:
        """MOVED replies followed, ask included (a stale map costs one per slot)."""
        return self._routing.redirects

    @property
    def retries(self) -> int:
        """TRYAGAIN, UNAVAILABLE cluster, lagging nodes' MOVED and node timeouts met, each to be retried."""
        return self._routing.retries

    @property
    def refreshes(self) -> int:
        """Slot maps fetched from a node (whether or not newer)."""
        return self._routing.refreshes

    def _node(self, endpoint: str) -> Any:
        """The client for the node at ``endpoint``, created on first use."""
        node = self._nodes.get(endpoint)
        if node is None:
            if self._closed:
                raise ConnectionClosed(f"this {type(self).__name__} is closed")
            node = self._nodes[endpoint] = self._node_client(
                endpoint, timeout=self.timeout, context=self._context, curve=self._curve, direct=self.direct)
        return node

    def _worker_for(self, endpoint: str, node: Any, op: protocol.Op) -> int:
        """The node's shard for a keyed op in direct mode, or -1: through the node's router."""
        placement = node.placement
        if placement is None or type(op) not in _KEYED or endpoint not in self._learned:
            return -1
        return placement.route(op) if placement.shards else -1

    def _merge(self, calls: list[tuple[protocol.Op, Convert]], outs: list[Any], raise_on_error: bool) -> list[Any]:
        results = [out if isinstance(out, BaseException) else outcome(out, convert)
                   for out, (_, convert) in zip(outs, calls, strict=True)]
        return finish(results, raise_on_error, "the cluster", self.timeout)


class ClusterClient(_ClusterBase):
    """A blocking client of a shardd cluster; one per thread (see the module docstring)."""

    _node_client = Client

    def __enter__(self) -> ClusterClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every node's connection; calling it again does nothing."""
        self._closed = True
        nodes, self._nodes = self._nodes, {}
        for node in nodes.values():
            node.close()

    def pipeline(self) -> ClusterPipeline:
        """A ClusterPipeline that queues commands and sends them together on ``execute()`` (Rule 3)."""
        return ClusterPipeline(self)

    def _call(self, op: protocol.Op, convert: Convert) -> Any:
        routing = self._routing
        endpoint = routing.route(op)
        if endpoint is None:
            return result(self._drive(routing.plan(op)), convert)
        out = self._send(endpoint, op)
        if type(out) is Reply and not needs_plan(out):
            return result(out, convert)
        return result(self._drive(routing.plan(op, endpoint, out)), convert)

    def _execute(self, calls: list[tuple[protocol.Op, Convert]], raise_on_error: bool) -> list[Any]:
        if self._closed:
            raise ConnectionClosed(f"this {type(self).__name__} is closed")
        if not calls:
            return []
        return self._merge(calls, self._drive(self._routing.plan_batch([op for op, _ in calls])), raise_on_error)

    def _drive(self, plan: Plan) -> Any:
        """Run a plan to its end, doing each step's I/O."""
        try:
            step = next(plan)
            while True:
                kind = type(step)
                if kind is Send:
                    out: Any = self._send(*step)
                elif kind is list:
                    out = self._scatter(step)
                else:
                    _sleep(step.seconds)
                    out = None
                step = plan.send(out)
        except StopIteration as stop:
            return stop.value
        finally:
            plan.close()

    def _send(self, endpoint: str, op: protocol.Op) -> Any:
        """One exchange with a node: its Reply, or the Timeout (NotSent included)."""
        node = self._node(endpoint)
        try:
            if self.direct and endpoint not in self._learned and type(op) in _KEYED:
                self._learned.add(endpoint)
                node._refresh_topology()  # once; the node client refreshes it itself after that
            shard = self._worker_for(endpoint, node, op)
            if shard >= 0:
                try:
                    reply: Any = node._exchange(node._workers[shard], op, shard, WORKER_SEND_GRACE_S)
                except Timeout as exc:
                    reply = exc
                if type(reply) is Reply and (reply.status not in REDIRECTS or from_cluster(reply)):
                    return reply
                out = node._drive(node.placement.plan(op, shard, reply))  # in-node trouble
                if out is not None:
                    return out
            return node._exchange(node._live(), op, endpoint, SEND_GRACE_S)
        except Timeout as exc:
            return exc

    def _scatter(self, steps: list[Send]) -> list[Any]:
        """Send every step before awaiting any; a Reply or Timeout each, in order."""
        if len(steps) == 1:
            return [self._send(*steps[0])]
        now = _monotonic()
        deadline = now + self.timeout
        send_by = min(deadline, now + SEND_GRACE_S)  # absolute: several dead nodes cost one grace
        outcomes: list[Any] = [None] * len(steps)
        waiting: dict[str, tuple[Any, dict[int, int]]] = {}  # endpoint -> (link, request id -> index)
        for index, (endpoint, op) in enumerate(steps):
            node = self._node(endpoint)
            entry = waiting.get(endpoint)
            if entry is None:
                entry = waiting[endpoint] = (node._live(), {})
            rid = node._last_id = node._last_id % U64 + 1
            if entry[0].send(encode_request(rid, op), send_by):
                entry[1][rid] = index
            else:
                outcomes[index] = not_sent_error(endpoint, op)
        # A node's replies wait in its socket while another's are read: one deadline for all.
        for endpoint, (link, ids) in waiting.items():
            while ids and (frame := link.recv(deadline)) is not None:
                reply = decode(frame)
                index = ids.pop(reply.id, -1)  # another id: a late reply (Client, Rule 1)
                if index >= 0:
                    outcomes[index] = reply
            for index in ids.values():
                outcomes[index] = timeout_error(endpoint, self.timeout, steps[index].op)
        return outcomes


class AsyncClusterClient(_ClusterBase):
    """An asyncio client of a shardd cluster; safe to share between the coroutines of one loop."""

    _node_client = AsyncClient

    async def __aenter__(self) -> AsyncClusterClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every node's connection and fail the calls waiting on them; calling it again does nothing."""
        self._closed = True
        nodes, self._nodes = self._nodes, {}
        for node in nodes.values():
            await node.aclose()

    def pipeline(self) -> AsyncClusterPipeline:
        """An AsyncClusterPipeline that queues commands and sends them on ``await execute()`` (Rule 3)."""
        return AsyncClusterPipeline(self)

    async def _call(self, op: protocol.Op, convert: Convert) -> Any:
        routing = self._routing
        endpoint = routing.route(op)
        if endpoint is None:
            return result(await self._drive(routing.plan(op)), convert)
        out = await self._send(endpoint, op)
        if type(out) is Reply and not needs_plan(out):
            return result(out, convert)
        return result(await self._drive(routing.plan(op, endpoint, out)), convert)

    async def _execute(self, calls: list[tuple[protocol.Op, Convert]], raise_on_error: bool) -> list[Any]:
        if self._closed:
            raise ConnectionClosed(f"this {type(self).__name__} is closed")
        if not calls:
            return []
        outs = await self._drive(self._routing.plan_batch([op for op, _ in calls]))
        return self._merge(calls, outs, raise_on_error)

    async def _drive(self, plan: Plan) -> Any:
        """Run a plan to its end, doing each step's I/O."""
        try:
            step = next(plan)
            while True:
                kind = type(step)
                if kind is Send:
                    out: Any = await self._send(*step)
                elif kind is list:
                    out = await self._scatter(step)
                else:
                    await asyncio.sleep(step.seconds)
                    out = None
                step = plan.send(out)
        except StopIteration as stop:
            return stop.value
        finally:
            plan.close()

    async def _send(self, endpoint: str, op: protocol.Op) -> Any:
        """One exchange with a node: its Reply, or the Timeout (NotSent included)."""
        node = self._node(endpoint)
        try:
            if self.direct and endpoint not in self._learned and type(op) in _KEYED:
                self._learned.add(endpoint)
                await node._refresh_topology()  # once; the node client refreshes it itself after that
            shard = self._worker_for(endpoint, node, op)
            if shard >= 0:
                try:
                    reply: Any = await node._exchange(node._workers[shard], op, shard, WORKER_SEND_GRACE_S)
                except Timeout as exc:
                    reply = exc
                if type(reply) is Reply and (reply.status not in REDIRECTS or from_cluster(reply)):
                    return reply
                out = await node._drive(node.placement.plan(op, shard, reply))  # in-node trouble
                if out is not None:
                    return out
            return await node._exchange(node._live(), op, endpoint, SEND_GRACE_S)
        except Timeout as exc:
            return exc

    async def _scatter(self, steps: list[Send]) -> list[Any]:
        """Every step in flight at once; a Reply or Timeout each, in order (other failures raise)."""
        outcomes = await asyncio.gather(*(self._send(*step) for step in steps), return_exceptions=True)
        for out in outcomes:
            if isinstance(out, BaseException) and not isinstance(out, Timeout):
                raise out
        return outcomes


class ClusterPipeline(PipelineBase):
    """Commands queued on a ClusterClient and sent together (its Rule 3); not thread-safe."""

    __slots__ = ()

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Send every queued command, then return their results in call order."""
        return self._client._execute(self._take(), raise_on_error)


class AsyncClusterPipeline(PipelineBase):
    """Commands queued on an AsyncClusterClient and sent together by ``await execute()``."""

    __slots__ = ()

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Send every queued command, then return their results in call order."""
        return await self._client._execute(self._take(), raise_on_error)
