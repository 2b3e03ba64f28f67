"""Unit tests for the store's memory bound: accounting, eviction policies, OUT_OF_MEMORY.

A fake clock (the LRU clock and TTLs) and a seeded rng make every eviction reproducible.
"""

from __future__ import annotations

import bisect
import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardd.errors import OutOfMemory
from shardd.store import ENTRY_OVERHEAD, LFU_HALF_LIFE_MS, POLICIES, TTL_OVERHEAD, Store
from tests.unit.test_store import FakeClock, check_invariants

SIZE = 100  # value bytes in most tests
ENTRY = 4 + SIZE + ENTRY_OVERHEAD  # a 4-byte key, e.g. b"k000"


def make(policy: str, entries: int, clock: FakeClock | None = None, seed: int = 7) -> tuple[Store, FakeClock]:
    clock = clock or FakeClock(1000)
    return Store(clock, random.Random(seed), max_bytes=entries * ENTRY, policy=policy), clock


def key(i: int) -> bytes:
    return b"k%03d" % i


def check_bound(s: Store) -> None:
    check_invariants(s)
    assert s.used_bytes <= s.max_bytes


def test_unlimited_by_default() -> None:
    s = Store(FakeClock(), random.Random(1))
    for i in range(1000):
        s.set(key(i), b"x" * SIZE)
    assert len(s) == 1000 and s.evicted == 0 and s.max_bytes == 0


@pytest.mark.parametrize("policy", [p for p in POLICIES if p not in ("noeviction", "volatile-ttl")])
def test_writes_past_the_limit_evict_and_stay_under_it(policy: str) -> None:
    s, _ = make(policy, 50)
    for i in range(500):
        assert s.set(key(i), b"x" * SIZE)
        check_bound(s)
    assert len(s) == 50
    assert s.evictions == {policy: 450} and s.evicted == 450
    assert s.get(key(499)) == b"x" * SIZE  # the key just written is never its own victim


def test_lru_keeps_recently_read_keys() -> None:
    s, clock = make("allkeys-lru", 100)
    for i in range(100):
        s.set(key(i), b"x" * SIZE)
    clock.now += 10
    for i in range(20):  # the first 20 were written first, but read last
        s.touch_clock()
        assert s.get(key(i)) is not None
    for i in range(100, 140):
        clock.now += 1
        s.touch_clock()
        s.set(key(i), b"x" * SIZE)
    kept = sum(s.exists(key(i)) for i in range(20))
    old = sum(s.exists(key(i)) for i in range(20, 100))
    # Sampling 5 approximates LRU: recently read keys survive, the stale ones go.
    assert kept >= 18, kept
    assert old <= 45, old


def test_lfu_keeps_frequently_read_keys() -> None:
    s, clock = make("allkeys-lfu", 100)
    for i in range(100):
        s.set(key(i), b"x" * SIZE)
    for _ in range(10):
        for i in range(80, 100):  # the last 20 written are the popular ones
            s.get(key(i))
    for i in range(100, 160):
        clock.now += 1
        s.touch_clock()
        s.set(key(i), b"x" * SIZE)
    assert sum(s.exists(key(i)) for i in range(80, 100)) >= 18


def test_lfu_counts_decay_while_idle() -> None:
    s, clock = make("allkeys-lfu", 100)
    s.set(b"k", b"v")
    for _ in range(63):
        s.get(b"k")
    assert s.entry(b"k")["hits"] == 64
    clock.now += 2 * LFU_HALF_LIFE_MS
    s.touch_clock()
    s.get(b"k")
    assert s.entry(b"k")["hits"] == 64 // 4 + 1


def test_volatile_ttl_evicts_the_soonest_to_expire_and_never_keys_without_ttl() -> None:
    s, _ = make("volatile-ttl", 20)
    s.configure(max_bytes=s.max_bytes + 10 * TTL_OVERHEAD)  # 10 of the 20 have a TTL
    for i in range(10):
        s.set(key(i), b"x" * SIZE)  # no TTL: never evicted
    for i in range(10, 20):
        s.set(key(i), b"x" * SIZE, ttl_ms=1000 * i)
    s.set(key(20), b"x" * SIZE)
    assert not s.exists(key(10)) or not s.exists(key(11))  # among the soonest (5 of 10 sampled)
    assert all(s.exists(key(i)) for i in range(10))
    assert s.evictions == {"volatile-ttl": 1}
    for i in range(21, 40):  # evicts TTL keys until none is left, then refuses
        try:
            s.set(key(i), b"x" * SIZE)
        except OutOfMemory as exc:
            assert "no key has a TTL" in str(exc)
            break
    else:
        pytest.fail("volatile-ttl evicted a key without a TTL")
    assert all(s.exists(key(i)) for i in range(10))
    check_bound(s)


def test_noeviction_refuses_and_changes_nothing() -> None:
    s, _ = make("noeviction", 10)
    for i in range(10):
        s.set(key(i), b"x" * SIZE)
    before = ({k: s.entry(k)["value"] for k in list(s.keys())}, s.used_bytes, s.sets, s._version)
    with pytest.raises(OutOfMemory, match="noeviction"):
        s.set(key(10), b"x" * SIZE)
    with pytest.raises(OutOfMemory):
        s.set(key(0), b"x" * (SIZE + 1))  # growing an existing value needs room too
    with pytest.raises(OutOfMemory):
        s.set_many([(key(0), b"y"), (key(11), b"x" * SIZE)])  # all or nothing
    assert ({k: s.entry(k)["value"] for k in list(s.keys())}, s.used_bytes, s.sets, s._version) == before
    assert s.oom_rejected == 3 and s.evicted == 0
    assert s.set(key(0), b"x" * (SIZE - 1))  # shrinking is always allowed
    assert s.set(key(1), b"y" * SIZE)  # so is a same-size overwrite
    s.delete(key(2))
    assert s.set(key(10), b"x" * SIZE)
    check_bound(s)


def test_an_entry_bigger_than_the_share_is_refused_without_evicting() -> None:
    s, _ = make("allkeys-lru", 10)
    for i in range(10):
        s.set(key(i), b"x" * SIZE)
    with pytest.raises(OutOfMemory, match="larger than this shard's share"):
        s.set(b"big", b"x" * (11 * ENTRY))
    assert len(s) == 10 and s.evicted == 0 and s.oom_rejected == 1


def test_cas_and_incr_respect_the_limit() -> None:
    s, _ = make("noeviction", 3)
    s.set(key(0), b"1")
    s.set(key(1), b"x" * SIZE)
    s.set(key(2), b"x" * SIZE)
    version = s.gets(key(0))[1]
    with pytest.raises(OutOfMemory):
        s.cas(key(0), b"x" * (2 * SIZE), version)
    assert s.gets(key(0)) == (b"1", version)
    assert s.incr(key(0), 5) == 6  # fits: the store had room for a 100-byte value there
    with pytest.raises(OutOfMemory):
        s.incr(b"n" * SIZE, 1)  # SIZE - 1 bytes are left: a new key of SIZE bytes cannot fit


def test_set_many_makes_room_for_the_whole_batch_and_keeps_its_own_keys() -> None:
    s, _ = make("allkeys-lru", 20)
    for i in range(20):
        s.set(key(i), b"x" * SIZE)
    items = [(key(i), b"y" * SIZE) for i in range(100, 110)]
    assert s.set_many(items) == 10
    assert all(s.get(k) == v for k, v in items)
    assert s.evicted == 10
    check_bound(s)


def test_configure_lowers_the_limit_and_evicts_down_to_it() -> None:
    s, _ = make("allkeys-lru", 100)
    for i in range(100):
        s.set(key(i), b"x" * SIZE)
    assert s.configure(max_bytes=40 * ENTRY) == 60
    assert len(s) == 40
    s.configure(policy="noeviction", max_bytes=20 * ENTRY)
    assert len(s) == 40 and s.policy == "noeviction"  # noeviction: refuse growth, drop nothing
    with pytest.raises(OutOfMemory):
        s.set(b"new", b"v")
    with pytest.raises(ValueError, match="eviction policy"):
        s.configure(policy="lru")


def test_expired_keys_are_reclaimed_before_live_keys_are_evicted() -> None:
    s, clock = make("allkeys-lru", 10)
    s.configure(max_bytes=s.max_bytes + 10 * TTL_OVERHEAD)  # room for 10 keys with a TTL
    for i in range(10):
        s.set(key(i), b"x" * SIZE, ttl_ms=10)
    clock.now += 10
    for i in range(10, 20):
        s.set(key(i), b"x" * SIZE)
    assert s.evicted == 0 and s.expired == 10
    assert all(s.exists(key(i)) for i in range(10, 20))


def test_churn_keeps_garbage_bounded_and_an_empty_store_unmaps_everything() -> None:
    # 4 KiB segments so that cleaning runs many times: every live record is moved at least once.
    clock = FakeClock(1000)
    s = Store(clock, random.Random(3), segment_bytes=4096)
    rng = random.Random(4)
    model: dict[bytes, bytes] = {}
    for round_ in range(40):
        for i in range(100):
            value = rng.randbytes(rng.randrange(0, 300))
            ttl = rng.choice([None, None, 10_000_000])
            s.set(key(i), value, ttl_ms=ttl)
            model[key(i)] = value
        for i in rng.sample(range(100), 30):
            s.delete(key(i))
            model.pop(key(i))
        check_invariants(s)  # audit: garbage under its bound, every slot and TTL position right
        assert s.garbage_bytes <= 2 * 4096 + s.arena_bytes // 8, round_
    assert {k: s.get(k) for k in model} == model
    for i in range(100):
        s.delete(key(i))
    assert s.arena_bytes == 0 and s.garbage_bytes == 0 and s.used_bytes == 0
    s.set(b"again", b"v")
    s.flush()
    assert s.arena_bytes == 0 and len(s) == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["set", "del", "get", "ttl"]), st.integers(0, 40),
                          st.integers(0, 3000)), max_size=200),
       st.sampled_from(POLICIES))
def test_random_ops_never_pass_the_bound(ops: list[tuple[str, int, int]], policy: str) -> None:
    clock = FakeClock(1000)
    s = Store(clock, random.Random(5), max_bytes=8 * (4 + 3000 + ENTRY_OVERHEAD), policy=policy)
    for name, i, size in ops:
        clock.now += 3
        s.touch_clock()
        try:
            if name == "set":
                s.set(key(i), b"v" * size)
            elif name == "ttl":
                s.set(key(i), b"v" * size, ttl_ms=50)
            elif name == "del":
                s.delete(key(i))
            else:
                s.get(key(i))
        except OutOfMemory:
            assert policy in ("noeviction", "volatile-ttl")
        check_bound(s)


def test_set_many_bigger_than_the_share_stores_what_fits_under_eviction() -> None:
    s, _ = make("allkeys-lru", 10)
    items = [(key(i), b"x" * SIZE) for i in range(25)]
    assert s.set_many(items) == 25
    assert len(s) == 10 and s.exists(key(24))
    check_bound(s)
    s.configure(policy="noeviction")
    with pytest.raises(OutOfMemory):
        s.set_many([(key(i), b"y" * SIZE) for i in range(100, 125)])


def _zipf_hit_rate(policy: str, keys: int = 10_000, capacity: int = 1000, ops: int = 100_000) -> float:
    """GET-then-SET-on-miss over Zipf(0.99) keys into a store that holds ``capacity`` of them."""
    clock = FakeClock(0)
    s = Store(clock, random.Random(1), max_bytes=capacity * (10 + 100 + ENTRY_OVERHEAD), policy=policy)
    rng = random.Random(2)
    weights = list(itertools.accumulate(1 / r**0.99 for r in range(1, keys + 1)))
    names = [b"k%08d" % i for i in range(keys)]
    random.Random(3).shuffle(names)
    hits = 0
    for i in range(ops):
        clock.now += 1
        if i % 16 == 0:
            s.touch_clock()
        k = names[bisect.bisect_left(weights, rng.random() * weights[-1])]
        if s.get(k) is None:
            s.set(k, b"v" * 100)
        else:
            hits += 1
    return hits / ops


def test_sampled_eviction_keeps_the_hit_rate_of_the_dict_store_on_a_zipf_workload() -> None:
    # The dict-of-objects store this one replaced, on exactly this workload (same seeds), hit
    # 0.653 (LRU), 0.700 (LFU) and 0.598 (random); the packed store measured 0.654 / 0.691 /
    # 0.606. Within 3 points of the old figures, and recency/frequency must beat chance.
    lru, lfu, rand = (_zipf_hit_rate(p) for p in ("allkeys-lru", "allkeys-lfu", "allkeys-random"))
    assert lru >= 0.653 - 0.03 and lfu >= 0.700 - 0.03, (lru, lfu)
    assert lru > rand + 0.03 and lfu > rand + 0.05, (lru, lfu, rand)
