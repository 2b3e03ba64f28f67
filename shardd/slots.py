"""Cluster placement, pure: key → slot, and the slot map every node and client share.

docs/cluster.md is the description; this module is the reference implementation. A key's slot
is ``xxh3_64(key, seed=SLOT_SEED) & (SLOTS - 1)``: a seed other than the in-node hash's
(docs/design.md, decisions 1 and 9), so that the keys of one node still spread over all of its
shards. No I/O here.
"""

from __future__ import annotations

from typing import Any

import msgspec
import xxhash

__all__ = ["SLOTS", "SLOT_SEED", "Node", "SlotMap", "slot_of", "slots_of"]

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


class SlotMap(msgspec.Struct):
    """A published slot map: ``owners[slot]`` is an index into ``nodes`` (−1: no owner);
    ``handoff[slot]`` names the previous owner still handing the slot over (docs/cluster.md,
    "Authority for a slot")."""

    epoch: int
    nodes: list[Node]
    owners: list[int]
    handoff: dict[int, int] = msgspec.field(default_factory=dict)

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
        """The index of ``node_id`` in ``nodes``, or −1."""
        for i, node in enumerate(self.nodes):
            if node.id == node_id:
                return i
        return -1
