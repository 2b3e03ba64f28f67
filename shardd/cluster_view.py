"""What one cluster node serves, slot by slot: the router's gate in cluster mode, sans-IO.

Theory of operation
-------------------
The node's cluster agent installs each published slot map (``install``) and keeps extending
the lease (``valid_until``); the agent also drives the handoffs this node is the source of
(``freeze`` then ``give``), and a peer's agent tells us when a handoff to us is complete
(``adopt``). From those the view keeps one state per slot, so that the router's check of a
request is one hash and one lookup (``refusal``):

* SERVE  — this node is the slot's authority: apply the request;
* FROZEN — this node is handing the slot over right now: TRYAGAIN (nothing applied);
* MOVED  — another node is the authority: MOVED naming the map owner;
* ASK    — this node owns the slot in the map, but its previous owner is still handing it over:
           MOVED with ``ask`` naming that node (the client keeps its map);
* NOBODY — the map has no owner for it (no live member): UNAVAILABLE.

docs/cluster.md, "Authority for a slot", is the rule these states implement.

Rules
-----
Rule 1: nothing is served before the first map, nor at or after ``valid_until`` (fencing: the
        agent sets it before etcd can expire the node's lease and give its slots away).
Rule 2: a map with a lower epoch than the installed one is ignored.
Rule 3: the local steps of a handoff (frozen, given, adopted) hold only while the map keeps the
        slot's (owner, previous owner) pair; a map that changes the pair resets them.
Rule 4: a slot this node starts to serve without a handoff starts empty: ``install`` returns it,
        and the router deletes its entries on every shard before any later request reaches them
        (the shard links are FIFO, so no request needs to wait). A map that only finalizes a
        handoff this node adopted is not such a start, nor is one that promotes this node from
        the slot's replica to its owner (its copy is the data, up to the replication lag).
Rule 5: with replicas on, every key written here is noted (``dirty``) until the agent pulls it
        and streams its state to the slot's replica; a slot this node stops being the replica of
        (and does not serve) is emptied. ``dirty`` is bounded: past ``DIRTY_LIMIT`` keys it is
        dropped and ``overflow`` set, and the agent copies every slot to its replica again.
"""

from __future__ import annotations

from typing import Any

from shardd.errors import Moved, TryAgain, Unavailable
from shardd.slots import SLOT_SEED, SLOTS, SlotMap, slot_of

__all__ = ["ASK", "FROZEN", "MOVED", "NOBODY", "SERVE", "ClusterView"]

SERVE, FROZEN, MOVED, ASK, NOBODY = range(5)
DIRTY_LIMIT = 1_000_000
_NAMES = ("serve", "frozen", "moved", "ask", "nobody")


class ClusterView:
    """One node's view: its id, the installed map, the lease deadline and each slot's state."""

    def __init__(self, cluster: str, node_id: str) -> None:
        self.cluster = cluster
        self.node_id = node_id
        self.map: SlotMap | None = None
        self.epoch = 0  # the installed map's (a worker's copy has the states, not the map)
        self.valid_until = 0.0  # Rule 1: monotonic seconds; 0 = no lease yet
        self.state = bytearray([NOBODY]) * SLOTS
        self.target = [-1] * SLOTS  # node index the MOVED/ASK answer names
        self.frozen: set[int] = set()
        self.given: set[int] = set()
        self.adopted: set[int] = set()
        self._pairs: list[tuple[str | None, str | None]] = [(None, None)] * SLOTS
        self._replica_ids: list[str | None] = [None] * SLOTS
        self.replicated = False  # the map has replicas (Rule 5)
        self.dirty: set[bytes] = set()
        self.overflow = False
        self._redirects: list[dict[str, Any]] = []  # per node index: the MOVED value's fixed part

    # --- the router's check (hot path) -------------------------------------------------

    def refusal(self, key: bytes, now: float) -> tuple[int, Any] | None:
        """None if this node serves ``key`` now; else the (status, value) to answer."""
        if now >= self.valid_until:
            return self._lapsed()
        slot = slot_of(key)
        state = self.state[slot]
        if state == SERVE:
            return None
        return self._answer(slot, state)

    def refusal_many(self, keys: list[bytes], now: float) -> tuple[int, Any] | None:
        """For a multi-key op: the answer for the first key not served here, else None."""
        if now >= self.valid_until:
            return self._lapsed()
        state = self.state
        for key in keys:
            slot = slot_of(key)
            if state[slot] != SERVE:
                return self._answer(slot, state[slot])
        return None

    def lapsed(self, now: float) -> bool:
        return now >= self.valid_until

    def _lapsed(self) -> tuple[int, str]:
        if self.epoch == 0:
            return Unavailable.status, f"cluster: node {self.node_id} has no slot map yet; ask another node"
        return Unavailable.status, (f"cluster: node {self.node_id} cannot renew its membership lease; "
                                    f"it serves nothing until it can; ask another node")

    def _answer(self, slot: int, state: int) -> tuple[int, Any]:
        if state == FROZEN:
            return TryAgain.status, f"cluster: slot {slot} is being handed over; retry shortly"
        if state == NOBODY:
            return Unavailable.status, f"cluster: slot {slot} has no owner (no live member)"
        value = {"epoch": self.epoch, "slot": slot, **self._redirects[self.target[slot]]}
        if state == ASK:
            value["ask"] = True
        return Moved.status, value

    # --- the agent's steps ------------------------------------------------------------

    def install(self, new: SlotMap) -> list[int]:
        """Take a published map (Rules 2-4); returns the slots to empty before serving them."""
        if self.map is not None and new.epoch < self.map.epoch:
            return []
        first = self.map is None
        me = new.index_of(self.node_id)
        ids = [node.id for node in new.nodes]
        purge = []
        state, target, pairs = self.state, self.target, self._pairs
        old_replicas = self._replica_ids
        new_replicas = [ids[r] if r >= 0 else None for r in new.replicas] if new.replicas else [None] * SLOTS
        for slot in range(SLOTS):
            owner = new.owners[slot]
            source = new.handoff.get(slot)
            was_replica = old_replicas[slot] == self.node_id
            pair = (ids[owner] if owner >= 0 else None, ids[source] if source is not None else None)
            was_serving = state[slot] == SERVE
            if pair != pairs[slot]:  # Rule 3
                pairs[slot] = pair
                self.frozen.discard(slot)
                self.given.discard(slot)
                if not (slot in self.adopted and owner == me and source is None):
                    self.adopted.discard(slot)
            if owner < 0:
                state[slot], target[slot] = NOBODY, -1
            elif source is not None and source == me:  # we hand it over: ours until given
                state[slot] = FROZEN if slot in self.frozen else MOVED if slot in self.given else SERVE
                target[slot] = owner
            elif owner == me and source is not None:  # handed to us: ours once adopted
                state[slot] = SERVE if slot in self.adopted else ASK
                target[slot] = source
            elif owner == me:
                state[slot], target[slot] = SERVE, owner
                if slot in self.adopted:
                    self.adopted.discard(slot)  # the map now says so itself
                elif (not was_serving and not was_replica) or first:  # Rule 4 (and what a warm restart kept)
                    purge.append(slot)
            else:
                state[slot], target[slot] = MOVED, owner
                if was_replica and new_replicas[slot] != self.node_id:  # Rule 5
                    purge.append(slot)
        if first:  # keep what we serve; drop what a warm restart kept for slots served elsewhere
            purge = [slot for slot in range(SLOTS) if state[slot] != SERVE]
        self.map = new
        self.epoch = new.epoch
        self._replica_ids = new_replicas
        self.replicated = bool(new.replicas)
        if not self.replicated:
            self.dirty.clear()
        self._redirects = [{"node": node.id, "endpoint": node.endpoint} for node in new.nodes]
        return purge

    def note_write(self, key: bytes) -> None:
        """Rule 5: a write to ``key`` was routed here; its state goes to the replica on the next pull."""
        dirty = self.dirty
        dirty.add(key)
        if len(dirty) > DIRTY_LIMIT:
            dirty.clear()
            self.overflow = True

    def pull_dirty(self, limit: int) -> list[bytes]:
        dirty = self.dirty
        if len(dirty) <= limit:
            keys = list(dirty)
            dirty.clear()
            return keys
        return [dirty.pop() for _ in range(limit)]

    def _mine_to_hand(self, slots: list[int]) -> list[int]:
        me = self.map.index_of(self.node_id) if self.map is not None else -1
        return [s for s in slots if me >= 0 and self.map is not None and self.map.handoff.get(s) == me]

    def freeze(self, slots: list[int]) -> list[int]:
        """Slots this node hands over stop being served (TRYAGAIN); returns those frozen."""
        frozen = self._mine_to_hand(slots)
        for slot in frozen:
            self.frozen.add(slot)
            self.state[slot] = FROZEN
        return frozen

    def give(self, slots: list[int]) -> list[int]:
        """Handed over: answer MOVED to the owner from now on; returns those given."""
        given = self._mine_to_hand(slots)
        for slot in given:
            self.frozen.discard(slot)
            self.given.add(slot)
            self.state[slot] = MOVED
        return given

    def adopt(self, slots: list[int]) -> list[int]:
        """Every entry of these slots has arrived: serve them; returns those adopted."""
        me = self.map.index_of(self.node_id) if self.map is not None else -1
        adopted = []
        for slot in slots:
            if me >= 0 and self.map is not None and self.map.owners[slot] == me:
                self.adopted.add(slot)
                self.state[slot] = SERVE
                adopted.append(slot)
        return adopted

    # --- a worker's copy (direct mode on a cluster node) --------------------------------------

    def export(self) -> dict[str, Any]:
        """What a worker needs to answer its own endpoint as the router would: the states, the
        redirect targets and the epoch (msgpack-friendly)."""
        return {"epoch": self.epoch, "state": bytes(self.state), "target": self.target,
                "redirects": self._redirects}

    def load(self, exported: dict[str, Any]) -> None:
        """Take a router's ``export()`` (the lease comes separately: ``valid_until``)."""
        self.epoch = exported["epoch"]
        self.state = bytearray(exported["state"])
        self.target = list(exported["target"])
        self._redirects = list(exported["redirects"])

    # --- reporting -------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Slots per state (stats, cluster status)."""
        counts = dict.fromkeys(_NAMES, 0)
        for state in self.state:
            counts[_NAMES[state]] += 1
        return counts

    def stats(self, now: float) -> dict[str, Any]:
        return {
            "name": self.cluster,
            "node": self.node_id,
            "epoch": self.map.epoch if self.map is not None else 0,
            "lease_left_s": round(max(0.0, self.valid_until - now), 3),
            "slots": self.counts(),
            "replicas": self.replicated,
            "replication_pending": len(self.dirty),  # keys written here, not yet sent to their replica
        }

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.cluster,
            "node": self.node_id,
            "map": self.map.to_wire() if self.map is not None else None,
            "slot_seed": SLOT_SEED,
        }
