"""Direct mode: clients that place keys themselves and skip the router."""

from __future__ import annotations

import asyncio

import zmq

from shardd import protocol as proto
from shardd.aclient import AsyncClient
from shardd.client import Client
from tests.helpers import keys_on_shard, wait_until, wait_until_sleeping


def test_direct_client_bypasses_the_router(daemon):
    with Client(daemon.endpoint) as router, Client(daemon.endpoint, direct=True) as c:
        topology = router.topology()
        assert topology["shards"] == daemon.shards
        assert all(e and e.startswith("tcp://127.0.0.1:") for e in topology["endpoints"])
        c.get("warm-up")  # fetches the topology through the router
        before = router.stats()["router"]["requests"]
        assert c.set("d", b"1") is True
        assert c.get("d") == b"1"
        assert c.incr("dn", 5) == 5
        _, version = c.gets("d")
        assert c.cas("d", b"2", version) is True
        assert c.expire("d", 30) is True and 29 < c.ttl("d") <= 30
        assert c.set_many({f"dm{i}": b"x" for i in range(50)}) == 50
        assert len(c.get_many([f"dm{i}" for i in range(50)] + ["none"])) == 50
        assert c.delete_many([f"dm{i}" for i in range(10)]) == 10
        assert c.delete("d") is True
        after = router.stats()["router"]["requests"]
        assert after - before == 1  # only that stats call: the data ops went straight to workers
        assert router.get("dn") == b"5"  # and the router sees the same data


def test_async_direct_client(daemon):
    async def main() -> None:
        async with AsyncClient(daemon.endpoint, direct=True) as c:
            assert await c.set("ad", b"1") is True
            assert await c.get("ad") == b"1"
            results = await asyncio.gather(*(c.incr("ad-n") for _ in range(100)))
            assert sorted(results) == list(range(1, 101))
            assert await c.set_many({"ax": b"1", "ay": b"2"}) == 2
            assert await c.get_many(["ax", "ay", "az"]) == {"ax": b"1", "ay": b"2"}
            assert await c.ping() == daemon.shards  # admin ops still go through the router

    asyncio.run(main())


def test_stale_topology_is_fixed_transparently_after_a_resize(make_daemon):
    d = make_daemon(shards=2)
    with Client(d.endpoint, timeout=5) as admin, Client(d.endpoint, direct=True) as c:
        data = {f"s{i}": str(i).encode() for i in range(300)}
        assert c.set_many(data) == 300
        assert c.placement.shards == 2
        assert admin.resize(3)["to"] == 3
        assert c.placement.shards == 2  # still the old placement: some keys now answer MOVED
        assert all(c.get(k) == v for k, v in data.items())
        assert c.get_many(list(data)) == data
        assert c.placement.shards == 3
        assert admin.resize(1)["to"] == 1
        assert c.incr("after") == 1 and c.get_many(list(data)) == data


def test_a_worker_restart_costs_a_direct_client_no_timeout(make_daemon):
    # The restarted worker listens on a new port; the client's old connection cannot even queue the
    # request (nothing was sent), so it goes through the router and learns the new endpoint, instead
    # of waiting out its timeout and raising.
    import os
    import signal

    from shardd.errors import SharddError

    d = make_daemon(shards=2)
    key = keys_on_shard(0, 2, 1, prefix="restart:")[0]
    with Client(d.endpoint, timeout=30) as admin, Client(d.endpoint, timeout=20, direct=True) as c:
        assert c.set(key, b"before") is True
        victim = admin.stats()["shards"][0]["pid"]
        os.kill(victim, signal.SIGKILL)

        def back() -> bool:
            try:
                row = admin.stats()["shards"][0]
                return row.get("status") == "up" and row.get("pid") != victim
            except SharddError:
                return False

        wait_until(back, what="a new worker for shard 0")
        assert c.set(key, b"after") is True  # before the fix: Timeout after 20 s
        assert c.get(key) == b"after"
        assert c.placement.endpoints[0] == admin.topology()["endpoints"][0]  # it learned the new port


def test_mailbox_limit_holds_in_direct_mode(make_daemon):
    d = make_daemon("--enable-debug-ops", "--mailbox-limit", "4", shards=2)
    with Client(d.endpoint) as admin:
        endpoint = admin.topology()["endpoints"][0]
        worker = admin.stats()["shards"][0]["pid"]
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(endpoint)
    held = ctx.socket(zmq.DEALER)
    held.linger = 0
    held.connect(d.endpoint)
    try:
        # Hold the worker in a sleep (through the router) first, so the whole burst below is
        # waiting when it next reads its direct socket: one pass, which the limit governs.
        # Without it the burst could be split over two passes, each allowed `limit` ops.
        held.send(proto.encode_request(2, proto.DebugSleep(0, 1000)))
        wait_until_sleeping(worker)  # readiness: the worker is inside that sleep
        s.send(proto.encode_request(1, proto.DebugSleep(0, 500)))
        keys = keys_on_shard(0, 2, 20)
        for i, key in enumerate(keys):
            s.send(proto.encode_request(100 + i, proto.Get(key)))
        statuses = {}
        while len(statuses) < len(keys) + 1:
            assert s.poll(30_000)
            reply = proto.decode_reply(s.recv())
            statuses[reply.id] = reply.status
        gets = [statuses[100 + i] for i in range(len(keys))]
        assert statuses[1] == proto.OK
        assert gets.count(proto.BUSY) > 0
        assert gets.count(proto.OK) <= 4
        # and a key this shard does not own is MOVED, not served
        other = keys_on_shard(1, 2, 1)[0]
        s.send(proto.encode_request(7, proto.Get(other)))
        assert s.poll(30_000)
        reply = proto.decode_reply(s.recv())
        assert (reply.status, reply.value["shard"]) == (proto.MOVED, 1)
        s.send(proto.encode_request(8, proto.Stats()))
        assert s.poll(30_000)
        assert proto.decode_reply(s.recv()).status == proto.BAD_REQUEST
    finally:
        s.close()
        held.close()
        ctx.term()
