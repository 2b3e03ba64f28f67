"""Cluster routing, sans-IO: which node each op goes to, and what to do when a node says no.

Theory of operation
-------------------
A cluster client (:mod:`shardd.cluster_client`) holds one :class:`ClusterRouting`: the slot
map it has learnt (docs/cluster.md, a :class:`shardd.slots.SlotMap`) and every decision of the
cluster policy. This module does no I/O, as :mod:`shardd.placement` does none for direct mode;
the blocking and the asyncio client both drive it, so the policy is written once. They ask it:

* :meth:`ClusterRouting.route`, the hot path, one call per op: for a keyed op whose slot has a
  known owner, that node's endpoint. The client sends the op there itself and returns the reply
  unless :func:`needs_plan` says the policy must handle it (MOVED, TRYAGAIN, UNAVAILABLE
  ``cluster:``), or the node did not answer; None means "drive a plan".
* :meth:`ClusterRouting.plan`: everything else, as a generator that yields the I/O it needs
  and receives the outcome:

  - :class:`Send` ``(endpoint, op)``: send ``op`` to that node; send back its Reply, or the
    :class:`~shardd.errors.Timeout` (:class:`~shardd.errors.NotSent` included) instead;
  - a list of Send: send them all before awaiting any; send back one outcome each, in order;
  - :class:`Sleep` ``(seconds)``: wait; send back None.

  The map itself is fetched with ``Send(endpoint, Topology())`` steps whose replies the plan
  adopts. A plan returns the final Reply (OK, or an error the client raises as it would from
  one daemon), or raises the Timeout of a node that stayed unreachable.
  :meth:`ClusterRouting.plan_batch` does the same for a pipeline's ops.

Rules
-----
Rule 1: a key goes to ``map.nodes[map.owners[slot_of(key)]]``. A map is adopted only from the
        cluster first learnt (its name) and only if its epoch is higher than the map held: a
        higher epoch always wins, a lower one never replaces a newer map.
Rule 2: MOVED applied nothing. Its epoch above ours: refresh the map from the node that
        answered (it holds that epoch), then send to the endpoint named; equal: send there;
        below ours: that node is behind, so back off and retry at our map's owner (so too,
        after that refresh, when it names no endpoint: it knows no owner yet). With ``ask``:
        send this one request to the endpoint named and keep the map (unless that node already
        failed in this call: back off as for "behind"). More than MAX_REDIRECTS + 2 per slot of
        the op redirects in one call raise Moved (nodes that disagree for that long).
Rule 3: TRYAGAIN (slot frozen mid-handoff) applied nothing: back off 1, 2, 4 … ms, at most
        MAX_BACKOFF_S, and retry at the map's owner.
Rule 4: UNAVAILABLE with text starting ``cluster:`` (that node has no valid lease or map)
        applied nothing: refresh the map from another node, back off, retry at the map's owner
        (the same node again, if the map still names it: it may be about to get its lease).
Rule 5: a node that does not answer (Timeout, NotSent) may be dead. Refresh the map from other
        nodes (the map's, then the seeds; never one that timed out in this call) until it names
        another owner, then retry there. Reads and writes alike: when the owner changes, the
        dead node's copy is gone and the slot starts empty on its new owner (docs/cluster.md),
        so the retried write is the one that counts. A node that was only slow keeps its lease
        and its slots, the map does not change, and its Timeout is raised: nothing is retried
        on a node that may have applied the op. (With replicas, a write the dead owner already
        streamed is applied again by the promoted replica's retry: incr and append may count
        twice there.)
Rule 6: the retries of Rules 2 (behind), 3, 4 and 5 end ``failover_timeout`` seconds after the
        call's first trouble; the last trouble is then raised: the node's Timeout, TryAgain or
        Unavailable. An exchange started before that may still take up to the client timeout.
Rule 7: a multi-key op is split by owner node and the parts sent together. A part answered by
        Rules 2-5 applied nothing there: after handling it, its keys are placed again (a
        MOVED's slot to the endpoint it names, the rest by the map). Any other error ends the
        call with it; other parts may have been applied, as with one daemon's router.
Rule 8: fan-out ops go to every node of the map at once (no retries): ping, flush and tune
        return the sum, maintenance whether every node is in that mode, stats, health and
        hotkeys ``{"cluster", "epoch", "nodes": {node id: reply}}`` with a failed node's entry
        ``{"error": message}``; any other op (resize) ``{"nodes": {node id: reply}}``. Outside
        observations, a node's error is the call's. ``topology`` refreshes the map and
        describes it (:meth:`ClusterRouting.describe`).
Rule 9: one ClusterRouting per client. Plans of one AsyncClusterClient run concurrently over the
        same map, and fetch it one at a time: a call that wants a fresh map while another's
        fetch is under way backs off until it ends, and fetches none itself if a map has been
        fetched since its trouble (or a MOVED's epoch has arrived). So a dead node costs one
        fetch per poll, not one per waiting call. Skipping is safe: a map that still names a
        node that failed this call only brings another round of Rule 5.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterable
from typing import Any, NamedTuple

import msgspec

from shardd import protocol
from shardd.client_common import server_error
from shardd.commands import bad_reply
from shardd.errors import ConfigError, ProtocolError, SharddError, Timeout
from shardd.placement import merge_split
from shardd.slots import SLOTS, SlotMap, slot_of, slots_of

__all__ = ["MAX_BACKOFF_S", "MAX_REDIRECTS", "ClusterRouting", "Send", "Sleep", "backoff", "needs_plan"]

MAX_REDIRECTS = 16      # Rule 2: a handoff costs at most a MOVED and an ask; 16 is nodes disagreeing
MAX_BACKOFF_S = 0.05    # Rule 3: a freeze lasts while a slot's entries move: poll it at 20 Hz at worst
CLUSTER_PREFIX = "cluster:"

_OK, _MOVED, _TRYAGAIN, _UNAVAILABLE = protocol.OK, protocol.MOVED, protocol.TRYAGAIN, protocol.UNAVAILABLE
_KEYED = frozenset(protocol.SINGLE_KEY_OPS)
_MULTI = frozenset(protocol.MULTI_KEY_OPS)
_SUMS = frozenset((protocol.Ping, protocol.Flush, protocol.Tune))
_OBSERVE = frozenset((protocol.Stats, protocol.Health, protocol.Hotkeys))


class Send(NamedTuple):
    """A step: send ``op`` to the node at ``endpoint``; the outcome is its Reply or the Timeout."""

    endpoint: str
    op: Any


class Sleep(NamedTuple):
    """A step: wait ``seconds``; the outcome is None."""

    seconds: float


Step = Send | list[Send] | Sleep
Plan = Generator[Step, Any, Any]
Waiting = list[tuple[list[int], str | None]]  # positions of keys still to send, and a forced endpoint
Part = tuple[str, list[int]]  # a node's endpoint and the positions of the keys sent there


def backoff(attempt: int) -> float:
    """The wait before retry ``attempt`` (0, 1, …): 1, 2, 4 … ms, at most MAX_BACKOFF_S (Rule 3)."""
    return min(0.001 * (1 << min(attempt, 16)), MAX_BACKOFF_S)


def needs_plan(reply: protocol.Reply) -> bool:
    """Whether ``reply`` is one the policy handles (Rules 2-4) rather than the caller's result."""
    status = reply.status
    if status == _OK:
        return False
    if status in (_MOVED, _TRYAGAIN):
        return True
    return status == _UNAVAILABLE and _is_cluster_text(reply.value)


def _is_cluster_text(value: Any) -> bool:
    return type(value) is str and value.startswith(CLUSTER_PREFIX)


def _keys_of(op: Any) -> list[bytes]:
    if type(op) is protocol.SetMany:
        return [key for key, _ in op.items]
    return op.keys


def _sub(op: Any, positions: list[int], size: int) -> Any:
    """The part of ``op`` holding the keys at ``positions`` (sorted); ``op`` itself for all of them."""
    if len(positions) == size:
        return op
    if type(op) is protocol.SetMany:
        items = op.items
        return protocol.SetMany([items[p] for p in positions], op.ttl_ms)
    keys = op.keys
    return type(op)([keys[p] for p in positions])


class _Run:
    """One call's retry state (Rules 2-6)."""

    __slots__ = ("attempt", "dead", "deadline", "error", "fetch", "moved", "redirects", "sleep", "ticket", "unsure")

    def __init__(self) -> None:
        self.deadline: float | None = None   # set at the first trouble (Rule 6)
        self.error: Any = None               # the last trouble: a Timeout, or a Reply to raise
        self.dead: set[str] = set()          # nodes that timed out in this call (Rule 5)
        self.unsure: set[str] = set()        # nodes that said UNAVAILABLE cluster (Rule 4)
        self.redirects = 0
        self.attempt = 0                     # backoff exponent
        self.ticket = 0                      # maps fetched before the last trouble (Rule 9)
        self.sleep = False                   # back off before the next round
        self.fetch = False                   # refresh the map before the next round
        self.moved: tuple[str, int] | None = None  # refresh from this node if its epoch is newer

    def trouble(self, routing: ClusterRouting, error: Any) -> None:
        self.error = error
        if self.deadline is None:
            self.deadline = routing.clock() + routing.failover_timeout
        self.ticket = routing.refreshes


class ClusterRouting:
    """One cluster client's view of the slot map and its routing policy (see the module docstring).

    ``seeds``: endpoints to learn the map from; ``failover_timeout``: Rule 6's budget in
    seconds; ``clock``: a monotonic clock in seconds (tests inject one).
    """

    __slots__ = ("_fetching", "_owners", "_rotor", "clock", "failover_timeout", "map", "name",
                 "redirects", "refreshes", "retries", "seeds")

    def __init__(self, seeds: Iterable[str], failover_timeout: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.seeds = list(seeds)
        if not self.seeds:
            raise ValueError("a cluster client needs at least one seed endpoint")
        if isinstance(failover_timeout, bool) or not isinstance(failover_timeout, int | float) \
                or not 0 <= failover_timeout < math.inf:
            raise ValueError(f"failover_timeout must be a finite number of seconds >= 0, got {failover_timeout!r}")
        self.failover_timeout = float(failover_timeout)
        self.clock = clock
        self.map: SlotMap | None = None
        self.name: str | None = None           # the cluster's name, from the first map (Rule 1)
        self._owners: list[str | None] = []    # the owner's endpoint per slot: route()'s one lookup
        self.redirects = 0                     # MOVED replies followed (ask included)
        self.retries = 0                       # replies and timeouts of Rules 2 (behind) to 5, each to be retried
        self.refreshes = 0                     # topology fetches answered with a map of this cluster
        self._fetching = 0                     # fetches under way (Rule 9)
        self._rotor = 0                        # spreads refreshes over the nodes

    def __repr__(self) -> str:
        epoch = self.map.epoch if self.map is not None else None
        return f"<shardd.ClusterRouting {self.name!r} epoch={epoch}>"

    @property
    def epoch(self) -> int:
        """The epoch of the map held; 0 before the first."""
        return self.map.epoch if self.map is not None else 0

    # --- the map (Rule 1) --------------------------------------------------------------

    def adopt(self, topology: Any) -> bool:
        """Take the map of a ``topology`` reply if it is newer (Rule 1); True if it was taken.

        Raises ConfigError if the node that sent it is not a cluster node.
        """
        kind = self._take(topology)
        if kind == "single":
            raise ConfigError("this topology has no cluster field: the node is not a cluster node")
        return kind == "new"

    def _take(self, topology: Any) -> str:
        """Adopt when newer; "new", "old" (not newer), "foreign" (another cluster) or "single"."""
        cluster = topology.get("cluster") if type(topology) is dict else None
        if cluster is None:
            return "single"
        if type(cluster) is dict and cluster.get("map", 0) is None:
            return "old"  # a cluster node with no map yet (its etcd unreachable, or just started)
        try:
            name = cluster["name"]
            new = SlotMap.from_wire(cluster["map"])
        except (KeyError, TypeError, msgspec.ValidationError) as exc:
            raise ProtocolError(f"expected a cluster topology with a name and a slot map: {exc}") from None
        owners, count = new.owners, len(new.nodes)
        if len(owners) != SLOTS or min(owners) < -1 or max(owners) >= count:
            raise ProtocolError(f"a slot map needs {SLOTS} owners in -1..{count - 1}")
        if self.name is not None and name != self.name:
            return "foreign"
        if self.map is not None and new.epoch <= self.map.epoch:
            return "old"
        self.map, self.name = new, name
        endpoints = [node.endpoint for node in new.nodes]
        self._owners = [endpoints[i] if i >= 0 else None for i in owners]
        return "new"

    def describe(self) -> dict[str, Any]:
        """The map as learnt: what ``topology`` returns on a cluster client (Rule 8)."""
        m = self.map
        if m is None:
            return {"cluster": None, "epoch": 0, "shards": 0, "nodes": {}}
        slots = Counter(m.owners)
        return {
            "cluster": {"name": self.name, "map": m.to_wire()},
            "epoch": m.epoch,
            "shards": sum(node.shards for node in m.nodes),
            "nodes": {node.id: {"endpoint": node.endpoint, "shards": node.shards, "slots": slots.get(i, 0)}
                      for i, node in enumerate(m.nodes)},
        }

    def _candidates(self, avoid: set[str], prefer: str | None = None) -> list[str]:
        """Where to fetch the map: ``prefer``, the map's nodes (rotating), then the seeds (Rule 5)."""
        nodes = [node.endpoint for node in self.map.nodes] if self.map is not None else []
        if nodes:
            turn = self._rotor = (self._rotor + 1) % len(nodes)
            nodes = nodes[turn:] + nodes[:turn]
        seen = set(avoid)
        out = []
        for endpoint in ([prefer] if prefer else []) + nodes + self.seeds:
            if endpoint not in seen:
                seen.add(endpoint)
                out.append(endpoint)
        return out

    def _fetch(self, candidates: list[str], until: float | None = None) -> Generator[Step, Any, SharddError | None]:
        """Ask each candidate for its topology until one gives this cluster's map; None then,
        else what went wrong (the error to raise when there is no map at all). Past ``until``
        (a call's deadline, Rule 6) no further candidate is asked."""
        self._fetching += 1
        last: Any = None
        single = None
        try:
            for endpoint in candidates:
                if until is not None and last is not None and self.clock() >= until:
                    break
                out = yield Send(endpoint, protocol.Topology())
                if isinstance(out, Timeout) or out.status != _OK:
                    last = out
                    continue
                try:
                    kind = self._take(out.value)
                except ProtocolError as exc:
                    last = exc
                    continue
                if kind == "single":
                    single = endpoint
                elif kind != "foreign":
                    self.refreshes += 1
                    return None
        finally:  # also when the plan is closed mid-fetch (a cancelled call): nobody waits for it then
            self._fetching -= 1
        if single is not None:
            return ConfigError(f"{single} is not a cluster node (its topology has no cluster field);"
                               f" use shardd.Client for a single daemon")
        if isinstance(last, SharddError):
            return last
        if last is not None:
            return server_error(last)
        return ConfigError(f"no node to learn the cluster map from (seeds: {', '.join(self.seeds)})")

    def _bootstrap(self) -> Plan:
        """The first map: from the seeds, or the call fails with why."""
        attempt = 0
        while self._fetching and self.map is None:  # Rule 9: another call is learning it: wait for that
            yield Sleep(backoff(attempt))
            attempt += 1
        if self.map is not None:
            return
        error = yield from self._fetch(self._candidates(set()))
        if error is not None and self.map is None:
            raise error

    # --- the plans ---------------------------------------------------------------------

    def route(self, op: Any) -> str | None:
        """The endpoint of the node owning a keyed op's slot, or None: drive :meth:`plan`."""
        owners = self._owners
        if owners and type(op) in _KEYED:
            return owners[slot_of(op.key)]
        return None

    def plan(self, op: Any, endpoint: str | None = None, outcome: Any = None) -> Plan:
        """The whole policy for ``op`` as a generator of I/O steps (see the module docstring).

        A client that already sent a keyed op to ``endpoint`` (route()'s fast path) passes what
        came back as ``outcome``: a Reply for which needs_plan() is true, or the Timeout.
        """
        cls = type(op)
        if cls in _KEYED or cls in _MULTI:
            first = None if outcome is None else [(endpoint, list(range(len(_keys_of(op)))) if cls in _MULTI else [0])]
            return (yield from self._plan_keys(op, first, [outcome]))
        if self.map is None:
            yield from self._bootstrap()
        elif cls is protocol.Topology:
            yield from self._fetch(self._candidates(set()))  # failing, the map already held is the answer
        if cls is protocol.Topology:
            return protocol.Reply(0, _OK, self.describe())
        nodes = list(self.map.nodes)  # type: ignore[union-attr]
        outcomes = (yield [Send(node.endpoint, op) for node in nodes]) if nodes else []
        return self._combine(op, nodes, outcomes)

    def plan_batch(self, ops: list[Any]) -> Plan:
        """A pipeline: one round with every op whose nodes are known (keyed ops to their owner,
        multi-key ops split, fan-out ops to every node), in call order, so that each node gets
        its requests in that order; then, in call order, each op that needs more is planned on
        its own. Returns a Reply or a SharddError per op, in order."""
        if ops and self.map is None:
            yield from self._bootstrap()
        sends: list[Send] = []
        firsts: list[Any] = []  # per op: (its sends, first index in the round), or None: plan it later
        for op in ops:
            cls = type(op)
            if cls in _KEYED or cls in _MULTI:
                slots = slots_of(_keys_of(op)) if cls in _MULTI else [slot_of(op.key)]
                parts, left = self._place([(list(range(len(slots))), None)], slots, set())
                if left or not parts:
                    firsts.append(None)
                    continue
                firsts.append((parts, len(sends)))
                sends.extend(Send(where, _sub(op, positions, len(slots))) for where, positions in parts)
            elif cls is protocol.Topology:
                firsts.append(None)
            else:
                nodes = list(self.map.nodes)  # type: ignore[union-attr]
                firsts.append((nodes, len(sends)))
                sends.extend(Send(node.endpoint, op) for node in nodes)
        outcomes = (yield sends) if sends else []
        results: list[Any] = []
        for op, first in zip(ops, firsts, strict=True):
            try:
                if first is None:
                    results.append((yield from self.plan(op)))
                    continue
                parts, at = first
                outs = outcomes[at:at + len(parts)]
                if type(op) in _KEYED and type(outs[0]) is protocol.Reply and not needs_plan(outs[0]):
                    results.append(outs[0])
                elif type(op) in _KEYED or type(op) in _MULTI:
                    results.append((yield from self._plan_keys(op, parts, outs)))
                else:
                    results.append(self._combine(op, parts, outs))
            except SharddError as exc:
                results.append(exc)
        return results

    def _plan_keys(self, op: Any, first: list[Part] | None, outcomes: list[Any]) -> Plan:
        """Keyed and multi-key ops: Rules 2-7; a keyed op is a multi-key op of one key. ``first``:
        the parts already sent (endpoint, positions of their keys) and their ``outcomes``."""
        multi = type(op) in _MULTI
        slots = slots_of(_keys_of(op)) if multi else [slot_of(op.key)]
        size = len(slots)
        if not size:
            return merge_split(op, {})
        run = _Run()
        parts: dict[int, tuple[Any, list[int]]] = {}  # OK values of multi-key parts, with their positions
        waiting: Waiting = []
        if first is None:
            if self.map is None:
                yield from self._bootstrap()
            waiting.append((list(range(size)), None))
            sends: list[Part] = []
            outcomes = []
        else:
            sends = first
        while True:
            for (where, positions), out in zip(sends, outcomes, strict=True):
                final = self._judge(out, where, positions, slots, multi, run, waiting, parts)
                if final is not None:
                    return final
            if not waiting:
                return merge_split(op, parts)  # only multi-key ops get here: a keyed op's OK is final
            final = yield from self._recover(run)
            if final is not None:
                return final
            sends, left = self._place(waiting, slots, run.dead)
            waiting = []
            if left:  # no owner, or one that timed out in this call: wait for the map to change
                waiting.append((left, None))
                slot = slots[left[0]]
                why = (f"slot {slot} has no owner in map epoch {self.epoch}" if self.map is not None else
                       "no node answered with a slot map yet (a node has none until it reaches etcd)")
                run.trouble(self, run.error or protocol.Reply(0, _UNAVAILABLE, f"{CLUSTER_PREFIX} {why}"))
                run.sleep = run.fetch = True
            steps = [Send(where, _sub(op, positions, size)) for where, positions in sends]
            outcomes = [(yield steps[0])] if len(steps) == 1 else (yield steps) if steps else []

    def _judge(self, out: Any, where: str, positions: list[int], slots: list[int], multi: bool, run: _Run,
               waiting: Waiting, parts: dict[int, tuple[Any, list[int]]]) -> protocol.Reply | None:
        """Take one part's outcome: the call's final Reply, or None with the part put back to wait."""
        if isinstance(out, Timeout):  # Rule 5
            self.retries += 1
            run.trouble(self, out)
            run.dead.add(where)
            run.fetch = True
            waiting.append((positions, None))
            return None
        status = out.status
        if status == _OK:
            if not multi:
                return out
            parts[len(parts)] = (out.value, positions)
            return None
        if status == _MOVED:
            return self._moved(out, where, positions, slots, run, waiting)
        if status == _TRYAGAIN:  # Rule 3
            run.sleep = True
        elif status == _UNAVAILABLE and _is_cluster_text(out.value):  # Rule 4
            run.unsure.add(where)
            run.fetch = run.sleep = True
        else:
            return out
        self.retries += 1
        run.trouble(self, out)
        waiting.append((positions, None))
        return None

    def _moved(self, reply: protocol.Reply, where: str, positions: list[int], slots: list[int], run: _Run,
               waiting: Waiting) -> protocol.Reply | None:
        """Rule 2, and Rule 7's re-split: the MOVED's slot to the endpoint named, the rest by the map."""
        value = reply.value
        try:
            epoch, slot, target = value["epoch"], value["slot"], value["endpoint"]
            ask = value.get("ask") is True
        except (TypeError, KeyError, AttributeError):
            raise bad_reply("a cluster MOVED {epoch, slot, node, endpoint}", value) from None
        if type(epoch) is not int or type(slot) is not int or not (type(target) is str or target is None):
            raise bad_reply("a cluster MOVED {epoch, slot, node, endpoint}", value)
        # That node is behind, or knows no owner yet; or it asks us to try a handoff's source that
        # did not answer in this call (dead: the controller drops its handoffs within a lease TTL).
        if target is None or (not ask and epoch < self.epoch) or (ask and target in run.dead):
            self.retries += 1
            run.trouble(self, reply)
            run.sleep = True
            if epoch > self.epoch:
                run.moved = (where, epoch)
            waiting.append((positions, None))
            return None
        run.redirects += 1
        # A multi-key op meets one MOVED per slot in handoff (a node names only the first key it
        # does not serve) and an ask each: budget per slot, so a wide get_many rides out a rebalance.
        limit = MAX_REDIRECTS + 2 * len(set(slots))
        if run.redirects > limit:
            return protocol.Reply(reply.id, _MOVED, f"{CLUSTER_PREFIX} still redirected after {limit}"
                                                    f" redirects; the last said {value!r}")
        self.redirects += 1
        if not ask and epoch > self.epoch:
            run.moved = (where, epoch)
        mine = [p for p in positions if slots[p] == slot]
        if mine and len(mine) < len(positions):
            waiting.append(([p for p in positions if slots[p] != slot], None))
        waiting.append((mine or positions, target))
        return None

    def _recover(self, run: _Run) -> Generator[Step, Any, protocol.Reply | None]:
        """Back off and refresh as the last round's outcomes asked (Rules 2-5), or give up (Rule 6)."""
        if run.sleep or run.fetch:
            assert run.deadline is not None
            left = run.deadline - self.clock()
            if left <= 0:
                error = run.error
                if isinstance(error, BaseException):
                    raise error
                return error
            if run.sleep:
                yield Sleep(min(backoff(run.attempt), left))
                run.attempt += 1
        moved, fetch = run.moved, run.fetch
        run.sleep = run.fetch = False
        run.moved = None
        wanted = moved[1] if moved is not None and moved[1] > self.epoch else 0  # the epoch a MOVED named
        if wanted:
            prefer: str | None = moved[0]  # type: ignore[index]
        elif fetch and self.refreshes <= run.ticket:
            prefer = None
        else:  # Rule 9: a map fetched since the trouble is as good as one fetched now
            return None
        # Rule 9: one fetch at a time: wait for the one under way, then see whether it was enough.
        until = run.deadline if run.deadline is not None else self.clock() + self.failover_timeout
        while self._fetching and self.clock() < until:
            yield Sleep(backoff(run.attempt))
            run.attempt += 1
            if (self.epoch >= wanted) if wanted else (self.refreshes > run.ticket):
                return None
        yield from self._fetch(self._candidates(run.dead | run.unsure, prefer), run.deadline)
        return None

    def _place(self, waiting: Waiting, slots: list[int], dead: set[str]) -> tuple[list[Part], list[int]]:
        """Group the waiting keys by the node to send them to; also the positions that have none
        (no owner, or one in ``dead``)."""
        groups: dict[str, list[int]] = {}
        left: list[int] = []
        owners = self._owners
        for positions, forced in waiting:
            if forced is not None and forced not in dead:
                groups.setdefault(forced, []).extend(positions)
                continue
            for p in positions:
                owner = owners[slots[p]] if owners else None
                if owner is None or owner in dead:
                    left.append(p)
                else:
                    group = groups.get(owner)
                    if group is None:
                        groups[owner] = [p]
                    else:
                        group.append(p)
        # Sorted positions: each part keeps the caller's key order, and one part of every key is op itself.
        return [(where, sorted(positions)) for where, positions in groups.items()], sorted(left)

    def _combine(self, op: Any, nodes: list[Any], outcomes: list[Any]) -> protocol.Reply:
        """One reply from every node's outcome of a fan-out op (Rule 8)."""
        m = self.map
        assert m is not None
        cls = type(op)
        if cls in _OBSERVE:
            per: dict[str, Any] = {}
            for node, out in zip(nodes, outcomes, strict=True):
                if isinstance(out, Timeout):
                    per[node.id] = {"error": str(out)}
                elif out.status != _OK:
                    per[node.id] = {"error": str(server_error(out))}
                else:
                    per[node.id] = out.value
            return protocol.Reply(0, _OK, {"cluster": self.name, "epoch": m.epoch, "nodes": per})
        for out in outcomes:
            if isinstance(out, Timeout):
                raise out
            if out.status != _OK:
                return out
        values = [out.value for out in outcomes]
        if cls in _SUMS:
            for value in values:
                if type(value) is not int:
                    raise bad_reply("an int", value)
            return protocol.Reply(0, _OK, sum(values))
        if cls is protocol.Maintenance:
            for value in values:
                if type(value) is not bool:
                    raise bad_reply("a bool", value)
            return protocol.Reply(0, _OK, all(values))
        return protocol.Reply(0, _OK, {"nodes": {node.id: value for node, value in zip(nodes, values, strict=True)}})
