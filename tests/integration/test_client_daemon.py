"""Every client method, sync and async, against a real daemon over loopback TCP."""

from __future__ import annotations

import asyncio
import math

import pytest

from shardd.aclient import AsyncClient
from shardd.client import Client
from shardd.errors import NotInteger, TooLarge
from shardd.serde import MsgpackSerde
from tests.helpers import wait_until


@pytest.fixture
def client(daemon):
    with Client(daemon.endpoint, timeout=30) as c:  # a deadline against a hang, not a latency bound
        c.flush()
        yield c


def test_get_set_delete_exists(client):
    assert client.get("nope") is None
    assert client.set("greeting", b"hello") is True
    assert client.get("greeting") == b"hello"
    assert client.get(b"greeting") == b"hello"  # str keys are their UTF-8 bytes
    assert client.exists("greeting") is True
    assert client.delete("greeting") is True
    assert client.delete("greeting") is False
    assert client.exists("greeting") is False
    assert client.set("ключ", b"\x00\xff") and client.get("ключ".encode()) == b"\x00\xff"


def test_nx_xx(client):
    assert client.set("a", b"1", xx=True) is False
    assert client.get("a") is None
    assert client.set("a", b"1", nx=True) is True
    assert client.set("a", b"2", nx=True) is False
    assert client.get("a") == b"1"
    assert client.set("a", b"3", xx=True) is True
    assert client.get("a") == b"3"


def test_ttl_expire_persist(client):
    assert client.ttl("missing") is None
    client.set("p", b"v")
    assert client.ttl("p") == math.inf
    assert client.expire("p", 100) is True
    assert 50 < client.ttl("p") <= 100  # slack for a busy machine between the two calls
    assert client.persist("p") is True
    assert client.ttl("p") == math.inf
    assert client.expire("missing", 10) is False
    client.set("short", b"v", ttl=0.05)
    left = client.ttl("short")
    assert left is None or 0 < left <= 0.05  # None: a busy machine let the 50 ms pass already
    wait_until(lambda: client.get("short") is None, what="the 50 ms TTL to pass")
    assert client.exists("short") is False


def test_incr_decr(client):
    assert client.incr("n") == 1
    assert client.incr("n", 10) == 11
    assert client.decr("n", 20) == -9
    assert client.get("n") == b"-9"
    client.set("s", b"abc")
    with pytest.raises(NotInteger):
        client.incr("s")
    assert client.get("s") == b"abc"


def test_gets_cas(client):
    assert client.gets("c") is None
    assert client.cas("c", b"x", 1) is None
    client.set("c", b"v1")
    value, version = client.gets("c")
    assert value == b"v1"
    assert client.cas("c", b"v2", version) is True
    assert client.cas("c", b"v3", version) is False  # stale
    assert client.get("c") == b"v2"
    _, newer = client.gets("c")
    assert newer > version


def test_multi_key_ops_cross_shards(client, daemon):
    items = {f"m{i}".encode(): f"v{i}".encode() for i in range(200)}
    assert client.set_many(items) == 200
    got = client.get_many([*items, b"absent"])
    assert got == items
    stats = client.stats()
    keys = [row["keys"] for row in stats["shards"]]
    assert len(keys) == daemon.shards and all(k > 0 for k in keys)
    assert client.delete_many([*list(items)[:50], b"absent"]) == 50
    assert len(client.get_many(list(items))) == 150
    assert client.get_many([]) == {}


def test_keys_spread_over_shards_near_their_share(client, daemon):
    n = 4000
    client.set_many({f"spread:{i}": b"x" for i in range(n)})
    rows = client.stats()["shards"]
    share = n / daemon.shards
    for row in rows:
        assert abs(row["keys"] - share) < 0.1 * share, rows


def test_flush_ping_stats(client, daemon):
    client.set_many({b"f1": b"1", b"f2": b"2", b"f3": b"3"})
    assert client.flush() == 3
    assert client.get("f1") is None
    assert client.ping() == daemon.shards
    stats = client.stats()
    assert stats["router"]["shards"] == daemon.shards
    for row in stats["shards"]:
        assert row["status"] == "up"
        for field in ("keys", "used_bytes", "ops", "hits", "misses", "mailbox", "cpu", "pid"):
            assert field in row


def test_too_large_is_refused_and_daemon_keeps_serving(client):
    with pytest.raises(TooLarge, match="max_key_bytes"):
        client.set(b"k" * 2000, b"v")
    with pytest.raises(TooLarge, match="max_value_bytes"):
        client.set("big", b"v" * (1024 * 1024 + 1))
    assert client.set("big", b"v" * (1024 * 1024)) is True
    assert len(client.get("big")) == 1024 * 1024


def test_pipeline(client):
    p = client.pipeline()
    for i in range(100):
        p.set(f"p{i}", str(i).encode())
    for i in range(100):
        p.get(f"p{i}")
    p.incr("pc")
    p.incr("pc")
    results = p.execute()
    assert results[:100] == [True] * 100
    assert results[100:200] == [str(i).encode() for i in range(100)]
    assert results[200:] == [1, 2]


def test_async_client_all_methods(daemon):
    async def main() -> None:
        async with AsyncClient(daemon.endpoint, timeout=30) as c:
            await c.flush()
            assert await c.set("a", b"1") is True
            assert await c.get("a") == b"1"
            assert await c.exists("a") is True
            assert await c.set("a", b"2", nx=True) is False
            assert await c.expire("a", 50) is True
            assert 25 < await c.ttl("a") <= 50  # slack for a busy machine
            assert await c.persist("a") is True
            assert await c.incr("n", 5) == 5
            assert await c.decr("n") == 4
            _, version = await c.gets("a")
            assert await c.cas("a", b"3", version) is True
            assert await c.cas("a", b"4", version) is False
            assert await c.set_many({"x": b"1", "y": b"2"}) == 2
            assert await c.get_many(["x", "y", "z"]) == {"x": b"1", "y": b"2"}
            assert await c.delete_many(["x", "y"]) == 2
            assert await c.delete("a") is True
            assert await c.ping() == daemon.shards
            assert len((await c.stats())["shards"]) == daemon.shards
            # many coroutines on one client: replies are matched by id
            results = await asyncio.gather(*(c.incr("shared") for _ in range(200)))
            assert sorted(results) == list(range(1, 201))
            p = c.pipeline()
            p.set("q", b"1")
            p.get("q")
            assert await p.execute() == [True, b"1"]
            assert await c.flush() >= 2

    asyncio.run(main())


def _new_ops_script(prefix: str) -> list[tuple[str, tuple, object]]:
    """(command, args, expected) for append, getdel and touch, in order, on fresh keys."""
    k, gone = f"{prefix}-k", f"{prefix}-gone"
    return [
        ("append", (k, b"ab"), 2), ("append", (k, b"cd"), 4), ("get", (k,), b"abcd"),
        ("touch", (k,), True), ("touch", (gone,), False), ("ttl", (k,), math.inf),
        ("touch", (k, 60), True), ("touch", (gone, 60), False), ("exists", (gone,), False),
        ("getdel", (k,), b"abcd"), ("getdel", (k,), None), ("exists", (k,), False),
    ]


@pytest.mark.parametrize("direct", [False, True], ids=["router", "direct"])
def test_append_getdel_touch_in_both_clients_and_pipelines(daemon, direct):
    def check(results, script):
        for (name, args, expected), got in zip(script, results, strict=True):
            assert got == expected, (name, args, got)

    with Client(daemon.endpoint, timeout=30, direct=direct) as c:
        script = _new_ops_script(f"sync-{direct}")
        check([getattr(c, name)(*args) for name, args, _ in script], script)
        c.set("t", b"v")
        assert c.touch("t", 100) is True and 50 < c.ttl("t") <= 100
        script = _new_ops_script(f"pipe-{direct}")
        pipe = c.pipeline()
        for name, args, _ in script:
            getattr(pipe, name)(*args)
        check(pipe.execute(), script)

    async def main() -> None:
        async with AsyncClient(daemon.endpoint, timeout=30, direct=direct) as ac:
            script = _new_ops_script(f"async-{direct}")
            check([await getattr(ac, name)(*args) for name, args, _ in script], script)
            script = _new_ops_script(f"apipe-{direct}")
            pipe = ac.pipeline()
            for name, args, _ in script:
                getattr(pipe, name)(*args)
            check(await pipe.execute(), script)

    asyncio.run(main())


def test_a_serde_against_the_daemon(daemon):
    with Client(daemon.endpoint, timeout=30, serde=MsgpackSerde()) as c, Client(daemon.endpoint, timeout=30) as raw:
        value = {"user": "ada", "tags": ["x", "y"], "score": 1.5}
        assert c.set("obj", value) is True
        assert c.get("obj") == value
        assert raw.get("obj") == MsgpackSerde().dumps(value)  # the daemon stores the bytes
        assert c.set_many({f"o{i}": [i] for i in range(20)}) == 20
        assert c.get_many([f"o{i}" for i in range(20)]) == {f"o{i}": [i] for i in range(20)}
        assert c.getdel("obj") == value and c.get("obj") is None
