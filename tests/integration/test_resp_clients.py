"""The RESP endpoint through real Redis clients: redis-py (sync RESP2/RESP3, asyncio) and redis-cli,
and byte-for-byte against a real redis-server for every reply that must be exactly Redis's.

One shardd daemon (2 shards, no password) serves most tests; a second one (passwords, a small
max_value_bytes) serves the authentication, maintenance and limit tests. Each test flushes what
it uses. Commands that need the native ops of branch native-ops are skipped, with the reason
printed, until those ops are in shardd.protocol.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio

from shardd.resp_commands import COMMANDS
from tests.helpers import keys_on_shard, run_cli, wait_until
from tests.resp_clients_support import (
    MISSING_OPS,
    NEEDS_OPS_REASON,
    RawConn,
    RedisServer,
    redis_server_path,
    start_resp_daemon,
    stop_daemon,
)

needs_ops = pytest.mark.skipif(bool(MISSING_OPS), reason=NEEDS_OPS_REASON)

PASSWORD = "s3cret-default"
ADMIN_PASSWORD = "s3cret-admin"
MAX_VALUE = 4096


@pytest.fixture(scope="module")
def shardd_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    d, port = start_resp_daemon(tmp_path_factory.mktemp("resp"), shards=2)
    try:
        yield port
    finally:
        stop_daemon(d)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, int]]:
    """A daemon with both RESP passwords and max_value_bytes = MAX_VALUE: (Daemon, resp port)."""
    d, port = start_resp_daemon(
        tmp_path_factory.mktemp("resp-secured"), shards=2,
        config_text=f'resp_password = "{PASSWORD}"\nresp_admin_password = "{ADMIN_PASSWORD}"\n'
                    f"max_value_bytes = {MAX_VALUE}\n")
    try:
        yield d, port
    finally:
        stop_daemon(d)


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real redis-server with shardd's memory settings, so CONFIG GET answers alike."""
    if redis_server_path() is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server); .ci/run installs it")
    server = RedisServer(tmp_path_factory.mktemp("redis"), "--maxmemory", str(1024**3),
                         "--maxmemory-policy", "allkeys-lru")
    try:
        yield server.port
    finally:
        server.stop()


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def r(request: pytest.FixtureRequest, shardd_port: int) -> Iterator[redis.Redis]:
    """A redis-py client on a flushed shardd, in RESP2 and in RESP3."""
    client = redis.Redis(port=shardd_port, protocol=request.param, socket_timeout=30)
    client.flushall()
    yield client
    client.close()


# --- byte-for-byte against redis-server -------------------------------------------------------------

ONE_SHARD = [k.decode() for k in keys_on_shard(0, 2, 3, prefix="same")]
TWO_SHARDS = [keys_on_shard(0, 2, 1, prefix="x")[0].decode(), keys_on_shard(1, 2, 1, prefix="x")[0].decode()]

# Each group runs from an empty keyspace on both servers, in order; every reply must be the same bytes.
EXACT: dict[str, list[tuple[str, ...]]] = {
    "strings": [
        ("SET", "k", "v"), ("GET", "k"), ("GET", "missing"), ("SET", "k", "v2", "NX"), ("SET", "n1", "v", "XX"),
        ("SET", "k", "v3", "XX"), ("GET", "k"), ("SET", "k", "v", "EX", "100"), ("TTL", "k"),
        ("SET", "k", "v", "PX", "100000"), ("TTL", "k"), ("SET", "k", "v", "EXAT", "4000000000"),
        ("SET", "k", "v", "PXAT", "4000000000000"), ("SET", "k", "v"), ("TTL", "k"),
        ("SETNX", "k", "x"), ("SETNX", "k2", "x"), ("GET", "k2"),
        ("SETEX", "k3", "100", "v"), ("TTL", "k3"), ("PSETEX", "k4", "100000", "v"), ("TTL", "k4"),
        ("GETDEL", "k4"), ("GETDEL", "k4"), ("GET", "k4"),
        ("APPEND", "a", "x"), ("APPEND", "a", "yz"), ("GET", "a"),
        ("MSET", "m1", "1", "m2", "2"), ("MGET", "m1", "missing", "m2", "a"),
        ("GETEX", "m1"), ("GETEX", "missing"),
        ("SET", "empty", ""), ("GET", "empty"), ("SET", "bin", "\x00\r\n\xff"), ("GET", "bin"),
    ],
    "string errors": [
        ("SET", "k", "old"), ("SET", "k", "v", "EX", "0"), ("SET", "k", "v", "EX", "-5"), ("SET", "k", "v", "PX", "0"),
        ("SET", "k", "v", "EX", "abc"), ("SET", "k", "v", "EX", "1.5"), ("SET", "k", "v", "EX", "10", "PX", "10"),
        ("SET", "k", "v", "NX", "XX"), ("SET", "k", "v", "FOO"), ("SET", "k", "v", "EX"),
        ("SET", "k", "v", "KEEPTTL", "EX", "10"), ("SETEX", "k", "0", "v"), ("SETEX", "k", "-1", "v"),
        ("SETEX", "k", "abc", "v"), ("PSETEX", "k", "0", "v"), ("MSET", "a"), ("MSET", "a", "1", "b"),
        ("GETEX", "k", "FOO"), ("GETEX", "k", "EX"), ("GETEX", "k", "EX", "0"), ("GETEX", "k", "EX", "abc"),
        ("SET", "k", "v", "EX", "007"), ("SETEX", "k", "010", "v"), ("GET", "k"), ("TTL", "k"),
    ],
    "counters": [
        ("INCR", "n"), ("INCRBY", "n", "10"), ("DECR", "n"), ("DECRBY", "n", "5"), ("GET", "n"),
        ("INCRBY", "n", "-20"), ("DECRBY", "n", "-3"), ("INCRBY", "n", "abc"), ("INCRBY", "n", "1.5"),
        ("INCRBY", "n", " 1"), ("INCRBY", "n", "+1"), ("DECRBY", "n", "99999999999999999999"),
        ("SET", "s", "abc"), ("INCR", "s"), ("DECR", "s"), ("SET", "s", " 1"), ("INCR", "s"),
        ("SET", "s", "1.0"), ("INCR", "s"),
        ("SET", "big", "9223372036854775807"), ("INCR", "big"), ("INCRBY", "big", "1"), ("GET", "big"),
        ("SET", "small", "-9223372036854775808"), ("DECR", "small"), ("DECRBY", "small", "1"),
        ("DECRBY", "n", "-9223372036854775808"), ("INCRBY", "n", "-9223372036854775808"), ("GET", "n"),
        ("SET", "z", "007"), ("INCR", "z"), ("SET", "z", "-01"), ("INCR", "z"),
        ("INCRBY", "n", "007"), ("INCRBY", "n", "-0"), ("DECRBY", "n", "-007"), ("GET", "n"),
    ],
    "keyspace": [
        ("MSET", "a", "1", "b", "2", "c", "3"), ("DEL", "a", "missing"), ("DEL", "a"), ("UNLINK", "b", "b", "x"),
        ("EXISTS", "c", "c", "missing", "c"), ("EXISTS", "missing"), ("TOUCH", "c", "missing", "c"),
        ("TOUCH", "missing"), ("TYPE", "c"), ("TYPE", "missing"), ("TTL", "missing"), ("PTTL", "missing"),
        ("TTL", "c"), ("PTTL", "c"), ("PERSIST", "c"), ("PERSIST", "missing"), ("SETEX", "t", "100", "v"),
        ("PERSIST", "t"), ("TTL", "t"), ("EXPIRETIME", "c"), ("EXPIRETIME", "missing"),
        ("PEXPIRETIME", "c"), ("PEXPIRETIME", "missing"), ("DBSIZE",), ("FLUSHALL",), ("DBSIZE",),
        ("SET", "a", "1"), ("FLUSHDB",), ("EXISTS", "a"), ("FLUSHALL", "ASYNC"), ("FLUSHALL", "SYNC"),
        ("FLUSHALL", "FOO"),
    ],
    "server": [
        ("PING",), ("PING", "hi"), ("PING", "a", "b"), ("ECHO", "hello"), ("ECHO",), ("SELECT", "0"),
        ("SELECT", "abc"), ("CLIENT", "GETNAME"), ("CLIENT", "SETNAME", "conn-1"), ("CLIENT", "GETNAME"),
        ("CLIENT", "SETNAME", "a b"), ("CLIENT", "FOO"), ("CLIENT", "GETNAME", "x"),
        ("CONFIG", "GET", "maxmemory"), ("CONFIG", "GET", "maxmemory-policy"), ("CONFIG", "FOO"),
        ("CONFIG", "GET"), ("HELLO", "4"), ("HELLO", "abc"), ("COMMAND", "FOO"),
        ("AUTH", "nopass"), ("QUIT", "x"),
    ],
    "unknown and arity": [
        ("FOO",), ("FOO", "bar", "baz"), ("foo", "x" * 200), ("GET",), ("GET", "a", "b"),
        ("SET", "k"), ("SETNX", "k"), ("SETEX", "k", "1"), ("GETDEL",), ("APPEND", "k"), ("MGET",),
        ("INCR",), ("INCRBY", "k"), ("DEL",), ("EXISTS",), ("TTL",), ("TYPE",), ("DBSIZE", "x"),
        ("TIME", "x"), ("EXPIRE", "k"), ("SCAN",), ("SELECT",),
    ],
}

EXACT_WITH_NATIVE_OPS: dict[str, list[tuple[str, ...]]] = {
    "set options": [
        ("SET", "k", "v1", "GET"), ("SET", "k", "v2", "GET"), ("SET", "k", "v3", "NX", "GET"), ("GET", "k"),
        ("SET", "k2", "v", "XX", "GET"), ("EXISTS", "k2"), ("SET", "k", "v", "EX", "100"),
        ("SET", "k", "w", "KEEPTTL"), ("TTL", "k"), ("GET", "k"), ("SET", "k", "x", "KEEPTTL", "GET"), ("TTL", "k"),
        ("SET", "k", "y"), ("TTL", "k"), ("SET", "k", "z", "XX", "KEEPTTL"), ("SET", "new", "z", "XX", "KEEPTTL"),
        ("SET", "new", "z", "NX", "KEEPTTL"), ("GET", "new"),
        ("GETSET", "k", "g1"), ("GETSET", "gs", "g1"), ("GET", "gs"),
        ("GETEX", "k", "EX", "100"), ("TTL", "k"), ("GETEX", "k", "PX", "200000"), ("TTL", "k"),
        ("GETEX", "k", "EXAT", "4000000000"), ("GETEX", "k", "PERSIST"), ("TTL", "k"), ("GETEX", "missing", "EX", "5"),
        ("STRLEN", "k"), ("STRLEN", "missing"), ("SET", "u", "\u00e9\u00e9"), ("STRLEN", "u"),
        ("MSETNX", ONE_SHARD[0], "1", ONE_SHARD[1], "2"), ("MSETNX", ONE_SHARD[1], "3", ONE_SHARD[2], "4"),
        ("MGET", *ONE_SHARD), ("MSETNX", "a"),
        ("SET", "k", "v", "EXAT", "1"), ("EXISTS", "k"), ("SET", "k", "v"), ("SET", "k", "v", "PXAT", "1", "GET"),
        ("EXISTS", "k"),
    ],
    "expire": [
        ("SET", "k", "v"), ("EXPIRE", "k", "100"), ("TTL", "k"), ("EXPIRE", "k", "50", "GT"), ("TTL", "k"),
        ("EXPIRE", "k", "200", "GT"), ("TTL", "k"), ("EXPIRE", "k", "50", "LT"), ("TTL", "k"),
        ("EXPIRE", "k", "500", "LT"), ("EXPIRE", "k", "100", "NX"), ("EXPIRE", "k", "100", "XX"), ("TTL", "k"),
        ("SET", "p", "v"), ("EXPIRE", "p", "100", "XX"), ("EXPIRE", "p", "100", "GT"), ("TTL", "p"),
        ("EXPIRE", "p", "100", "LT"), ("TTL", "p"), ("PERSIST", "p"), ("EXPIRE", "p", "100", "NX"), ("TTL", "p"),
        ("EXPIRE", "missing", "100"), ("PEXPIRE", "k", "300000"), ("TTL", "k"),
        # (EXPIRETIME after EXPIREAT: test_expiretime_answers_what_expireat_set)
        ("EXPIREAT", "k", "4000000000"), ("PEXPIREAT", "k", "4000000000123"), ("EXPIREAT", "k", "4000000000", "LT"),
        ("EXPIREAT", "k", "4000000001", "LT"), ("EXPIREAT", "k", "3999999999", "GT"),
        ("EXPIRE", "k", "10", "NX", "XX"), ("EXPIRE", "k", "10", "GT", "LT"), ("EXPIRE", "k", "10", "NX", "GT"),
        ("EXPIRE", "k", "10", "FOO"), ("EXPIRE", "k", "abc"), ("EXPIRE", "k", "1.5"),
        ("PEXPIRE", "k", "9223372036854775807"), ("EXPIRE", "k", "9223372036854775807"),
        ("EXPIREAT", "k", "-9223372036854775808"),
        ("SET", "d", "v"), ("EXPIRE", "d", "-1"), ("EXISTS", "d"), ("SET", "d", "v"), ("EXPIRE", "d", "0"),
        ("EXISTS", "d"), ("SET", "d", "v"), ("PEXPIREAT", "d", "1"), ("EXISTS", "d"),
        ("SET", "d", "v"), ("EXPIRE", "d", "-1", "XX"), ("EXISTS", "d"), ("EXPIRE", "d", "-1", "NX"), ("EXISTS", "d"),
    ],
}

# By-design differences: the command, what shardd answers, and why Redis's answer is not followed.
EXPECTED_DIFFERENCES: list[tuple[tuple[str, ...], bytes, str]] = [
    (("SELECT", "1"), b"-ERR DB index is out of range\r\n",
     "shardd has one keyspace (databases = 1); Redis has 16"),
    (("LPUSH", "l", "a"), b"-ERR unknown command 'LPUSH', with args beginning with: 'l' 'a' \r\n",
     "only strings and the keyspace are supported; lists, hashes, sets ... are unknown commands"),
    (("COMMAND", "COUNT"), b":%d\r\n" % len(COMMANDS), "COMMAND lists the commands shardd supports"),
    (("MSETNX", *[w for k in TWO_SHARDS for w in (k, "v")]), b"-CROSSSLOT",
     "MSETNX is all-or-nothing only on one shard; keys on several shards are refused (CROSSSLOT)"),
    (("CONFIG", "SET", "maxmemory", "0"), b"-ERR Unknown option or number of arguments for CONFIG SET",
     "settings change through shardd's own config and `shardd tune`, not CONFIG SET"),
]


def _run_both(redis_port: int, shardd_port: int, commands: list[tuple[str, ...]], protocol: int) -> list[str]:
    """Run ``commands`` on both servers from an empty keyspace; the mismatches, described."""
    mismatches = []
    with RawConn(redis_port) as want, RawConn(shardd_port) as got:
        for conn in (want, got):
            assert conn.call("FLUSHALL") == b"+OK\r\n"
            if protocol == 3:
                assert conn.call("HELLO", "3").startswith(b"%")
        for args in commands:
            expected, actual = want.call(*args), got.call(*args)
            if expected != actual:
                mismatches.append(f"{' '.join(args)[:80]}: redis {expected[:200]!r} != shardd {actual[:200]!r}")
    return mismatches


@pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])
@pytest.mark.parametrize("group", list(EXACT))
def test_replies_are_exactly_redis(redis_port: int, shardd_port: int, group: str, protocol: int) -> None:
    mismatches = _run_both(redis_port, shardd_port, EXACT[group], protocol)
    assert not mismatches, "\n".join(mismatches)


@needs_ops
@pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])
@pytest.mark.parametrize("group", list(EXACT_WITH_NATIVE_OPS))
def test_replies_are_exactly_redis_native_ops(redis_port: int, shardd_port: int, group: str, protocol: int) -> None:
    mismatches = _run_both(redis_port, shardd_port, EXACT_WITH_NATIVE_OPS[group], protocol)
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.parametrize("args,shardd_reply,reason", EXPECTED_DIFFERENCES,
                         ids=[" ".join(a[:2]) for a, _, _ in EXPECTED_DIFFERENCES])
def test_expected_differences_from_redis(redis_port: int, shardd_port: int, args: tuple[str, ...],
                                         shardd_reply: bytes, reason: str) -> None:
    if args[0] == "MSETNX" and MISSING_OPS:
        pytest.skip(NEEDS_OPS_REASON)
    with RawConn(redis_port) as want, RawConn(shardd_port) as got:
        expected, actual = want.call(*args), got.call(*args)
    assert actual.startswith(shardd_reply), (reason, actual)
    assert expected != actual, f"no longer a difference ({reason}): both answer {actual!r}"


# --- redis-py, sync, RESP2 and RESP3 ----------------------------------------------------------------


def test_get_set_and_options(r: redis.Redis) -> None:
    assert r.set("k", "v") is True
    assert r.get("k") == b"v"
    assert r.get("missing") is None
    assert r.set("k", "v2", nx=True) is None
    assert r.set("k", "v2", xx=True) is True
    assert r.set("fresh", "v", xx=True) is None
    assert r.set("k", "v", ex=100) is True
    assert 99 <= r.ttl("k") <= 100
    assert r.set("k", "v", px=100_000) is True
    assert 99_000 < r.pttl("k") <= 100_000
    assert r.set("k", "v", exat=int(time.time()) + 100) is True
    assert 90 <= r.ttl("k") <= 100
    assert r.set("k", "v", pxat=int(time.time() * 1000) + 100_000) is True
    assert 90 <= r.ttl("k") <= 100
    assert r.setnx("k", "x") is False
    assert r.setnx("nx", "x") is True
    assert r.execute_command("SETEX", "se", 100, "v") is True and 99 <= r.ttl("se") <= 100
    assert r.psetex("pse", 100_000, "v") is True and 99 <= r.ttl("pse") <= 100
    assert r.getdel("pse") == b"v" and r.getdel("pse") is None
    assert r.append("a", "x") == 1 and r.append("a", "yz") == 3 and r.get("a") == b"xyz"
    assert r.mset({"m1": "1", "m2": "2"}) is True
    assert r.mget("m1", "missing", "m2") == [b"1", None, b"2"]
    with pytest.raises(redis.ResponseError, match="invalid expire time in 'set' command"):
        r.set("k", "v", ex=0)
    with pytest.raises(redis.ResponseError, match=r"^syntax error$"):
        r.execute_command("SET", "k", "v", "NX", "XX")


@needs_ops
def test_set_get_keepttl_getset_getex_strlen(r: redis.Redis) -> None:
    assert r.set("k", "v1", get=True) is None
    assert r.set("k", "v2", get=True) == b"v1"
    assert r.set("k", "v", ex=100) is True
    assert r.set("k", "w", keepttl=True) is True
    assert 99 <= r.ttl("k") <= 100
    assert r.getset("k", "g") == b"w"
    assert r.getex("k", ex=200) == b"g" and 199 <= r.ttl("k") <= 200
    assert r.getex("k", persist=True) == b"g" and r.ttl("k") == -1
    assert r.getex("k", px=50_000) == b"g" and 49 <= r.ttl("k") <= 50
    assert r.getex("missing", ex=5) is None
    assert r.strlen("k") == 1 and r.strlen("missing") == 0


@needs_ops
def test_msetnx_one_shard_and_across_shards(r: redis.Redis) -> None:
    a, b, c = ONE_SHARD
    assert r.msetnx({a: "1", b: "2"}) is True
    assert r.msetnx({b: "x", c: "3"}) is False
    assert r.mget(a, b, c) == [b"1", b"2", None]
    with pytest.raises(redis.ResponseError) as err:  # CROSSSLOT: redis-py's ClusterCrossSlotError
        r.msetnx({TWO_SHARDS[0]: "1", TWO_SHARDS[1]: "2"})
    assert "CROSSSLOT" in repr(err.value) or "hash to the same" in str(err.value), repr(err.value)
    assert r.exists(*TWO_SHARDS) == 0  # nothing was set


def test_counters_and_their_errors(r: redis.Redis) -> None:
    assert r.incr("n") == 1 and r.incrby("n", 10) == 11 and r.decr("n") == 10 and r.decrby("n", 5) == 5
    assert r.incr("n", -7) == -2 and r.get("n") == b"-2"
    r.set("s", "abc")
    with pytest.raises(redis.ResponseError, match=r"^value is not an integer or out of range$"):
        r.incr("s")
    with pytest.raises(redis.ResponseError, match=r"^value is not an integer or out of range$"):
        r.execute_command("INCRBY", "n", "1.5")
    r.set("big", 2**63 - 1)
    with pytest.raises(redis.ResponseError, match=r"^increment or decrement would overflow$"):
        r.incr("big")
    assert r.get("big") == b"9223372036854775807"
    r.set("small", -(2**63))
    with pytest.raises(redis.ResponseError, match=r"^increment or decrement would overflow$"):
        r.decr("small")


def test_incr_of_minus_zero_is_not_an_integer(shardd_port: int) -> None:
    """Redis's string2ll refuses "-0" (as it refuses "007"), so INCR of a stored "-0" is an error."""
    with RawConn(shardd_port) as conn:
        assert conn.call("SET", "z", "-0") == b"+OK\r\n"
        assert conn.call("INCR", "z") == b"-ERR value is not an integer or out of range\r\n"
        assert conn.call("GET", "z") == b"$2\r\n-0\r\n"


def test_keyspace_commands(r: redis.Redis) -> None:
    r.mset({"a": "1", "b": "2", "c": "3"})
    assert r.delete("a", "missing") == 1
    assert r.unlink("b", "b") == 1
    assert r.exists("c", "c", "missing") == 2  # duplicates counted, as Redis
    assert r.touch("c", "missing", "c") == 2
    assert r.type("c") == b"string" and r.type("missing") == b"none"
    assert r.ttl("c") == -1 and r.pttl("c") == -1 and r.ttl("missing") == -2 and r.pttl("missing") == -2
    assert r.persist("c") is False
    r.set("t", "v", ex=100)
    assert r.persist("t") is True and r.ttl("t") == -1
    assert r.expiretime("c") == -1 and r.expiretime("missing") == -2
    assert r.dbsize() == 2
    assert r.flushdb() is True and r.dbsize() == 0


@needs_ops
def test_expire_family(r: redis.Redis) -> None:
    r.set("k", "v")
    assert r.expire("k", 100) is True and 99 <= r.ttl("k") <= 100
    assert r.expire("k", 50, gt=True) is False
    assert r.expire("k", 200, gt=True) is True and 199 <= r.ttl("k") <= 200
    assert r.expire("k", 50, lt=True) is True and 49 <= r.ttl("k") <= 50
    assert r.expire("k", 10, nx=True) is False
    assert r.expire("k", 100, xx=True) is True
    assert r.pexpire("k", 300_000) is True and 299 <= r.ttl("k") <= 300
    assert r.pexpire("k", 400_000, lt=True) is False
    when = int(time.time()) + 1000
    # Within a second / a millisecond: exactness is test_expiretime_answers_what_expireat_set's.
    assert r.expireat("k", when) is True and abs(r.expiretime("k") - when) <= 1
    # PEXPIRETIME: never earlier than set (but for 1 ms of rounding), later by the op's time in queues
    assert r.pexpireat("k", when * 1000 + 123) is True and -1 <= r.pexpiretime("k") - (when * 1000 + 123) <= 500
    assert r.expireat("k", when + 10, gt=True) is True and abs(r.expiretime("k") - when - 10) <= 1
    assert r.expireat("k", when + 20, lt=True) is False
    assert r.expire("missing", 10) is False
    r.set("p", "v")
    assert r.expire("p", 10, xx=True) is False and r.ttl("p") == -1
    assert r.expire("p", 10, gt=True) is False  # no TTL counts as infinite
    assert r.expire("p", 10, lt=True) is True
    with pytest.raises(redis.ResponseError, match="NX and XX, GT or LT options at the same time are not compatible"):
        r.expire("k", 10, nx=True, xx=True)
    assert r.expire("p", -1) is True and r.exists("p") == 0


@needs_ops
def test_expiretime_answers_what_expireat_set(r: redis.Redis) -> None:
    """EXPIREAT T then EXPIRETIME answers T in Redis (it stores the absolute time). shardd keeps
    deadlines on the monotonic clock, so the time comes back later by the op's time in queues
    (never earlier, but for a millisecond of clock rounding): EXPIRETIME snaps to T, PEXPIRETIME
    is within that (docs/resp.md, differences). Repeated: the rounding only shows some of the time."""
    wrong = []
    base = int(time.time()) + 1000
    r.set("k", "v")
    for i in range(30):
        r.expireat("k", base + i)
        if (got := r.expiretime("k")) != base + i:
            wrong.append(f"EXPIREAT {base + i} -> EXPIRETIME {got}")
        at = (base + i) * 1000 + 123
        r.pexpireat("k", at)
        if not at - 1 <= (got := r.pexpiretime("k")) <= at + 500:
            wrong.append(f"PEXPIREAT {at} -> PEXPIRETIME {got}")
    assert not wrong, f"{len(wrong)} of 60 wrong: {wrong[:6]}"


@needs_ops
def test_scan_returns_every_key_of_both_shards_exactly_once(r: redis.Redis) -> None:
    on0, on1 = keys_on_shard(0, 2, 150, prefix="scan"), keys_on_shard(1, 2, 150, prefix="scan")
    r.mset({k: "v" for k in on0 + on1})
    r.mset({f"other{i}": "v" for i in range(20)})
    seen = list(r.scan_iter(count=7))
    assert len(seen) == len(set(seen)) == 320
    assert set(seen) == set(on0 + on1) | {f"other{i}".encode() for i in range(20)}
    matched = list(r.scan_iter(match="other1*", count=1000))
    assert sorted(matched) == sorted(f"other{i}".encode() for i in range(20) if str(i).startswith("1"))
    cursor, batch = r.scan(0, count=5)
    assert cursor != 0 and 0 < len(batch) <= 10  # COUNT is a hint, as in Redis
    cursor, everything = 0, []
    while True:  # the raw cursor protocol: starts and ends at 0
        cursor, batch = r.scan(cursor, count=1000)
        everything += batch
        if cursor == 0:
            break
    assert len(everything) == 320
    assert r.scan(0, _type="list") == (0, [])


def test_info_parses(r: redis.Redis) -> None:
    r.mset({"a": "1", "b": "2"})
    r.set("t", "v", ex=100)
    info = r.info()
    assert info["redis_mode"] == "standalone" and isinstance(info["connected_clients"], int)
    assert info["connected_clients"] >= 1 and "used_memory" in info and info["maxmemory_policy"]
    assert info["db0"] == {"keys": 3, "expires": 1, "avg_ttl": 0}
    assert r.info("keyspace") == {"db0": {"keys": 3, "expires": 1, "avg_ttl": 0}}
    server = r.info("server")
    assert server["redis_version"] and "shardd_version" in server and "used_memory" not in server
    assert r.info("shardd")["shards"] == 2
    r.flushall()
    assert r.info("keyspace") == {}
    assert r.get("x") is None
    assert r.info("commandstats")["cmdstat_get"]["calls"] >= 1


def test_info_has_the_cluster_section(r: redis.Redis) -> None:
    """Redis's default INFO has "# Cluster" with cluster_enabled:0; clients read it to choose between
    a cluster and a standalone client (redis-py's own test harness fails without it)."""
    assert r.info()["cluster_enabled"] == 0
    assert r.info("cluster") == {"cluster_enabled": 0}


def test_server_commands(r: redis.Redis) -> None:
    assert r.config_get("maxmemory") == {"maxmemory": str(1024**3)}
    assert r.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
    seconds, micros = r.time()
    assert abs(seconds - time.time()) < 3600 and 0 <= micros < 1_000_000
    assert r.ping() is True and r.echo("hi") == b"hi"
    assert r.execute_command("SELECT", 0) in (True, b"OK", "OK")
    with pytest.raises(redis.ResponseError, match="DB index is out of range"):
        r.execute_command("SELECT", 1)
    assert r.client_setname("conn-x") is True and r.client_getname() in ("conn-x", b"conn-x")
    assert isinstance(r.client_id(), int) and r.client_id() > 0
    assert r.client_setinfo("LIB-NAME", "tests") is True
    assert r.command_count() == len(COMMANDS)
    info = r.command()  # COMMAND: every command's info, by name
    assert len(info) == len(COMMANDS) and set(info) >= {"get", "set", "scan"}
    assert info["get"]["arity"] == 2 and info["set"]["arity"] == -3 and info["mset"]["step_count"] == 2


@pytest.mark.parametrize("proto", [2, 3])
def test_hello(shardd_port: int, proto: int) -> None:
    with redis.Redis(port=shardd_port, protocol=2) as client:
        hello = client.execute_command("HELLO", proto)
        if isinstance(hello, list):  # RESP2: a flat array of names and values
            hello = dict(zip(hello[::2], hello[1::2], strict=True))
        hello = {(k.decode() if isinstance(k, bytes) else k): v for k, v in hello.items()}
        assert hello["proto"] == proto and hello["server"] in (b"redis", "redis") and hello["id"] > 0
        assert hello["mode"] in (b"standalone", "standalone")


def test_flushall_and_flushdb(r: redis.Redis) -> None:
    r.mset({k: "v" for k in keys_on_shard(0, 2, 5) + keys_on_shard(1, 2, 5)})
    assert r.dbsize() == 10
    assert r.flushall() is True and r.dbsize() == 0
    r.set("a", "1")
    assert r.flushdb(asynchronous=True) is True and r.get("a") is None


def test_pipeline_of_1000_mixed_commands_answers_in_order(r: redis.Redis) -> None:
    keys = [f"p{i}" for i in range(200)]
    pipe = r.pipeline(transaction=False)
    expected: list[object] = []
    for i, key in enumerate(keys):
        pipe.set(key, i)
        expected.append(True)
        pipe.get(key)
        expected.append(str(i).encode())
        pipe.incr(key)
        expected.append(i + 1)
        pipe.exists(key, "missing", key)
        expected.append(2)
        if i % 2:
            pipe.delete(key)
            expected.append(1)
        else:
            pipe.echo(f"e{i}")
            expected.append(f"e{i}".encode())
    assert len(expected) == 1000
    assert pipe.execute() == expected
    assert r.dbsize() == 100


def test_pipeline_errors_stay_in_place(r: redis.Redis) -> None:
    pipe = r.pipeline(transaction=False)
    pipe.set("s", "x").incr("s").get("s").execute_command("FOO").echo("after")
    replies = pipe.execute(raise_on_error=False)
    assert replies[0] is True and replies[2] == b"x" and replies[4] == b"after"
    assert isinstance(replies[1], redis.ResponseError) and isinstance(replies[3], redis.ResponseError)
    assert "unknown command 'FOO'" in str(replies[3])


def test_unknown_command_and_wrong_arity_texts(shardd_port: int) -> None:
    with RawConn(shardd_port) as conn:
        assert conn.call("FOO", "bar", "baz") == (
            b"-ERR unknown command 'FOO', with args beginning with: 'bar' 'baz' \r\n")
        assert conn.call("FOO") == b"-ERR unknown command 'FOO', with args beginning with: \r\n"
        assert conn.call("GET") == b"-ERR wrong number of arguments for 'get' command\r\n"
        assert conn.call("set", "k") == b"-ERR wrong number of arguments for 'set' command\r\n"
        assert conn.call("PING") == b"+PONG\r\n"  # the connection goes on


# --- redis-py asyncio --------------------------------------------------------------------------------


@pytest.mark.parametrize("proto", [2, 3])
def test_asyncio_client(shardd_port: int, proto: int) -> None:
    async def main() -> None:
        client = redis.asyncio.Redis(port=shardd_port, protocol=proto, socket_timeout=30)
        try:
            await client.flushall()
            assert await client.set("k", "v", ex=100) is True
            assert await client.get("k") == b"v"
            assert await client.incr("n") == 1 and await client.incrby("n", 4) == 5
            assert await client.mset({"a": "1", "b": "2"}) is True
            assert await client.mget("a", "b", "missing") == [b"1", b"2", None]
            assert await client.exists("a", "a", "missing") == 2
            assert 99 <= await client.ttl("k") <= 100
            assert await client.delete("a", "b") == 2 and await client.dbsize() == 2
            with pytest.raises(redis.ResponseError, match="value is not an integer"):
                await client.incr("k")
            # Many commands in flight at once on several connections: each gets its own answer.
            results = await asyncio.gather(*(client.echo(f"m{i}") for i in range(50)))
            assert results == [f"m{i}".encode() for i in range(50)]
            async with client.pipeline(transaction=False) as pipe:
                for i in range(300):
                    pipe.set(f"ap{i}", i).get(f"ap{i}")
                replies = await pipe.execute()
            assert replies == [x for i in range(300) for x in (True, str(i).encode())]
            assert (await client.info("keyspace"))["db0"]["keys"] == 302
        finally:
            await client.aclose()

    asyncio.run(main())


# --- authentication, admin, maintenance, limits --------------------------------------------------


def test_noauth_before_auth_and_wrongpass(secured: tuple[object, int]) -> None:
    _, port = secured
    with RawConn(port) as conn:
        assert conn.call("GET", "k") == b"-NOAUTH Authentication required.\r\n"
        assert conn.call("AUTH", "wrong") == b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
        assert conn.call("AUTH", "admin", PASSWORD) == (
            b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
        assert conn.call("PING") == b"-NOAUTH Authentication required.\r\n"
        assert conn.call("AUTH", PASSWORD) == b"+OK\r\n"
        assert conn.call("PING") == b"+PONG\r\n"
    with redis.Redis(port=port, socket_timeout=30) as anonymous, pytest.raises(redis.AuthenticationError):
        anonymous.get("k")
    with redis.Redis(port=port, password="wrong", socket_timeout=30) as bad, pytest.raises(redis.AuthenticationError):
        bad.ping()
    for proto in (2, 3):
        with redis.Redis(port=port, password=PASSWORD, protocol=proto, socket_timeout=30) as good:
            assert good.set("k", "v") is True and good.get("k") == b"v"


def test_admin_user_needed_for_flushall(secured: tuple[object, int]) -> None:
    _, port = secured
    with redis.Redis(port=port, password=PASSWORD, socket_timeout=30) as user:
        user.set("k", "v")
        with pytest.raises(redis.exceptions.NoPermissionError, match="flushall"):
            user.flushall()
        with pytest.raises(redis.exceptions.NoPermissionError, match="flushdb"):
            user.flushdb()
        assert user.get("k") == b"v"
    with redis.Redis(port=port, username="admin", password=ADMIN_PASSWORD, socket_timeout=30) as admin:
        assert admin.get("k") == b"v"  # the admin user runs everything
        assert admin.flushall() is True
        assert admin.dbsize() == 0
    with (redis.Redis(port=port, username="admin", password=PASSWORD, socket_timeout=30) as wrong,
          pytest.raises(redis.AuthenticationError)):
        wrong.ping()


def test_maintenance_refuses_writes_with_readonly(secured: tuple[object, int]) -> None:
    daemon, port = secured
    endpoint = daemon.endpoint  # type: ignore[attr-defined]
    with redis.Redis(port=port, password=PASSWORD, socket_timeout=30) as client:
        client.set("before", "v")
        done = run_cli(endpoint, "maintenance", "on")
        assert done.returncode == 0, done.stderr
        try:
            with pytest.raises(redis.ReadOnlyError):
                client.set("k", "v")
            with pytest.raises(redis.ReadOnlyError):
                client.incr("n")
            with pytest.raises(redis.ReadOnlyError):
                client.delete("before")
            assert client.get("before") == b"v" and client.exists("before") == 1
            assert client.mget("before", "k") == [b"v", None]
        finally:
            done = run_cli(endpoint, "maintenance", "off")
            assert done.returncode == 0, done.stderr
        assert client.set("k", "v") is True


def test_value_over_max_value_bytes_is_refused_and_the_connection_goes_on(secured: tuple[object, int]) -> None:
    _, port = secured
    with redis.Redis(port=port, password=PASSWORD, socket_timeout=30) as client:
        with pytest.raises(redis.ResponseError) as err:
            client.set("big", b"x" * (MAX_VALUE + 1))
        assert "value" in str(err.value).lower() and str(MAX_VALUE) in str(err.value), str(err.value)
        assert client.get("big") is None
        assert client.set("fits", b"x" * MAX_VALUE) is True
        client.set("a", b"x" * (MAX_VALUE - 1))
        with pytest.raises(redis.ResponseError):
            client.append("a", "yy")
        assert client.strlen("a") == MAX_VALUE - 1 if not MISSING_OPS else client.get("a") == b"x" * (MAX_VALUE - 1)
        assert client.ping() is True


# --- redis-cli --------------------------------------------------------------------------------------


def _redis_cli(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["redis-cli", *args], capture_output=True, text=True, timeout=60, input=input,
                          stdin=None if input is not None else subprocess.DEVNULL)


@pytest.fixture(scope="module")
def cli() -> None:
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed (apt-get install redis-tools); .ci/run installs it")


def test_redis_cli(cli: None, shardd_port: int) -> None:
    port = str(shardd_port)
    assert _redis_cli("-p", port, "flushall").stdout == "OK\n"
    assert _redis_cli("-p", port, "set", "cli:k", "hello world").stdout == "OK\n"
    assert _redis_cli("-p", port, "get", "cli:k").stdout == "hello world\n"
    assert _redis_cli("-p", port, "--raw", "get", "cli:k").stdout == "hello world\n"
    assert _redis_cli("-p", port, "get", "cli:missing").stdout == "\n"
    assert _redis_cli("-p", port, "incr", "cli:n").stdout == "1\n"
    assert _redis_cli("-p", port, "mget", "cli:k", "cli:n").stdout == "hello world\n1\n"
    info = _redis_cli("-p", port, "info", "server").stdout
    assert info.startswith("# Server") and "redis_version:" in info and "redis_mode:standalone" in info
    unknown = _redis_cli("-p", port, "foo", "bar")
    assert unknown.stdout.rstrip("\n") == "ERR unknown command 'foo', with args beginning with: 'bar' ", unknown
    piped = _redis_cli("-p", port, input="set cli:p 1\nincrby cli:p 41\nget cli:p\n")
    assert piped.stdout == "OK\n42\n42\n"


def test_redis_cli_with_password(cli: None, secured: tuple[object, int]) -> None:
    port = str(secured[1])
    assert _redis_cli("-p", port, "--no-auth-warning", "-a", PASSWORD, "set", "cli:a", "1").stdout == "OK\n"
    assert _redis_cli("-p", port, "--no-auth-warning", "-a", PASSWORD, "get", "cli:a").stdout == "1\n"
    denied = _redis_cli("-p", port, "get", "cli:a")
    assert "NOAUTH Authentication required." in denied.stdout + denied.stderr
    wrong = _redis_cli("-p", port, "--no-auth-warning", "-a", "nope", "get", "cli:a")
    assert "WRONGPASS" in wrong.stdout + wrong.stderr or "AUTH failed" in wrong.stdout + wrong.stderr
    admin = _redis_cli("-p", port, "--no-auth-warning", "--user", "admin", "--pass", ADMIN_PASSWORD, "flushall")
    assert admin.stdout == "OK\n"
    wait_until(lambda: _redis_cli("-p", port, "--no-auth-warning", "-a", PASSWORD, "dbsize").stdout == "0\n",
               what="dbsize 0 after FLUSHALL")
