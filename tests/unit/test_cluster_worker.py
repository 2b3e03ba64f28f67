"""A worker's cluster ops, on a real Shard and Store: take, copy, drop, put and replication reads."""

from __future__ import annotations

from typing import Any

from shardd import protocol as p
from shardd.config import build_config
from shardd.slots import slot_of
from shardd.store import Store
from shardd.worker import Shard, monotonic_ms


def shard() -> Shard:
    config = build_config({"shards": 1, "runtime_dir": "/nonexistent", "compression": "off"})
    return Shard(Store(monotonic_ms), config, 0, None)


def call(s: Shard, op: Any) -> Any:
    reply = p.decode_reply(s.apply(p.encode_request(1, op)))
    assert reply.status == p.OK, reply
    return reply.value


def keys_in(slot: int, n: int) -> list[bytes]:
    found, i = [], 0
    while len(found) < n:
        key = f"k{i}".encode()
        if slot_of(key) == slot:
            found.append(key)
        i += 1
    return found


def test_take_hands_over_a_slot_in_bounded_steps_with_ttls_and_versions() -> None:
    s = shard()
    mine, other = keys_in(7, 25), keys_in(8, 3)
    for key in mine + other:
        call(s, p.Set(key, b"v-" + key))
    call(s, p.Expire(mine[0], 60_000))
    version = call(s, p.Gets(mine[1]))[1]
    taken: list[Any] = []
    steps = 0
    while True:
        part = call(s, p.SlotTake([7], 10))
        taken += part["entries"]
        steps += 1
        if not part["more"]:
            break
    assert steps == 3 and sorted(e[0] for e in taken) == sorted(mine)
    by_key = {e[0]: e for e in taken}
    assert 0 < by_key[mine[0]][2] <= 60_000 and by_key[mine[2]][2] == 0  # TTL as time left, 0: none
    assert by_key[mine[1]][3] == version
    assert all(call(s, p.Get(key)) is None for key in mine)  # removed here
    assert all(call(s, p.Get(key)) == b"v-" + key for key in other)  # other slots untouched


def test_put_and_copy_and_drop() -> None:
    src, dst = shard(), shard()
    keys = keys_in(3, 5)
    for key in keys:
        call(src, p.Set(key, b"x", 30_000))
    copy = call(src, p.SlotCopy([3]))
    assert not copy["more"] and len(copy["entries"]) == 5
    assert all(call(src, p.Get(key)) == b"x" for key in keys)  # a copy leaves them in place
    assert call(dst, p.SlotPut(copy["entries"], [])) == 5
    assert call(dst, p.Ttl(keys[0])) > 0
    assert call(dst, p.SlotPut([], [keys[0]])) == 0 and call(dst, p.Get(keys[0])) is None  # a streamed delete
    assert call(dst, p.SlotDrop([3])) == 4
    assert all(call(dst, p.Get(key)) is None for key in keys)


def test_repl_read_gives_each_key_as_it_is_now() -> None:
    s = shard()
    call(s, p.Set(b"a", b"1"))
    call(s, p.Set(b"b", b"2"))
    call(s, p.Delete(b"b"))
    got = call(s, p.ReplRead([b"a", b"b", b"never"]))
    assert [e[:2] for e in got["entries"]] == [[b"a", b"1"]]
    assert got["deleted"] == [b"b", b"never"]


def test_a_cluster_nodes_worker_answers_its_own_endpoint_as_the_router_does() -> None:
    import time

    from shardd.cluster_view import ClusterView
    from shardd.slots import Node, SlotMap

    config = build_config({"shards": 1, "runtime_dir": "/nonexistent", "bind": "tcp://127.0.0.1:1",
                           "cluster_etcd": ["http://127.0.0.1:2379"]})
    s = Shard(Store(monotonic_ms), config, 0, None)
    mine, theirs = keys_in(5, 1)[0], keys_in(3000, 1)[0]

    def direct(op: Any) -> p.Reply:
        return p.decode_reply(s.apply(p.encode_request(1, op), direct=True))

    assert direct(p.Get(mine)).status == p.UNAVAILABLE  # no states from the router yet: nothing
    router_view = ClusterView("c", "tcp://127.0.0.1:1")
    nodes = [Node("tcp://127.0.0.1:1", "tcp://127.0.0.1:1", 1), Node("tcp://127.0.0.1:2", "tcp://127.0.0.1:2", 1)]
    router_view.install(SlotMap(4, nodes, [0] * 2048 + [1] * 2048, {}))
    call(s, p.SlotStates(router_view.export(), time.monotonic() + 60))
    assert direct(p.Set(mine, b"v")).status == p.OK
    moved = direct(p.Get(theirs))
    assert moved.status == p.MOVED and moved.value == {"epoch": 4, "slot": 3000, "node": "tcp://127.0.0.1:2",
                                                       "endpoint": "tcp://127.0.0.1:2"}
    assert direct(p.GetMany([mine, theirs])).status == p.MOVED
    assert call(s, p.Get(theirs)) is None  # the router's own requests are not checked again here
    call(s, p.SlotStates(None, time.monotonic() - 1))  # the lease lapsed
    assert direct(p.Get(mine)).status == p.UNAVAILABLE
    assert direct(p.Ping()).status == p.OK

