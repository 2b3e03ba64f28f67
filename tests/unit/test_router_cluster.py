"""The router in cluster mode, over fake channels: the gate, the agent's ops, imports."""

from __future__ import annotations

import time
from typing import Any

from shardd import protocol as p
from shardd.config import build_config
from shardd.router import Router
from shardd.shard_link import ShardLink
from shardd.slots import SLOTS, Node, SlotMap, slot_of

ME, OTHER = Node("tcp://127.0.0.1:1", "tcp://127.0.0.1:1", 2), Node("tcp://127.0.0.1:2", "tcp://127.0.0.1:2", 2)


class Fake:
    def send(self, *frames: Any) -> bool:
        return True


def router() -> tuple[Router, list[p.Reply]]:
    config = build_config({"shards": 2, "runtime_dir": "/nonexistent", "bind": ME.endpoint,
                           "cluster_etcd": ["http://127.0.0.1:2379"]})
    links = [ShardLink(i, Fake()) for i in range(2)]
    for link in links:
        link.up = True
    r = Router(config, Fake(), links, Fake())
    replies: list[p.Reply] = []
    r.send_to = lambda peer, frame: replies.append(p.decode_reply(frame))  # type: ignore[method-assign]
    return r, replies


def route(r: Router, replies: list[p.Reply], op: Any, privileged: bool = False) -> p.Reply | None:
    replies.clear()
    for link in r.links:
        link.out_frames.clear()
        link.out_targets.clear()
    r.route(b"peer", p.encode_request(9, op), privileged)
    return replies[0] if replies else None


def queued(r: Router) -> list[Any]:
    return [p.decode_envelope(frame, r.limits).op for link in r.links for frame in link.out_frames]  # type: ignore[union-attr]


def half() -> SlotMap:
    return SlotMap(2, [ME, OTHER], [0] * 2048 + [1] * 2048, {})


def key_in(lo: int, hi: int) -> bytes:
    return next(f"k{i}".encode() for i in range(100_000) if lo <= slot_of(f"k{i}".encode()) < hi)


def test_nothing_is_served_before_the_agent_installs_a_map_and_a_lease() -> None:
    r, replies = router()
    reply = route(r, replies, p.Get(b"k"))
    assert reply is not None and reply.status == p.UNAVAILABLE and reply.value.startswith("cluster:")
    assert route(r, replies, p.Ping()) is None  # admin ops still go to the shards


def test_the_gate_forwards_owned_keys_and_redirects_the_rest() -> None:
    r, replies = router()
    set_map = p.ClusterSet(half().to_wire(), time.monotonic() + 60)
    assert route(r, replies, set_map, privileged=True).value["epoch"] == 2  # type: ignore[union-attr]
    mine, theirs = key_in(0, 2048), key_in(2048, SLOTS)
    assert route(r, replies, p.Set(mine, b"v")) is None and queued(r) == [p.Set(mine, b"v")]
    reply = route(r, replies, p.Get(theirs))
    assert reply.status == p.MOVED and reply.value["endpoint"] == OTHER.endpoint  # type: ignore[union-attr]
    reply = route(r, replies, p.SetMany([(mine, b"1"), (theirs, b"2")]))
    assert reply.status == p.MOVED and queued(r) == []  # type: ignore[union-attr]  # nothing of it applied
    for i, link in enumerate(r.links):
        link.direct = f"tcp://127.0.0.1:{9000 + i}"
    assert r.topology()["endpoints"] == ["tcp://127.0.0.1:9000", "tcp://127.0.0.1:9001"]
    assert r.topology()["cluster"]["map"]["epoch"] == 2
    # every change of what the node serves goes to the workers too, for their own endpoints
    route(r, replies, p.ClusterSet(None, time.monotonic() + 60), privileged=True)
    assert [type(op) for op in queued(r)] == [p.SlotStates, p.SlotStates]
    # with replicas, writes on a worker's own endpoint would miss the stream: no endpoints then
    replicated = SlotMap(3, [ME, OTHER], [0] * 2048 + [1] * 2048, {}, [1] * 2048 + [0] * 2048)
    route(r, replies, p.ClusterSet(replicated.to_wire(), time.monotonic() + 60), privileged=True)
    assert r.topology()["endpoints"] == [None, None]
    # control ops are refused on the public endpoint
    assert route(r, replies, p.ClusterSet(None, 0.0)).status == p.BAD_REQUEST  # type: ignore[union-attr]


def test_a_lease_that_lapsed_refuses_everything_keyed() -> None:
    r, replies = router()
    route(r, replies, p.ClusterSet(half().to_wire(), time.monotonic() - 1), privileged=True)
    reply = route(r, replies, p.Get(key_in(0, 2048)))
    assert reply.status == p.UNAVAILABLE and "lease" in reply.value  # type: ignore[union-attr]


def test_an_import_empties_the_slots_first_then_stores_then_adopts() -> None:
    r, replies = router()
    owners = [0] * 2048 + [1] * 2048
    owners[3000] = 0  # handed to us from OTHER
    route(r, replies, p.ClusterSet(SlotMap(3, [ME, OTHER], owners, {3000: 1}).to_wire(), time.monotonic() + 60),
          privileged=True)
    key = key_in(3000, 3001)
    assert route(r, replies, p.Get(key)).value["ask"] is True  # type: ignore[union-attr]
    assert route(r, replies, p.SlotImport([3000], [(key, b"v", 0, 5)])) is None
    ops = queued(r)
    assert [type(op) for op in ops].count(p.SlotDrop) == 2 and p.SlotPut([(key, b"v", 0, 5)], []) in ops
    assert ops.index(p.SlotPut([(key, b"v", 0, 5)], [])) > min(i for i, op in enumerate(ops) if type(op) is p.SlotDrop)
    route(r, replies, p.SlotImport([3000], [], True))
    assert route(r, replies, p.Get(key)) is None  # adopted: served here now
    # a slot this node serves is never emptied by an import (a sender with an older map)
    route(r, replies, p.SlotImport([5], []))
    assert not any(type(op) is p.SlotDrop for op in queued(r))


def test_late_entries_from_a_former_owner_never_overwrite_a_slot_served_here() -> None:
    # e.g. a node froze with a replication batch or handoff entries in hand, and woke after its
    # slots had moved here: what it sends now is older than what this node has acknowledged
    r, replies = router()
    route(r, replies, p.ClusterSet(half().to_wire(), time.monotonic() + 60), privileged=True)
    mine, theirs = key_in(0, 2048), key_in(2048, SLOTS)
    route(r, replies, p.ReplApply([(mine, b"old", 0, 1), (theirs, b"copy", 0, 1)], [mine, theirs]))
    puts = [op for op in queued(r) if type(op) is p.SlotPut]
    assert [e[0] for op in puts for e in op.entries] == [theirs]  # only the slot we are a replica of
    assert [k for op in puts for k in op.deleted] == [theirs]
    route(r, replies, p.SlotImport([], [(mine, b"old", 0, 1), (theirs, b"x", 0, 2)]))
    puts = [op for op in queued(r) if type(op) is p.SlotPut]
    assert [e[0] for op in puts for e in op.entries] == [theirs]


def test_set_many_nx_and_scan_only_touch_slots_served_here() -> None:
    r, replies = router()
    route(r, replies, p.ClusterSet(half().to_wire(), time.monotonic() + 60), privileged=True)
    mine, theirs = key_in(0, 2048), key_in(2048, SLOTS)
    reply = route(r, replies, p.SetManyNx([(mine, b"1"), (theirs, b"2")]))
    assert reply.status == p.MOVED and queued(r) == []  # type: ignore[union-attr]  # nothing of it applied
    assert route(r, replies, p.Scan(0, 0, 10)) is None
    (target,) = r.links[0].out_targets
    # the shard also holds a replicated entry of a slot served elsewhere: the scan does not show it
    status, value = target[0].add_reply(0, None, p.encode_reply(0, p.OK, [7, [mine, theirs]]))
    assert (status, value) == (p.OK, [7, [mine]])
    route(r, replies, p.ClusterSet(None, time.monotonic() - 1), privileged=True)  # the lease lapsed
    for op in (p.Scan(0), p.SetManyNx([(mine, b"1")])):
        reply = route(r, replies, op)
        assert reply.status == p.UNAVAILABLE and "lease" in reply.value, op  # type: ignore[union-attr]
