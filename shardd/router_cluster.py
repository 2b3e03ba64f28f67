"""The router's cluster ops (docs/cluster.md): the agent's map and lease, handoff steps, imports.

The slot-by-slot decisions are shardd.cluster_view's (sans-IO); these handlers only turn them
into replies and into ops queued on the shard links. Every op queued here rides the same FIFO
links as client requests, which is what makes the handoff ordering hold without waiting:
entries deleted by a ``slot_drop`` or stored by a ``slot_put`` are gone or there before any
request routed after them reaches the shard.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import TYPE_CHECKING, Any

import msgspec

from shardd import protocol as p
from shardd.cluster_view import FROZEN, SERVE
from shardd.hashing import shards_for
from shardd.router_types import Gather, Part
from shardd.slots import SlotMap, slot_of

if TYPE_CHECKING:
    from shardd.router import Router

log = logging.getLogger("shardd.router")

_AUTHORITY = (SERVE, FROZEN)  # states in which this node is a slot's authority

__all__ = ["HANDLERS", "combine_take", "lapsed_reply"]


def _not_clustered(router: Router, peer: Any, request_id: int, tag: str) -> bool:
    if router.cluster is None:
        router.reply(peer, request_id, p.BAD_REQUEST, f"{tag}: this daemon is not a cluster node (cluster_etcd)")
        return True
    return False


def drop_slots(router: Router, slots: list[int]) -> None:
    """Queue ``slot_drop`` on every shard (cluster_view, Rule 4); nobody waits for the answer."""
    links = [link for link in router.links if link.up]
    if not slots or not links:
        return
    gather = Gather(None, 0, len(links), lambda parts: None, tolerant=True)
    for link in links:
        router._queue(link, p.SlotDrop(slots), (gather, None))


def push_states(router: Router, full: bool = True, links: list[Any] | None = None) -> None:
    """Give the workers the node's slot states (and lease), for their own endpoints (direct
    mode): queued on each shard's FIFO link, so a shard has a slot frozen before the handoff
    step that follows (``slot_take``), and emptied before it serves it."""
    view = router.cluster
    assert view is not None
    op = p.SlotStates(view.export() if full else None, view.valid_until)
    targets = [link for link in (router.links if links is None else links) if link.up]
    if targets:
        gather = Gather(None, 0, len(targets), lambda parts: None, tolerant=True)
        for link in targets:
            router._queue(link, op, (gather, None))


def _cluster_set(router: Router, peer: Any, request_id: int, op: p.ClusterSet) -> None:
    if _not_clustered(router, peer, request_id, "cluster_set"):
        return
    view = router.cluster
    assert view is not None
    view.valid_until = op.valid_until
    purged = 0
    if op.map is not None:
        try:
            new = SlotMap.from_wire(op.map)
        except (msgspec.ValidationError, TypeError) as exc:
            router.reply(peer, request_id, p.BAD_REQUEST, f"cluster_set: not a slot map: {exc}")
            return
        before = view.map.epoch if view.map is not None else 0
        purge = view.install(new)
        drop_slots(router, purge)
        purged = len(purge)
        if new.epoch != before:
            log.info("cluster map epoch %d installed: %s", new.epoch, view.counts())
    push_states(router, full=op.map is not None)
    router.reply(peer, request_id, p.OK, {"epoch": view.map.epoch if view.map else 0, "purged": purged})


def _slot_freeze(router: Router, peer: Any, request_id: int, op: p.SlotFreeze) -> None:
    if not _not_clustered(router, peer, request_id, "slot_freeze"):
        frozen = router.cluster.freeze(op.slots)  # type: ignore[union-attr]
        push_states(router)
        router.reply(peer, request_id, p.OK, len(frozen))


def _slot_give(router: Router, peer: Any, request_id: int, op: p.SlotGive) -> None:
    if not _not_clustered(router, peer, request_id, "slot_give"):
        given = router.cluster.give(op.slots)  # type: ignore[union-attr]
        push_states(router)
        router.reply(peer, request_id, p.OK, len(given))


def _slot_import(router: Router, peer: Any, request_id: int, op: p.SlotImport) -> None:
    """Another node hands us entries: delete what we hold for the slots (first message), store the
    entries on their shards, and with ``adopt`` serve the slots; answered once every shard stored."""
    if _not_clustered(router, peer, request_id, "slot_import"):
        return
    n = router.n
    view = router.cluster
    assert view is not None
    parts: list[tuple[int, p.Op, Any]] = []
    # Never empty a slot this node serves: a sender with an older map may think it is only a
    # handoff target or a replica here.
    purge = [slot for slot in op.slots if view.state[slot] != SERVE] if not op.adopt else []
    if purge:
        parts += [(shard, p.SlotDrop(purge), "drop") for shard in range(n)]
    entries = _not_ours(view, op.entries)
    if entries:
        per_shard: list[list[tuple[bytes, bytes, int, int]]] = [[] for _ in range(n)]
        for entry, shard in zip(entries, shards_for([e[0] for e in entries], n), strict=True):
            per_shard[shard].append(entry)
        parts += [(shard, p.SlotPut(group), "put") for shard, group in enumerate(per_shard) if group]
    adopted = router.cluster.adopt(op.slots) if op.adopt else []  # type: ignore[union-attr]
    if adopted:
        push_states(router)
    router._start_gather(peer, request_id, parts, _import_result(len(adopted)),
                         {"stored": 0, "dropped": 0, "adopted": len(adopted)})


def _not_ours(view: Any, entries: list[Any]) -> list[Any]:
    """The entries whose slot this node is not the authority of. Entries for a slot it serves (or
    is handing over) come from a node with an older map, e.g. one that froze with them in hand
    and woke after its slots moved here: storing them would bring back older values."""
    state = view.state
    return [entry for entry in entries if state[slot_of(entry[0])] not in _AUTHORITY]


def _import_result(adopted: int) -> Any:
    def combine(parts: list[Part]) -> dict[str, int]:
        stored = sum(value for _, context, value in parts if context == "put")
        dropped = sum(value for _, context, value in parts if context == "drop")
        return {"stored": stored, "dropped": dropped, "adopted": adopted}
    return combine


def combine_take(parts: list[Part]) -> dict[str, Any]:
    """``slot_take`` fanned out: every shard's entries, and whether any shard has more."""
    entries: list[Any] = []
    more = False
    for _, _, value in parts:
        entries += value["entries"]
        more = more or value["more"]
    return {"entries": entries, "more": more}


def _repl_pull(router: Router, peer: Any, request_id: int, op: p.ReplPull) -> None:
    """The keys written since the last pull (cluster_view, Rule 5), read from their shards now:
    the shard links are FIFO, so each read sees every write routed before it."""
    if _not_clustered(router, peer, request_id, "repl_pull"):
        return
    view = router.cluster
    assert view is not None
    overflow, view.overflow = view.overflow, False
    keys = view.pull_dirty(op.limit)  # type: ignore[arg-type]
    n = router.n
    per_shard: list[list[bytes]] = [[] for _ in range(n)]
    for key, shard in zip(keys, shards_for(keys, n), strict=True):
        per_shard[shard].append(key)
    parts = [(shard, p.ReplRead(group), None) for shard, group in enumerate(per_shard) if group]

    def combine(parts: list[Part]) -> dict[str, Any]:
        entries: list[Any] = []
        deleted: list[Any] = []
        for _, _, value in parts:
            entries += value["entries"]
            deleted += value["deleted"]
        return {"entries": entries, "deleted": deleted, "overflow": overflow}

    router._start_gather(peer, request_id, parts, combine, {"entries": [], "deleted": [], "overflow": overflow})


def _repl_apply(router: Router, peer: Any, request_id: int, op: p.ReplApply) -> None:
    """A slot owner streams its writes here (this node is the replica): store and delete them."""
    if _not_clustered(router, peer, request_id, "repl_apply"):
        return
    n = router.n
    view = router.cluster
    assert view is not None
    kept = _not_ours(view, op.entries)  # a late stream from a former owner must not overwrite us
    gone = [key for key in op.deleted if view.state[slot_of(key)] not in _AUTHORITY]
    entries: list[list[Any]] = [[] for _ in range(n)]
    deleted: list[list[bytes]] = [[] for _ in range(n)]
    for entry, shard in zip(kept, shards_for([e[0] for e in kept], n), strict=True):
        entries[shard].append(entry)
    for key, shard in zip(gone, shards_for(gone, n), strict=True):
        deleted[shard].append(key)
    parts = [(shard, p.SlotPut(entries[shard], deleted[shard]), None) for shard in range(n)
             if entries[shard] or deleted[shard]]
    router._start_gather(peer, request_id, parts, lambda parts: sum(value for _, _, value in parts), 0)


def _leave(router: Router, peer: Any, request_id: int, op: p.Leave) -> None:
    """The supervisor's SIGTERM path hands the slots off first (cluster mode), then stops."""
    if _not_clustered(router, peer, request_id, "leave"):
        return
    log.warning("leave requested: handing this node's slots to the other members, then stopping")
    router.reply(peer, request_id, p.OK, "leaving")
    os.kill(os.getppid(), signal.SIGTERM)


def lapsed_reply(raw: bytes, node_id: str) -> bytes:
    """A reply that must not be passed on (the lease lapsed while its request was in flight):
    UNAVAILABLE instead, whatever the shard did (cluster_view, Rule 1)."""
    try:
        request_id = p.decode_reply(raw).id
    except Exception:
        request_id = 0
    return p.encode_reply(request_id, p.UNAVAILABLE,
                          f"cluster: node {node_id} lost its membership lease while this request was in flight; "
                          f"its outcome is unknown; ask another node")


HANDLERS: dict[type, Any] = {
    p.ClusterSet: _cluster_set,
    p.SlotFreeze: _slot_freeze,
    p.SlotGive: _slot_give,
    p.SlotImport: _slot_import,
    p.Leave: _leave,
    p.ReplPull: _repl_pull,
    p.ReplApply: _repl_apply,
}
