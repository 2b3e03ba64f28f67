"""Cluster placement, pure: key → slot, and the slot map every node and client share.

docs/cluster.md is the description; this module is the reference implementation. A key's slot
is ``xxh3_64(key, seed=SLOT_SEED) & (SLOTS - 1)``: a seed other than the in-node hash's
(docs/design.md, decisions 1 and 9), so that the keys of one node still spread over all of its
shards. No I/O here.

A slot's owner is the top rendezvous (HRW) choice among the live members (``score``,
``assign``); the controller's whole decision is ``next_map``, a pure function of the current
map, the members and the sources' done records, so that any process given the same inputs
publishes the same map (tests/unit/test_slots.py checks it with property tests).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Annotated, Any, NamedTuple

import msgspec
import xxhash

from shardd.hashing import MAX_SHARDS, shards_for

__all__ = [
    "SLOTS",
    "SLOT_SEED",
    "Done",
    "KeyImbalance",
    "Member",
    "Node",
    "SlotMap",
    "assign",
    "hrw_order",
    "imbalance",
    "key_imbalance",
    "moved_fraction",
    "next_map",
    "owner_ids",
    "score",
    "second_choices",
    "slot_of",
    "slots_of",
    "spent_done",
]

SLOTS = 4096
SLOT_SEED = 0x5EED5107
_MASK = SLOTS - 1
_xxh3_64 = xxhash.xxh3_64_intdigest


def slot_of(key: bytes) -> int:
    """The cluster slot of ``key`` (part of the wire protocol, like shardd.hashing.shard_for)."""
    return _xxh3_64(key, SLOT_SEED) & _MASK


def slots_of(keys: list[bytes]) -> list[int]:
    """``[slot_of(key) for key in keys]``."""
    return [_xxh3_64(key, SLOT_SEED) & _MASK for key in keys]


class Node(msgspec.Struct, frozen=True):
    """One member as the map names it: its id, the public endpoint clients use, its shard count."""

    id: str
    endpoint: str
    shards: int
    # The member's lease id when the map was made: its incarnation. A node serves a map only if
    # the map names its current lease (after losing one, it waits for the controller to see it).
    lease: int = 0


class SlotMap(msgspec.Struct):
    """A published slot map: ``owners[slot]`` is an index into ``nodes`` (-1: no owner);
    ``handoff[slot]`` names the previous owner still handing the slot over (docs/cluster.md,
    "Authority for a slot")."""

    epoch: int
    nodes: list[Node]
    owners: list[int]
    handoff: dict[int, int] = msgspec.field(default_factory=dict)
    # With replicas on: each slot's replica node (an index into ``nodes``, -1: none); [] when off.
    replicas: list[int] = msgspec.field(default_factory=list)

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def from_json(cls, data: bytes) -> SlotMap:
        return msgspec.json.decode(data, type=cls)

    def to_wire(self) -> dict[str, Any]:
        """As the ``topology`` op's ``cluster.map`` field (msgpack-friendly builtins)."""
        return msgspec.to_builtins(self)

    @classmethod
    def from_wire(cls, value: Any) -> SlotMap:
        return msgspec.convert(value, type=cls, strict=False)

    def owner_of(self, slot: int) -> Node | None:
        index = self.owners[slot]
        return self.nodes[index] if index >= 0 else None

    def index_of(self, node_id: str) -> int:
        """The index of ``node_id`` in ``nodes``, or -1."""
        for i, node in enumerate(self.nodes):
            if node.id == node_id:
                return i
        return -1


# --- rendezvous (HRW) placement -----------------------------------------------------------

# The bytes every score appends to a node id, built once: assign() hashes N x 4096 keys and
# the concatenation is the only per-score work left in Python besides the hash call.
_SUFFIXES = tuple(b"/" + slot.to_bytes(2, "big") for slot in range(SLOTS))


def score(node_id: str, slot: int) -> int:
    """The HRW score of ``node_id`` for ``slot`` (part of the placement contract: a controller
    of any version, after a failover mid-upgrade, must rank nodes exactly as its predecessor)."""
    return _xxh3_64(node_id.encode() + _SUFFIXES[slot])


def hrw_order(slot: int, node_ids: Sequence[str]) -> list[str]:
    """``node_ids`` ranked for ``slot``, best first; equal scores rank the larger id first."""
    return sorted(node_ids, key=lambda node_id: (score(node_id, slot), node_id), reverse=True)


def _ranked_columns(node_ids: Sequence[str]) -> tuple[list[str], list[list[int]], int]:
    """Sorted ids, one column of 4096 packed scores per id, and the mask that unpacks an index.

    A packed score is ``score << bits | index`` (``index`` into the sorted ids): comparing
    packed ints compares scores first and, on a tie, prefers the larger index, which is the
    larger id string, so that ``max`` over a slot's row is exactly hrw_order's first choice
    without a Python-level key function.
    """
    ids = sorted(node_ids)
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate node ids in {ids}")
    bits = max(len(ids), 1).bit_length()
    columns = []
    for index, node_id in enumerate(ids):
        prefix = node_id.encode()
        columns.append([h << bits | index for h in map(_xxh3_64, [prefix + s for s in _SUFFIXES])])
    return ids, columns, (1 << bits) - 1


def assign(node_ids: Sequence[str]) -> list[int]:
    """Each slot's top HRW choice, as an index into ``sorted(node_ids)``; all -1 if empty."""
    if not node_ids:
        return [-1] * SLOTS
    _, columns, mask = _ranked_columns(node_ids)
    return [packed & mask for packed in map(max, zip(*columns, strict=True))]


def second_choices(node_ids: Sequence[str]) -> list[int]:
    """Each slot's second HRW choice (its replica), as an index into ``sorted(node_ids)``;
    all -1 with fewer than 2 nodes."""
    if len(node_ids) < 2:
        return [-1] * SLOTS
    _, columns, mask = _ranked_columns(node_ids)
    return [sorted(row)[-2] & mask for row in zip(*columns, strict=True)]


# --- membership and handoff records (etcd values) -------------------------------------------


class Member(msgspec.Struct, frozen=True):
    """A node's membership record (etcd ``members/<id>``, bound to the node's lease).

    ``state`` is ``"up"`` or ``"leaving"``; next_map treats any state but ``"up"`` as
    leaving (the node still serves what it owns but gets nothing new), so a record written
    by a newer node with a state this version does not know drains that node rather than
    crashing the controller. ``shards`` is checked on decode because it reaches shard_for.
    """

    id: str
    endpoint: str
    shards: Annotated[int, msgspec.Meta(ge=1, le=MAX_SHARDS)]
    state: str = "up"
    lease: int = 0  # the lease the record is bound to: the node's incarnation

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def from_json(cls, data: bytes) -> Member:
        return msgspec.json.decode(data, type=cls)


class Done(msgspec.Struct, frozen=True):
    """The handoffs a source node has finished (etcd ``done/<source id>``): ``(slot, id of the
    node it was handed to)`` pairs.

    The destination is part of each pair so that a record written for a handoff that was since
    redirected (its destination died and the slot went elsewhere) cannot clear the new one.
    A pair is consumed by the map that folds it; the controller deletes the records
    ``spent_done`` names once that map is published, because a pair left lying around would
    clear a later handoff of the same slot between the same two nodes before it happened.
    """

    moved: list[tuple[int, str]] = msgspec.field(default_factory=list)
    # The map epoch the pairs were reported against: only that map folds them (Rule 3), so a
    # pair left from an earlier handoff of the same slot between the same nodes clears nothing.
    epoch: int = 0

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def from_json(cls, data: bytes) -> Done:
        return msgspec.json.decode(data, type=cls)


# --- the controller's decision --------------------------------------------------------------


def next_map(current: SlotMap | None, members: dict[str, Member], done: dict[str, Done],
             replicas: int = 0) -> SlotMap | None:
    """The map the controller publishes next, or None when there is nothing new to publish.

    ``members`` and ``done`` are keyed by node id (a member's key must be its ``id``). The
    result depends on their contents only, never on their order.

    Rule 1: live = members whose state is "up"; alive = all members. Owners are chosen among
       the targets: the live members, or, if none is live but some are leaving, all alive
       members (a last node leaving has nobody to hand to). No members: every owner is -1.
    Rule 2: no current map: epoch 1, owners = HRW over the targets, no handoff.
    Rule 3: done records are folded: ``handoff[s] = F`` is removed when ``done[F]``, reported
       against the current epoch, holds ``(s, id of owners[s])``.
    Rule 4: a handoff whose source is not alive any more is dropped: its owner starts empty.
    Rule 5: a slot whose owner is not alive (or is -1) goes at once to its top HRW choice
       among the targets and starts empty; a handoff entry from a still-alive source stays
       (the source now hands to the new owner), unless the new owner is that source itself.
    Rule 6: only when no handoff is pending after rules 3 to 5: every slot whose (alive) owner
       differs from its top HRW choice among the targets moves there with ``handoff[s]`` =
       the old owner: a planned move (join, leave, rebalance). One round of moves at a time
       keeps every slot's authority a single node (F until its handoff is done, then O).
    Rule 7: nodes = every alive member that owns a slot, is a handoff source or is live,
       sorted by id, as ``Node(id, endpoint, shards)`` from its member record (so an endpoint
       or shard count change is republished); owners and handoff are reindexed to it.
    Rule 8: if nodes, owners, handoff and replicas all equal the current map's, return None;
       otherwise the epoch is the current one + 1 (1 without a current map).
    Rule 9: with ``replicas`` = 1 and two or more targets, each slot's replica is its top HRW
       choice among the targets other than its owner (the second choice once the owner is the
       top one): when the owner dies, rule 5 gives the slot to exactly that node.
    """
    for node_id, member in members.items():
        if member.id != node_id:
            raise ValueError(f"member record {member.id!r} is keyed as {node_id!r}")
    if current is not None and len(current.owners) != SLOTS:
        raise ValueError(f"the current map has {len(current.owners)} owners, not {SLOTS}")

    # Rule 1. Ids are sorted so that nothing below depends on the dicts' insertion order.
    alive = sorted(members)
    live = [node_id for node_id in alive if members[node_id].state == "up"]
    targets = live or alive
    top = [targets[i] if i >= 0 else None for i in assign(targets)]

    owners: list[str | None]
    handoff: dict[int, str]
    if current is None:
        owners, handoff = top, {}  # Rule 2.
    else:
        ids = [node.id for node in current.nodes]
        owners = [ids[i] if i >= 0 else None for i in current.owners]
        handoff = {slot: ids[source] for slot, source in sorted(current.handoff.items())}
        finished = {source: set(record.moved) for source, record in done.items()
                    if record.epoch == current.epoch}
        for slot, source in list(handoff.items()):
            owner = owners[slot]
            if (owner is None or (slot, owner) in finished.get(source, ())  # Rule 3.
                    or source not in members):  # Rule 4.
                del handoff[slot]
        for slot, owner in enumerate(owners):  # Rule 5.
            if owner is None or owner not in members:
                owners[slot] = top[slot]
                if slot in handoff and handoff[slot] == top[slot]:
                    del handoff[slot]
        if not handoff:  # Rule 6.
            for slot, owner in enumerate(owners):
                if owner is not None and owner != top[slot]:
                    owners[slot] = top[slot]
                    handoff[slot] = owner

    # Rule 9.
    replica_ids: list[str | None] = []
    if replicas and len(targets) >= 2:
        second = [targets[i] for i in second_choices(targets)]
        replica_ids = [top[slot] if top[slot] != owner else second[slot] for slot, owner in enumerate(owners)]

    # Rule 7.
    named = {owner for owner in owners if owner is not None} | set(handoff.values()) | set(live)
    nodes = [Node(node_id, members[node_id].endpoint, members[node_id].shards, members[node_id].lease)
             for node_id in sorted(named)]
    index = {node.id: i for i, node in enumerate(nodes)}
    owner_indexes = [index[owner] if owner is not None else -1 for owner in owners]
    handoff_indexes = {slot: index[source] for slot, source in sorted(handoff.items())}
    replica_indexes = [index[r] if r is not None else -1 for r in replica_ids]

    # Rule 8.
    if current is None:
        return SlotMap(1, nodes, owner_indexes, handoff_indexes, replica_indexes)
    if (nodes == current.nodes and owner_indexes == current.owners and handoff_indexes == current.handoff
            and replica_indexes == current.replicas):
        return None
    return SlotMap(current.epoch + 1, nodes, owner_indexes, handoff_indexes, replica_indexes)


def spent_done(smap: SlotMap, done: dict[str, Done]) -> list[str]:
    """The sources whose done records name no handoff pending in ``smap`` (sorted): once
    ``smap`` is published, the controller may delete them (guarded by their revisions, so that a
    record rewritten meanwhile survives); see Done for why they must not linger."""
    pending = {(slot, smap.nodes[source].id, smap.nodes[smap.owners[slot]].id)
               for slot, source in smap.handoff.items() if smap.owners[slot] >= 0}
    return sorted(source for source, record in done.items()
                  if not any((slot, source, to) in pending for slot, to in record.moved))


# --- figures (the simulation in bench/cluster_sim.py and the tests) -------------------------


def owner_ids(smap: SlotMap) -> list[str | None]:
    """Each slot's owner as a node id (None: no owner): comparable across maps, unlike indexes."""
    ids = [node.id for node in smap.nodes]
    return [ids[i] if i >= 0 else None for i in smap.owners]


def moved_fraction(before: Sequence[object], after: Sequence[object]) -> float:
    """The fraction of slots whose owner differs between two per-slot owner lists (node ids,
    not indexes: indexes shift when the node list does)."""
    if len(before) != len(after):
        raise ValueError(f"{len(before)} slots before, {len(after)} after")
    return sum(a != b for a, b in zip(before, after, strict=True)) / len(before) if before else 0.0


def imbalance(owners: Sequence[int], n_nodes: int) -> float:
    """Most slots on one node over the mean (1.0 is perfect); nodes owning nothing count."""
    if n_nodes <= 0:
        raise ValueError(f"n_nodes must be positive, got {n_nodes}")
    counts = Counter(owner for owner in owners if owner >= 0)
    return max(counts.values(), default=0) / (len(owners) / n_nodes)


class KeyImbalance(NamedTuple):
    """Most keys on one node (or shard) over the mean per node (or per shard, cluster-wide)."""

    node: float
    shard: float


def key_imbalance(keys: list[bytes], smap: SlotMap) -> KeyImbalance:
    """Where ``keys`` land under ``smap``: node by slot, shard within the node by shard_for.

    The shard figure is cluster-wide (the busiest shard against keys / all shards), so it
    includes the nodes' imbalance: it is the one that sizes a shard's memory and CPU.
    """
    if not keys or not smap.nodes:
        raise ValueError("need at least one key and one node")
    by_node: dict[int, list[bytes]] = {}
    for key, slot in zip(keys, slots_of(keys), strict=True):
        by_node.setdefault(smap.owners[slot], []).append(key)
    if -1 in by_node:
        raise ValueError("the map leaves some slots without an owner")
    per_shard: list[int] = []
    for node_index, node_keys in by_node.items():
        counts = Counter(shards_for(node_keys, smap.nodes[node_index].shards))
        per_shard += counts.values()
    node = max(map(len, by_node.values())) / (len(keys) / len(smap.nodes))
    shard = max(per_shard) / (len(keys) / sum(node.shards for node in smap.nodes))
    return KeyImbalance(node, shard)
