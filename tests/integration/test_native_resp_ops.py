"""setget, expire_if, getex, strlen, set_many_nx and scan (the ops a RESP endpoint maps Redis commands
onto) against a real 2-shard daemon, in raw frames: through the router, on a worker's own endpoint
where they are accepted there, in maintenance mode and at the memory bound."""

from __future__ import annotations

import random
import time

import pytest

from shardd import protocol as proto
from shardd.hashing import shard_for
from tests.helpers import keys_on_shard
from tests.integration import test_new_ops

raw = test_new_ops.raw  # the fixture: raw("router") / raw("worker0") / raw("worker1"), flushed first

DOC = b'{"name": "shardd", "tags": ["cache", "shard"], "n": 1}' * 200  # compressed by the workers (zstd)


@pytest.mark.parametrize("where", ["router", "worker0"])
def test_setget(raw, where: str) -> None:
    c = raw(where)
    key, missing = keys_on_shard(0, 2, 2, prefix="setget-")
    assert c.ok("setget", key, b"v1") is None  # GETSET on a missing key: created
    assert c.ok("setget", key, b"v2", 60_000) == b"v1"
    assert 59_000 < c.ok("ttl", key) <= 60_000
    assert c.ok("setget", key, b"v3", None, None, True) == b"v2"  # SET k v3 KEEPTTL GET
    assert 59_000 < c.ok("ttl", key) <= 60_000
    assert c.ok("setget", key, b"v4") == b"v3"  # plain SET … GET clears the TTL
    assert c.ok("ttl", key) == -1
    assert c.ok("setget", key, b"no", None, proto.IF_ABSENT) == b"v4"  # NX on a live key: old value, not stored
    assert c.ok("get", key) == b"v4"
    assert c.ok("setget", missing, b"no", None, proto.IF_PRESENT) is None  # XX on a missing key
    assert c.ok("exists", missing) is False
    assert c.ok("setget", key, DOC) == b"v4"
    assert c.ok("setget", key, b"small") == DOC  # the old value as written, though stored compressed
    reply = c.call("setget", key, b"x", 1000, None, True)
    assert reply.status == proto.BAD_REQUEST and "keep_ttl" in reply.value
    assert c.ok("get", key) == b"small"


@pytest.mark.parametrize("where", ["router", "worker1"])
def test_expire_if(raw, where: str) -> None:
    c = raw(where)
    plain, timed = keys_on_shard(1, 2, 2, prefix="expire-if-")
    c.ok("set", plain, b"v")
    c.ok("set", timed, b"v", 50_000)
    assert c.ok("expire_if", plain, 60_000, proto.EXPIRE_XX) is False  # no TTL: XX does not apply
    assert c.ok("expire_if", plain, 60_000, proto.EXPIRE_GT) is False  # no TTL is an infinite deadline
    assert c.ok("ttl", plain) == -1
    assert c.ok("expire_if", plain, 60_000, proto.EXPIRE_NX) is True
    assert 59_000 < c.ok("ttl", plain) <= 60_000
    assert c.ok("expire_if", timed, 10_000, proto.EXPIRE_GT) is False
    assert c.ok("expire_if", timed, 10_000, proto.EXPIRE_LT) is True
    assert 9_000 < c.ok("ttl", timed) <= 10_000
    assert c.ok("expire_if", timed, -1, proto.EXPIRE_GT) is False and c.ok("exists", timed) is True
    assert c.ok("expire_if", timed, 0) is True  # a deadline already past: deleted
    assert c.ok("exists", timed) is False
    assert c.ok("expire_if", timed, 1000) is False  # missing
    reply = c.call("expire_if", plain, 1000, 9)
    assert reply.status == proto.BAD_REQUEST and "when" in reply.value


@pytest.mark.parametrize("where", ["router", "worker0"])
def test_getex_and_strlen(raw, where: str) -> None:
    c = raw(where)
    key = keys_on_shard(0, 2, 1, prefix="getex-")[0]
    assert c.ok("getex", key) is None and c.ok("strlen", key) == 0
    c.ok("set", key, DOC, 50_000)
    assert c.ok("strlen", key) == len(DOC)
    assert c.ok("getex", key) == DOC and 49_000 < c.ok("ttl", key) <= 50_000  # no option: TTL unchanged
    assert c.ok("getex", key, 90_000) == DOC and 89_000 < c.ok("ttl", key) <= 90_000
    assert c.ok("getex", key, None, True) == DOC and c.ok("ttl", key) == -1
    reply = c.call("getex", key, 1000, True)
    assert reply.status == proto.BAD_REQUEST and "persist" in reply.value
    assert c.ok("getex", key, -5) == DOC  # GETEX PXAT in the past: read, then deleted
    assert c.ok("exists", key) is False and c.ok("strlen", key) == 0


def test_the_compressed_value_was_really_compressed(raw) -> None:
    # strlen's fast path (the zstd frame header) is the one exercised above only if the worker compressed DOC.
    c = raw("router")
    key = keys_on_shard(1, 2, 1, prefix="packed-")[0]
    def compressed() -> int:
        return sum(row.get("compressed_keys", 0) for row in c.ok("stats")["shards"])

    before = compressed()
    c.ok("set", key, DOC)
    assert compressed() == before + 1
    assert c.ok("strlen", key) == len(DOC)


def test_keyed_ops_for_another_shard_on_a_workers_endpoint_are_moved(raw) -> None:
    key = keys_on_shard(1, 2, 1, prefix="moved-")[0]
    w0 = raw("worker0")
    for op in (["setget", key, b"x"], ["expire_if", key, 100], ["getex", key], ["strlen", key]):
        reply = w0.call(*op)
        assert reply.status == proto.MOVED and reply.value["shard"] == 1, (op, reply)
    assert raw("worker1").ok("setget", key, b"x") is None


def test_set_many_nx(raw) -> None:
    c = raw("router")
    a, b, live = keys_on_shard(1, 2, 3, prefix="msetnx-")
    other = keys_on_shard(0, 2, 1, prefix="msetnx-")[0]
    assert c.ok("set_many_nx", [[a, b"1"], [b, b"2"]], 60_000) is True
    assert c.ok("get_many", [a, b]) == [b"1", b"2"] and 59_000 < c.ok("ttl", b) <= 60_000
    c.ok("delete_many", [a, b])
    c.ok("set", live, b"old")
    assert c.ok("set_many_nx", [[a, b"1"], [live, b"new"], [b, b"2"]]) is False  # all or nothing
    assert c.ok("get_many", [a, live, b]) == [None, b"old", None]
    reply = c.call("set_many_nx", [[a, b"1"], [other, b"2"]])
    assert reply.status == proto.BAD_REQUEST and "more than one shard (shards 0, 1)" in reply.value
    assert c.ok("get_many", [a, other]) == [None, None]  # nothing applied anywhere
    assert c.call("set_many_nx", []).status == proto.BAD_REQUEST
    reply = raw("worker1").call("set_many_nx", [[a, b"1"]])  # not on a worker's own endpoint: it is the router's
    assert reply.status == proto.BAD_REQUEST and "router" in reply.value


def scan_shard(c, shard: int, count: int, match: bytes | None = None) -> list[bytes]:
    cursor, keys = 0, []
    while True:
        cursor, found = c.ok("scan", shard, cursor, count, match)
        keys += found
        assert 0 <= cursor < 2**48
        # what a RESP endpoint hands its client: one global cursor with the shard folded in
        assert (cursor * 1024 + shard) % 1024 == shard
        if cursor == 0:
            return keys


def test_scan_across_both_shards_returns_every_key_exactly_once(raw) -> None:
    c = raw("router")
    keys = [b"scan:%d" % i for i in range(1500)]
    c.ok("set_many", [[k, b"v"] for k in keys])
    c.ok("set_many", [[b"other:%d" % i, b"v"] for i in range(100)])
    seen = []
    for shard in range(2):
        found = scan_shard(c, shard, 97, b"scan:*")
        assert all(shard_for(k, 2) == shard for k in found)
        seen += found
    assert len(seen) == len(keys) and set(seen) == set(keys)
    assert sorted(scan_shard(c, 0, 1000, b"scan:1[0-4]") + scan_shard(c, 1, 1000, b"scan:1[0-4]")) == sorted(
        b"scan:1%d" % i for i in range(5))
    everything = scan_shard(c, 0, 100_000) + scan_shard(c, 1, 100_000)
    assert len(everything) == 1600
    reply = c.call("scan", 2)
    assert reply.status == proto.BAD_REQUEST and "no shard 2" in reply.value
    assert c.call("scan", 0, 0, 0).status == proto.BAD_REQUEST
    assert raw("worker0").call("scan", 0).status == proto.BAD_REQUEST  # the router's op


def test_scan_with_writes_meanwhile_keeps_its_guarantees(raw) -> None:
    c = raw("router")
    stable = [b"stable:%d" % i for i in range(400)]
    doomed = [b"doomed:%d" % i for i in range(400)]
    c.ok("set_many", [[k, b"v"] for k in stable + doomed])
    rng = random.Random(3)
    gone: set[bytes] = set()
    seen = []
    for shard in range(2):
        cursor = 0
        while True:
            cursor, found = c.ok("scan", shard, cursor, 50)
            assert not gone & set(found)  # never a key deleted before the call
            seen += found
            if not cursor:
                break
            batch = rng.sample([k for k in doomed if k not in gone], 20)
            c.ok("delete_many", batch)
            gone.update(batch)
            c.ok("set", b"late:%d" % rng.randrange(10**9), b"v")
    assert len(seen) == len(set(seen))
    assert set(stable) <= set(seen)


def test_maintenance_refuses_the_writes_among_them(raw) -> None:
    c = raw("router")
    key, other = keys_on_shard(0, 2, 2, prefix="maint-")
    c.ok("set", key, b"v")
    assert c.ok("maintenance", True) is True
    for op in (["setget", key, b"x"], ["expire_if", key, 1000], ["getex", key, 1000], ["getex", key, None, True],
               ["set_many_nx", [[other, b"1"]]]):
        reply = c.call(*op)
        assert reply.status == proto.MAINTENANCE, (op, reply)
        reply = raw("worker0").call(*op)
        assert reply.status in (proto.MAINTENANCE, proto.BAD_REQUEST), (op, reply)  # set_many_nx: router's only
    assert c.ok("getex", key) == b"v"  # without a TTL change it only reads
    assert c.ok("strlen", key) == 1
    assert key in scan_shard(c, 0, 1000)
    assert c.ok("maintenance", False) is False
    assert c.ok("setget", key, b"w") == b"v"


def test_out_of_memory_writes_nothing(raw) -> None:
    c = raw("router")
    big = [random.Random(i).randbytes(200 * 1024) for i in range(3)]  # incompressible
    k1, k2, k3 = keys_on_shard(0, 2, 3, prefix="oom-")
    c.ok("tune", {"max_memory": 1024**2, "eviction_policy": "noeviction"})  # 512 KiB a shard
    try:
        reply = c.call("set_many_nx", [[k1, big[0]], [k2, big[1]], [k3, big[2]]])
        assert reply.status == proto.OUT_OF_MEMORY, reply
        assert c.ok("get_many", [k1, k2, k3]) == [None, None, None]
        c.ok("set", k1, b"small")
        reply = c.call("setget", k1, random.Random(9).randbytes(600 * 1024))  # larger than the shard's share
        assert reply.status == proto.OUT_OF_MEMORY
        assert c.ok("get", k1) == b"small"
    finally:
        c.ok("tune", {"max_memory": 1024**3, "eviction_policy": "allkeys-lru"})


def test_expired_keys_are_not_scanned_nor_measured(raw) -> None:
    c = raw("router")
    key = keys_on_shard(1, 2, 1, prefix="short-")[0]
    c.ok("set", key, b"abc", 50)
    time.sleep(0.1)
    assert c.ok("strlen", key) == 0
    assert key not in scan_shard(c, 1, 1000)
