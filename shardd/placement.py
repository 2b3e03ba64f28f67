"""Direct mode, sans-IO: where a client sends each op, and what it does when a shard says no.

Theory of operation
-------------------
A direct-mode client (``Client(direct=True)``, or ``placement=Placement(...)``) skips the
router for keyed and multi-key ops: it learns the daemon's topology (shard count and each
worker's own endpoint) from the router, places each key with the daemon's hash
(:func:`shardd.hashing.shard_for`, docs/design.md decision 1) and talks to the owning worker.
This module holds every decision of that policy and does no I/O, as h11 holds HTTP's:

* :meth:`Placement.route` is the hot path, one call per op: the shard a keyed op goes to
  (the client sends it there itself), :data:`ROUTER` for ops only the router answers, or
  :data:`PLAN` when the policy must drive (no topology yet, a multi-key op).
* :meth:`Placement.plan` is everything else, written once for both clients: a generator that
  yields the I/O it needs and receives the outcome. It yields

  - :data:`REFRESH`: fetch the topology through the router and call :meth:`Placement.learn`;
    the client sends back None;
  - ``(shard, op)``: send ``op`` to that shard's worker (``shard`` = :data:`ROUTER`: through
    the router) and send back its Reply, or throw in the :class:`~shardd.errors.Timeout`;
  - a list of ``(shard, op)``: send them all before awaiting any (the shards work in
    parallel) and send back one outcome each: a Reply, a Timeout, or None if it was not sent.

  It returns the final Reply, or None: "send the op through the router instead".

Rules
-----
Rule 1: a worker that no longer owns a key answers MOVED without applying anything: refresh
        the topology and retry at the new owner, at most ``moved_retries`` times, then use the
        router. A part of a multi-key op answered MOVED goes through the router at once.
Rule 2: TRYAGAIN (mid-resize, the key's entry may still be on its way to this shard) applied
        nothing: the op goes through the router, which orders it after the entry.
Rule 3: after a timeout from a worker, the op is retried only if a shrink removed that worker
        (a removed shard holds no keys and answers MOVED until it stops, so it cannot have
        applied the op), or if it was never sent (NotSent: no connection, e.g. the worker
        restarted on another port): then it goes through the router after a topology refresh.
        Any other timeout is the caller's, as through the router.
Rule 4: placement is by the topology's shard count, which during a resize is still the old one
        (MOVED names new owners). A topology in which some shard has no endpoint yet is not
        usable (``shards == 0``): ops go through the router until a later refresh.
Rule 5: a Placement holds one client's view of the topology: give each client its own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator
from typing import Any

from shardd import protocol
from shardd.errors import NotSent, ProtocolError, Timeout
from shardd.hashing import group_positions, shard_for, shards_for

__all__ = ["PLAN", "REDIRECTS", "REFRESH", "ROUTER", "Placement", "merge_split", "split_by_shard"]

ROUTER = -1   # route(): send through the router; as a shard in a step: the router
PLAN = -2     # route(): drive plan(op)
REFRESH = "refresh"  # a step of plan(): fetch the topology, then learn() it
REDIRECTS = frozenset((protocol.MOVED, protocol.TRYAGAIN))  # statuses that applied nothing: plan() takes over

_KEYED = frozenset(protocol.SINGLE_KEY_OPS)
_MULTI = frozenset(protocol.MULTI_KEY_OPS)

Hasher = Callable[[bytes, int], int]
Step = Any  # REFRESH | tuple[int, protocol.Op] | list[tuple[int, protocol.Op]]
Plan = Generator[Step, Any, "protocol.Reply | None"]


class Placement:
    """One client's direct-mode policy and its view of the topology (see the module docstring).

    ``hasher(key, shards)`` must be the daemon's placement function; only tests pass another.
    """

    __slots__ = ("endpoints", "epoch", "hasher", "moved_retries", "shards")

    def __init__(self, hasher: Hasher = shard_for, moved_retries: int = 3) -> None:
        if isinstance(moved_retries, bool) or not isinstance(moved_retries, int) or moved_retries < 1:
            raise ValueError(f"moved_retries must be an int >= 1, got {moved_retries!r}")
        self.hasher = hasher
        self.moved_retries = moved_retries
        self.shards = 0                       # 0: no usable topology (Rule 4)
        self.epoch = 0
        self.endpoints: list[str | None] = []  # each shard's own endpoint, by shard id

    def __repr__(self) -> str:
        return f"<shardd.Placement shards={self.shards} epoch={self.epoch}>"

    def route(self, op: Any) -> int:
        """The shard a keyed op goes to, ROUTER, or PLAN (see the module docstring)."""
        cls = type(op)
        if cls in _KEYED:
            shards = self.shards
            return self.hasher(op.key, shards) if shards else PLAN
        return PLAN if cls in _MULTI else ROUTER

    def learn(self, topology: dict[str, Any]) -> None:
        """Take a ``topology`` reply (the router's view now) as this client's placement."""
        try:
            endpoints = [endpoint or None for endpoint in topology["endpoints"]]
            shards = topology["shards"]
        except (KeyError, TypeError) as exc:
            raise ProtocolError(f"expected a topology with shards and endpoints, got {topology!r:.80}") from exc
        self.endpoints = endpoints
        self.epoch = topology.get("epoch", 0)
        usable = type(shards) is int and 0 < shards <= len(endpoints) and all(endpoints[:shards])
        self.shards = shards if usable else 0

    def forget(self) -> None:
        """Drop the placement: the next direct op refreshes the topology first."""
        self.shards = 0

    def plan(self, op: Any, shard: int = PLAN, outcome: Any = None) -> Plan:
        """The whole policy for ``op`` as a generator of I/O steps (see the module docstring).

        A client that already sent a keyed op to ``shard`` (route()'s fast path) passes what
        came back as ``outcome``: a Reply whose status is in REDIRECTS, or the Timeout.
        """
        if outcome is None and not self.shards:
            yield REFRESH
            if not self.shards:
                return None
        if type(op) in _MULTI:
            return (yield from self._plan_multi(op))
        if outcome is None:
            shard = self.hasher(op.key, self.shards)
        for _ in range(self.moved_retries):
            if outcome is None:
                if not self._has(shard):
                    return None
                try:
                    outcome = yield (shard, op)
                except Timeout as exc:
                    outcome = exc
            reply, outcome = outcome, None
            if isinstance(reply, NotSent):  # Rule 3: never sent, so nothing applied: the router, now
                yield REFRESH
                return None
            if isinstance(reply, Timeout):
                yield REFRESH
                if self._has(shard):  # Rule 3: still there, so it may have applied the op
                    raise reply
                return None
            status = reply.status
            if status == protocol.TRYAGAIN:  # Rule 2
                return None
            if status != protocol.MOVED:
                return reply
            yield REFRESH  # Rule 1
            moved_to = reply.value.get("shard") if isinstance(reply.value, dict) else None
            shard = moved_to if type(moved_to) is int else self.hasher(op.key, max(1, self.shards))
        return None

    def _plan_multi(self, op: Any) -> Plan:
        """Split per owning shard, send every part, merge; a part a worker could not answer uses the router."""
        parts = split_by_shard(op, self.shards, self.hasher)
        # Every shard below self.shards has an endpoint (Rule 4), so every part can go direct.
        outcomes = yield [(shard, sub) for shard, (sub, _) in parts.items()]
        results: dict[int, tuple[Any, list[int]]] = {}
        for (shard, (sub, positions)), reply in zip(parts.items(), outcomes, strict=True):
            if isinstance(reply, NotSent):
                reply = None  # Rule 3: never sent
            elif isinstance(reply, Timeout):
                yield REFRESH
                if self._has(shard):  # Rule 3
                    raise reply
                reply = None
            if reply is None or reply.status in REDIRECTS:  # Rules 1 and 2
                self.shards = 0  # re-learn before the next direct op
                reply = yield (ROUTER, sub)
            if reply.status != protocol.OK:
                return reply
            results[shard] = (reply.value, positions)
        return merge_split(op, results)

    def _has(self, shard: int) -> bool:
        return 0 <= shard < len(self.endpoints) and self.endpoints[shard] is not None


def split_by_shard(op: Any, shards: int, hasher: Hasher = shard_for) -> dict[int, tuple[Any, list[int]]]:
    """One sub-op per owning shard of a multi-key op, with the positions of its keys in ``op``.

    With the daemon's own hasher every key is placed by one ``shards_for`` call and each part
    picked by C-level maps: no Python call per key. Keys all on one shard: ``op`` itself.
    """
    is_set = type(op) is protocol.SetMany
    pairs = op.items if is_set else op.keys
    keys = next(zip(*pairs, strict=True), ()) if is_set else pairs
    owners = shards_for(keys, shards) if hasher is shard_for else [hasher(key, shards) for key in keys]
    if owners and owners.count(owners[0]) == len(owners):
        return {owners[0]: (op, list(range(len(owners))))}
    pick = pairs.__getitem__
    parts = {}
    for shard, positions in group_positions(owners).items():
        picked = list(map(pick, positions))
        sub: Any = protocol.SetMany(picked, op.ttl_ms) if is_set else type(op)(picked)
        parts[shard] = (sub, positions)
    return parts


def merge_split(op: Any, results: dict[int, tuple[Any, list[int]]]) -> protocol.Reply:
    """The Reply the router would have sent for ``op``, from each part's OK value and positions."""
    if type(op) is protocol.GetMany:
        size = len(op.keys)
        if len(results) == 1:  # one part with every key, in order
            [(part, positions)] = results.values()
            if type(part) is list and len(part) == size:
                return protocol.Reply(0, protocol.OK, part)
        values: list[Any] = [None] * size
        put = values.__setitem__
        for part, positions in results.values():
            if type(part) is not list or len(part) != len(positions):
                raise ProtocolError(f"expected a list of {len(positions)} values in reply, got {part!r:.80}")
            deque(map(put, positions, part), 0)  # values[positions[i]] = part[i], in C
        return protocol.Reply(0, protocol.OK, values)
    return protocol.Reply(0, protocol.OK, sum(part for part, _ in results.values()))
