"""Unit tests for shardd.store: a fake clock, a seeded rng, and a dict model under hypothesis."""

from __future__ import annotations

import random
import sys

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from shardd.codec import ZstdCodec
from shardd.errors import NotInteger, OutOfMemory, TooLarge
from shardd.protocol import ALWAYS, IF_ABSENT, IF_PRESENT
from shardd.store import ENTRY_OVERHEAD, EXPIRE_SAMPLE, TTL_OVERHEAD, Store, entry_cost

I64_MAX = (1 << 63) - 1
I64_MIN = -(1 << 63)


class FakeClock:
    """Monotonic milliseconds under test control; ``step`` advances it after every read."""

    def __init__(self, now: int = 0, step: int = 0) -> None:
        self.now = now
        self.step = step
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        t = self.now
        self.now += self.step
        return t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000)


@pytest.fixture
def store(clock: FakeClock) -> Store:
    return Store(clock, random.Random(1234))


def check_invariants(s: Store) -> None:
    """Rules 2, 4 and 8 of shardd.store, checked from its structures; and Rule 4 from the outside."""
    s.audit()
    keys = s.keys()
    entries = [s.entry(k) for k in keys]
    assert sum(1 for e in entries if e["expires_at_ms"]) == s.expiring
    assert s.used_bytes == sum(e["cost"] for e in entries)
    assert all(e["cost"] == entry_cost(len(k), len(e["value"]), bool(e["expires_at_ms"]), e["aside"])
               for k, e in zip(keys, entries, strict=True) if not e["packed"])


# --- basics ---------------------------------------------------------------------------


def test_get_set_delete_exists(store: Store) -> None:
    assert store.get(b"k") is None
    assert store.set(b"k", b"v") is True
    assert store.get(b"k") == b"v"
    assert store.exists(b"k")
    assert store.set(b"k", b"w") is True
    assert store.get(b"k") == b"w"
    assert len(store) == 1
    assert store.delete(b"k") is True
    assert store.delete(b"k") is False
    assert not store.exists(b"k")
    assert store.get(b"k") is None
    assert len(store) == 0
    check_invariants(store)


def test_empty_key_and_value(store: Store) -> None:
    assert store.set(b"", b"")
    assert store.get(b"") == b""
    assert store.gets(b"") == (b"", 1)


def test_counters(store: Store) -> None:
    store.get(b"a")
    store.set(b"a", b"1")
    store.get(b"a")
    store.gets(b"a")
    store.gets(b"zz")
    store.get_many([b"a", b"b", b"a"])
    store.exists(b"nope")  # not a get: no hit/miss
    assert (store.hits, store.misses) == (4, 3)
    store.set(b"a", b"2", cond=IF_ABSENT)  # refused: not counted
    store.set_many([(b"b", b"1"), (b"c", b"1")])
    store.incr(b"n", 1)
    store.cas(b"a", b"3", store.gets(b"a")[1])
    assert store.sets == 5
    store.delete(b"a")
    store.delete(b"a")
    store.delete_many([b"b", b"c", b"x"])
    assert store.deletes == 3
    assert store.expired == 0


def test_entry_overhead_is_the_packed_record_budget() -> None:
    # A 24-byte record header and a 16-byte share of the index (the module's byte budget); a
    # TTL adds its 12-byte header extension and its 8-byte TTL array slot.
    assert ENTRY_OVERHEAD == 24 + 16
    assert TTL_OVERHEAD == 12 + 8
    # Less than the two bytes objects alone cost in the dict-of-objects store it replaced.
    assert 2 * sys.getsizeof(b"") + 16 > ENTRY_OVERHEAD


def test_used_bytes_tracks_inserts_replaces_deletes(store: Store) -> None:
    assert store.used_bytes == 0
    store.set(b"key", b"12345")
    assert store.used_bytes == 3 + 5 + ENTRY_OVERHEAD
    store.set(b"key", b"1")
    assert store.used_bytes == 3 + 1 + ENTRY_OVERHEAD
    store.incr(b"key", 99)  # b"100"
    assert store.used_bytes == 3 + 3 + ENTRY_OVERHEAD
    store.set_many([(b"a", b"xy"), (b"b", b"")], ttl_ms=50)
    assert store.used_bytes == (3 + 3) + (1 + 2) + (1 + 0) + 3 * ENTRY_OVERHEAD + 2 * TTL_OVERHEAD
    store.delete(b"key")
    store.delete_many([b"a", b"b"])
    assert store.used_bytes == 0
    check_invariants(store)


def test_used_bytes_zero_after_deleting_everything(clock: FakeClock, store: Store) -> None:
    rng = random.Random(7)
    keys = [b"k%d" % i for i in range(300)]
    for i, k in enumerate(keys):
        store.set(k, rng.randbytes(rng.randrange(64)), ttl_ms=rng.choice([None, 10, 1000]))
        if i % 3 == 0:
            store.incr(b"n%d" % i, i)
    clock.now += 20  # some expired, some not: both deletion and reclamation paths
    store.active_expire(0)
    for k in keys:
        store.delete(k)
    store.delete_many([b"n%d" % i for i in range(300)])
    assert len(store) == 0
    assert store.used_bytes == 0
    check_invariants(store)


# --- TTL --------------------------------------------------------------------------------


def test_ttl_boundary_key_is_gone_at_deadline() -> None:
    clock = FakeClock(0)
    s = Store(clock)
    s.set(b"k", b"v", ttl_ms=100)
    clock.now = 99
    assert s.get(b"k") == b"v"
    assert s.ttl(b"k") == 1  # never 0 for a live key
    clock.now = 100
    assert s.get(b"k") is None
    assert s.ttl(b"k") == -2
    assert s.expired == 1
    assert len(s) == 0


@pytest.mark.parametrize(
    "probe",
    [
        lambda s: s.get(b"k") is None,
        lambda s: s.gets(b"k") is None,
        lambda s: s.get_many([b"k"]) == [None],
        lambda s: s.exists(b"k") is False,
        lambda s: s.ttl(b"k") == -2,
        lambda s: s.delete(b"k") is False,
        lambda s: s.delete_many([b"k"]) == 0,
        lambda s: s.expire(b"k", 50) is False,
        lambda s: s.persist(b"k") is False,
        lambda s: s.cas(b"k", b"x", 1) is None,
        lambda s: s.set(b"k", b"x", cond=IF_PRESENT) is False,
        lambda s: s.set(b"k", b"x", cond=IF_ABSENT) is True,
        lambda s: s.incr(b"k", 5) == 5,  # starts from 0, not from the expired b"7"
        lambda s: s.append(b"k", b"ab") == 2,  # starts from b"", not from the expired b"7"
        lambda s: s.getdel(b"k") is None,
        lambda s: s.touch(b"k") is False,
        lambda s: s.touch(b"k", 50) is False,
        lambda s: s.setget(b"k", b"x") is None,
        lambda s: s.setget(b"k", b"x", cond=IF_PRESENT) is None,
        lambda s: s.expire_if(b"k", 50) is False,
        lambda s: s.expire_if(b"k", -1) is False,
        lambda s: s.getex(b"k", 50) is None,
        lambda s: s.strlen(b"k") == 0,
        lambda s: s.set_many_nx([(b"k", b"x")]) is True,
    ],
)
def test_every_path_sees_expired_key_as_absent_and_reclaims_it(probe) -> None:
    clock = FakeClock(0)
    s = Store(clock)
    s.set(b"k", b"7", ttl_ms=10)
    clock.now = 10
    assert probe(s)
    assert s.expired == 1
    assert s.deletes == 0
    check_invariants(s)


def test_ttl_expire_persist(clock: FakeClock, store: Store) -> None:
    assert store.ttl(b"k") == -2
    assert store.expire(b"k", 100) is False
    assert store.persist(b"k") is False
    store.set(b"k", b"v")
    assert store.ttl(b"k") == -1
    assert store.persist(b"k") is False
    assert store.expire(b"k", 500) is True
    assert store.ttl(b"k") == 500
    clock.now += 200
    assert store.ttl(b"k") == 300
    assert store.expire(b"k", 50) is True  # replaces, may shorten
    assert store.ttl(b"k") == 50
    assert store.persist(b"k") is True
    assert store.ttl(b"k") == -1
    clock.now += 10_000
    assert store.get(b"k") == b"v"
    check_invariants(store)


def test_set_without_ttl_clears_ttl(clock: FakeClock, store: Store) -> None:
    store.set(b"k", b"v", ttl_ms=100)
    assert store.ttl(b"k") == 100
    store.set(b"k", b"w")
    assert store.ttl(b"k") == -1
    clock.now += 1000
    assert store.get(b"k") == b"w"
    store.set(b"k", b"x", ttl_ms=5)
    store.set(b"k", b"y", ttl_ms=50)  # a new TTL replaces the old one
    assert store.ttl(b"k") == 50
    check_invariants(store)


def test_ttl_and_version_changes(store: Store) -> None:
    store.set(b"k", b"v")
    _, v1 = store.gets(b"k")
    store.expire(b"k", 100)
    store.persist(b"k")
    assert store.gets(b"k")[1] == v1  # TTL-only changes keep the CAS token


@pytest.mark.parametrize("bad", [0, -1])
def test_nonpositive_ttl_is_rejected_and_changes_nothing(store: Store, bad: int) -> None:
    store.set(b"k", b"v")
    with pytest.raises(ValueError):
        store.set(b"k", b"w", ttl_ms=bad)
    with pytest.raises(ValueError):
        store.set_many([(b"k", b"w")], ttl_ms=bad)
    with pytest.raises(ValueError):
        store.expire(b"k", bad)
    with pytest.raises(ValueError):
        store.cas(b"k", b"w", 1, ttl_ms=bad)
    assert store.gets(b"k") == (b"v", 1)
    assert store.ttl(b"k") == -1


# --- conditions -------------------------------------------------------------------------


def test_set_conditions(store: Store) -> None:
    assert store.set(b"k", b"1", cond=IF_PRESENT) is False
    assert store.get(b"k") is None
    assert store.set(b"k", b"1", cond=IF_ABSENT) is True
    assert store.set(b"k", b"2", cond=IF_ABSENT) is False
    assert store.get(b"k") == b"1"
    assert store.set(b"k", b"3", cond=IF_PRESENT) is True
    assert store.get(b"k") == b"3"
    assert store.set(b"k", b"4", cond=ALWAYS) is True
    assert store.get(b"k") == b"4"
    assert store.sets == 3
    with pytest.raises(ValueError):
        store.set(b"k", b"5", cond=3)
    assert store.get(b"k") == b"4"


def test_refused_set_keeps_ttl(store: Store) -> None:
    store.set(b"k", b"1", ttl_ms=100)
    assert store.set(b"k", b"2", cond=IF_ABSENT) is False
    assert store.ttl(b"k") == 100


# --- INCR -------------------------------------------------------------------------------


def test_incr_missing_key_starts_at_zero(store: Store) -> None:
    assert store.incr(b"n", 5) == 5
    assert store.get(b"n") == b"5"
    assert store.incr(b"n", -7) == -2
    assert store.get(b"n") == b"-2"
    assert store.incr(b"m", -3) == -3
    assert store.incr(b"z", 0) == 0
    assert store.get(b"z") == b"0"
    assert store.ttl(b"n") == -1


@pytest.mark.parametrize("value", [b"0", b"-0", b"7", b"-7", b"10", str(I64_MAX).encode(),
                                   str(I64_MIN).encode()])
def test_incr_accepts_canonical_integers(store: Store, value: bytes) -> None:
    store.set(b"n", value)
    assert store.incr(b"n", 0) == int(value)


@pytest.mark.parametrize(
    "value",
    [b"1.5", b" 1", b"1 ", b"+1", b"01", b"-01", b"00", b"1_0", b"", b"-", b"abc", b"1e3", b"0x10",
     b"1\n", "\u0661".encode(), b"\x00", str(I64_MAX + 1).encode(), str(I64_MIN - 1).encode(),
     b"9" * 25, b"1" * 5000],
)
def test_incr_rejects_non_integers_and_changes_nothing(clock: FakeClock, store: Store,
                                                       value: bytes) -> None:
    store.set(b"n", value, ttl_ms=500)
    before = (store.gets(b"n"), store.ttl(b"n"), store.used_bytes, store.sets, len(store))
    with pytest.raises(NotInteger, match="not an integer"):
        store.incr(b"n", 1)
    assert (store.gets(b"n"), store.ttl(b"n"), store.used_bytes, store.sets, len(store)) == before
    check_invariants(store)


@pytest.mark.parametrize(
    ("start", "delta"),
    [(I64_MAX, 1), (I64_MIN, -1), (1, I64_MAX), (-2, I64_MIN), (I64_MAX, I64_MAX), (I64_MIN, I64_MIN)],
)
def test_incr_overflow_raises_and_changes_nothing(store: Store, start: int, delta: int) -> None:
    store.set(b"n", b"%d" % start, ttl_ms=100)
    before = (store.gets(b"n"), store.ttl(b"n"), store.used_bytes, store.sets)
    with pytest.raises(NotInteger, match="increment would overflow"):
        store.incr(b"n", delta)
    assert (store.gets(b"n"), store.ttl(b"n"), store.used_bytes, store.sets) == before


def test_incr_up_to_the_limits(store: Store) -> None:
    store.set(b"n", str(I64_MAX - 1).encode())
    assert store.incr(b"n", 1) == I64_MAX
    store.set(b"m", str(I64_MIN + 1).encode())
    assert store.incr(b"m", -1) == I64_MIN
    assert store.get(b"m") == str(I64_MIN).encode()


def test_incr_overflow_on_missing_key_creates_nothing(store: Store) -> None:
    with pytest.raises(ValueError):
        store.incr(b"n", I64_MAX + 1)
    assert store.exists(b"n") is False
    assert store.used_bytes == 0


def test_incr_keeps_ttl_and_bumps_version(clock: FakeClock, store: Store) -> None:
    store.set(b"n", b"1", ttl_ms=100)
    _, v1 = store.gets(b"n")
    clock.now += 40
    assert store.incr(b"n", 1) == 2
    assert store.ttl(b"n") == 60
    assert store.gets(b"n")[1] > v1
    clock.now += 60
    assert store.get(b"n") is None
    check_invariants(store)


# --- GETS / CAS -------------------------------------------------------------------------


def test_versions_start_at_one_and_increase_on_every_write(store: Store) -> None:
    store.set(b"a", b"1")
    assert store.gets(b"a") == (b"1", 1)
    seen = [1]
    for write in (
        lambda: store.set(b"a", b"2"),
        lambda: store.set(b"a", b"3", ttl_ms=100),
        lambda: store.set(b"a", b"4", cond=IF_PRESENT),
        lambda: store.incr(b"a", 1),
        lambda: store.cas(b"a", b"9", store.gets(b"a")[1]),
        lambda: store.set_many([(b"a", b"10")]),
    ):
        write()
        seen.append(store.gets(b"a")[1])
    assert seen == list(range(1, 8))
    store.set(b"b", b"x")  # a write to another key still advances the store's counter
    store.set(b"a", b"11")
    assert store.gets(b"a")[1] == 9
    assert store.gets(b"b")[1] == 8


def test_cas(store: Store) -> None:
    assert store.cas(b"k", b"v", 1) is None
    assert store.exists(b"k") is False
    store.set(b"k", b"v1", ttl_ms=1000)
    value, version = store.gets(b"k")
    assert value == b"v1"
    store.set(b"k", b"v2", ttl_ms=1000)
    used, sets = store.used_bytes, store.sets
    assert store.cas(b"k", b"stale", version) is False  # stale: nothing changes
    assert store.gets(b"k")[0] == b"v2"
    assert store.ttl(b"k") == 1000
    assert (store.used_bytes, store.sets) == (used, sets)
    _, current = store.gets(b"k")
    assert store.cas(b"k", b"v3", current) is True
    new_value, new_version = store.gets(b"k")
    assert new_value == b"v3" and new_version > current
    assert store.ttl(b"k") == -1  # like SET: no ttl_ms clears the TTL
    assert store.cas(b"k", b"v4", current) is False  # a token works once
    assert store.cas(b"k", b"v4", new_version, ttl_ms=30) is True
    assert store.ttl(b"k") == 30
    check_invariants(store)


def test_cas_after_delete_and_recreate_fails(store: Store) -> None:
    store.set(b"k", b"v")
    _, old = store.gets(b"k")
    store.delete(b"k")
    store.set(b"k", b"v")
    assert store.cas(b"k", b"x", old) is False
    store.flush()
    store.set(b"k", b"v")
    assert store.gets(b"k")[1] > old  # versions survive a flush (Rule 3)


# --- multi-key --------------------------------------------------------------------------


def test_multi_key_ops(clock: FakeClock, store: Store) -> None:
    assert store.set_many([(b"a", b"1"), (b"b", b"2"), (b"a", b"3")]) == 3
    assert store.get_many([b"a", b"b", b"c", b"a"]) == [b"3", b"2", None, b"3"]
    assert store.get_many([]) == []
    assert store.set_many([(b"c", b"x"), (b"d", b"y")], ttl_ms=10) == 2
    assert store.ttl(b"c") == 10 and store.ttl(b"a") == -1
    clock.now += 10
    hits, misses = store.hits, store.misses
    assert store.get_many([b"a", b"c", b"d"]) == [b"3", None, None]
    assert (store.hits - hits, store.misses - misses) == (1, 2)
    assert store.expired == 2
    assert store.delete_many([b"a", b"a", b"zz", b"b"]) == 2
    assert len(store) == 0
    assert store.set_many([]) == 0
    assert store.delete_many([]) == 0
    check_invariants(store)


def test_set_many_without_ttl_clears_ttls(store: Store) -> None:
    store.set(b"a", b"1", ttl_ms=5)
    store.set_many([(b"a", b"2")])
    assert store.ttl(b"a") == -1


def test_flush(clock: FakeClock, store: Store) -> None:
    assert store.flush() == 0
    store.set_many([(b"k%d" % i, b"v") for i in range(10)])
    store.set(b"t1", b"v", ttl_ms=5)
    store.set(b"t2", b"v", ttl_ms=50)
    clock.now += 5
    assert store.flush() == 11  # t1 had expired: it is not counted as flushed
    assert store.expired == 1
    assert len(store) == 0 and store.used_bytes == 0 and store.expiring == 0
    assert store.get(b"k1") is None
    store.set(b"k1", b"again", ttl_ms=5)
    assert store.get(b"k1") == b"again"
    check_invariants(store)


# --- active expiry ----------------------------------------------------------------------


def test_active_expire_without_ttl_keys_does_nothing(clock: FakeClock, store: Store) -> None:
    store.set(b"a", b"1")
    calls = clock.calls
    assert store.active_expire(10) == 0
    assert clock.calls == calls
    assert store.get(b"a") == b"1"


def test_active_expire_reclaims_many_keys_in_repeated_rounds(clock: FakeClock, store: Store) -> None:
    for i in range(1000):
        store.set(b"t%d" % i, b"v", ttl_ms=10)
        store.set(b"p%d" % i, b"v")
    clock.now += 10
    assert store.active_expire(100) == 1000  # every sample is 100% expired: keeps going
    assert store.expired == 1000
    assert len(store) == 1000 and store.expiring == 0
    assert all(store.get(b"p%d" % i) == b"v" for i in range(1000))
    assert store.deletes == 0
    check_invariants(store)


def test_active_expire_stops_when_few_sampled_keys_are_expired(clock: FakeClock, store: Store) -> None:
    for i in range(2000):
        store.set(b"live%d" % i, b"v", ttl_ms=10_000)
    for i in range(20):
        store.set(b"dead%d" % i, b"v", ttl_ms=10)
    clock.now += 10
    clock.step = 1  # so a stopping bug shows as many rounds, not a hang
    calls = clock.calls
    removed = store.active_expire(1000)
    assert clock.calls - calls <= 3  # one clock read per round, plus the first
    assert removed <= 20
    assert store.expired == removed
    assert len(store) == 2020 - removed
    # Lazy expiry still hides the rest at once.
    assert store.get_many([b"dead%d" % i for i in range(20)]) == [None] * 20
    assert store.expired == 20
    check_invariants(store)


def test_active_expire_respects_the_budget(store: Store) -> None:
    clock = FakeClock(0)
    s = Store(clock, random.Random(5))
    for i in range(10_000):
        s.set(b"t%d" % i, b"v", ttl_ms=1)
    clock.now = 1000
    clock.step = 1  # every clock read costs a millisecond
    calls = clock.calls
    removed = s.active_expire(5)
    assert 0 < removed <= 5 * EXPIRE_SAMPLE
    assert clock.calls - calls <= 6
    assert len(s) == 10_000 - removed
    # Repeated calls finish the job.
    for _ in range(200):
        s.active_expire(5)
    assert len(s) == 0 and s.used_bytes == 0 and s.expired == 10_000
    check_invariants(s)


def test_active_expire_zero_budget_runs_one_round(clock: FakeClock, store: Store) -> None:
    for i in range(100):
        store.set(b"t%d" % i, b"v", ttl_ms=1)
    clock.now += 1
    clock.step = 1
    assert store.active_expire(0) == EXPIRE_SAMPLE


def test_active_expire_small_ttl_set_is_scanned_whole(clock: FakeClock, store: Store) -> None:
    for i in range(EXPIRE_SAMPLE):
        store.set(b"t%d" % i, b"v", ttl_ms=1 + i % 2 * 1000)
    clock.now += 1
    assert store.active_expire(0) == EXPIRE_SAMPLE // 2
    assert store.expiring == EXPIRE_SAMPLE // 2
    check_invariants(store)


# --- model-based ------------------------------------------------------------------------

KEYS = st.sampled_from([b"a", b"b", b"c", b"d", b"e"])
VALUES = st.one_of(
    st.binary(max_size=6),
    st.integers(-5, 5).map(lambda n: b"%d" % n),
    st.sampled_from([str(I64_MAX).encode(), str(I64_MIN).encode(), b"-0", b"01", b"+1"]),
)
TTLS = st.one_of(st.none(), st.integers(1, 120))
DELTAS = st.one_of(st.integers(-10, 10), st.sampled_from([I64_MAX, I64_MIN]))


def model_int(value: bytes) -> int | None:
    """An independent reading of the INCR grammar, for the model."""
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    if text == "-0":
        return 0
    try:
        n = int(text)
    except ValueError:
        return None
    if str(n) != text or not I64_MIN <= n <= I64_MAX:
        return None
    return n


class StoreModel(RuleBasedStateMachine):
    """Store against a dict of key -> [value, expires_at (0: none), version] under a fake clock."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(0)
        self.store = Store(self.clock, random.Random(0))
        self.model: dict[bytes, list] = {}
        self.version = 0
        self.hits = 0
        self.misses = 0

    def live(self, key: bytes) -> list | None:
        item = self.model.get(key)
        if item is None:
            return None
        if item[1] and item[1] <= self.clock.now:
            del self.model[key]
            return None
        return item

    def write(self, key: bytes, value: bytes, ttl: int | None, keep_ttl: bool = False) -> None:
        self.version += 1
        old = self.live(key)
        expires = old[1] if keep_ttl and old else (self.clock.now + ttl if ttl else 0)
        self.model[key] = [value, expires, self.version]

    @rule(ms=st.integers(0, 60))
    def advance(self, ms: int) -> None:
        self.clock.now += ms

    @rule(key=KEYS, value=VALUES, ttl=TTLS, cond=st.sampled_from([ALWAYS, IF_ABSENT, IF_PRESENT]))
    def set(self, key, value, ttl, cond) -> None:
        present = self.live(key) is not None
        expected = cond == ALWAYS or (cond == IF_ABSENT) != present
        if expected:
            self.write(key, value, ttl)
        assert self.store.set(key, value, ttl, cond) is expected

    @rule(key=KEYS)
    def get(self, key) -> None:
        item = self.live(key)
        self.hits += item is not None
        self.misses += item is None
        assert self.store.get(key) == (item[0] if item else None)

    @rule(key=KEYS)
    def gets(self, key) -> None:
        item = self.live(key)
        self.hits += item is not None
        self.misses += item is None
        assert self.store.gets(key) == ((item[0], item[2]) if item else None)

    @rule(keys=st.lists(KEYS, max_size=6))
    def get_many(self, keys) -> None:
        expected = []
        for key in keys:
            item = self.live(key)
            expected.append(item[0] if item else None)
        self.hits += sum(v is not None for v in expected)
        self.misses += sum(v is None for v in expected)
        assert self.store.get_many(keys) == expected

    @rule(items=st.lists(st.tuples(KEYS, VALUES), max_size=6), ttl=TTLS)
    def set_many(self, items, ttl) -> None:
        for key, value in items:
            self.write(key, value, ttl)
        assert self.store.set_many(items, ttl) == len(items)

    @rule(key=KEYS)
    def delete(self, key) -> None:
        expected = self.live(key) is not None
        self.model.pop(key, None)
        assert self.store.delete(key) is expected

    @rule(keys=st.lists(KEYS, max_size=6))
    def delete_many(self, keys) -> None:
        expected = 0
        for key in keys:
            if self.live(key) is not None:
                del self.model[key]
                expected += 1
        assert self.store.delete_many(keys) == expected

    @rule(key=KEYS)
    def exists(self, key) -> None:
        assert self.store.exists(key) is (self.live(key) is not None)

    @rule(key=KEYS)
    def ttl(self, key) -> None:
        item = self.live(key)
        expected = -2 if item is None else (-1 if not item[1] else item[1] - self.clock.now)
        assert self.store.ttl(key) == expected
        assert expected != 0

    @rule(key=KEYS, ttl=st.integers(1, 120))
    def expire(self, key, ttl) -> None:
        item = self.live(key)
        if item:
            item[1] = self.clock.now + ttl
        assert self.store.expire(key, ttl) is (item is not None)

    @rule(key=KEYS)
    def persist(self, key) -> None:
        item = self.live(key)
        expected = bool(item and item[1])
        if item:
            item[1] = 0
        assert self.store.persist(key) is expected

    @rule(key=KEYS, delta=DELTAS)
    def incr(self, key, delta) -> None:
        item = self.live(key)
        current = 0 if item is None else model_int(item[0])
        if current is None or not I64_MIN <= current + delta <= I64_MAX:
            with pytest.raises(NotInteger):
                self.store.incr(key, delta)
            return
        self.write(key, b"%d" % (current + delta), None, keep_ttl=True)
        assert self.store.incr(key, delta) == current + delta

    @rule(key=KEYS, value=VALUES, ttl=TTLS, stale=st.booleans())
    def cas(self, key, value, ttl, stale) -> None:
        item = self.live(key)
        if item is None:
            assert self.store.cas(key, value, 1, ttl) is None
            return
        version = item[2] - 1 if stale else item[2]
        if not stale:
            self.write(key, value, ttl)
        assert self.store.cas(key, value, version, ttl) is (not stale)

    @rule(key=KEYS, value=VALUES)
    def append(self, key, value) -> None:
        item = self.live(key)
        new = (item[0] if item else b"") + value
        self.write(key, new, None, keep_ttl=True)
        assert self.store.append(key, value) == len(new)

    @rule(key=KEYS)
    def getdel(self, key) -> None:
        item = self.live(key)
        self.hits += item is not None
        self.misses += item is None
        self.model.pop(key, None)
        assert self.store.getdel(key) == (item[0] if item else None)

    @rule(key=KEYS, ttl=st.none() | st.integers(1, 120))
    def touch(self, key, ttl) -> None:
        item = self.live(key)
        if item and ttl:
            item[1] = self.clock.now + ttl
        assert self.store.touch(key, ttl) is (item is not None)

    @rule(key=KEYS, value=VALUES, ttl=TTLS, cond=st.sampled_from([ALWAYS, IF_ABSENT, IF_PRESENT]),
          keep_ttl=st.booleans())
    def setget(self, key, value, ttl, cond, keep_ttl) -> None:
        ttl = None if keep_ttl else ttl
        item = self.live(key)
        old = item[0] if item else None
        self.hits += item is not None
        self.misses += item is None
        if cond == ALWAYS or (cond == IF_ABSENT) != (item is not None):
            self.write(key, value, ttl, keep_ttl=keep_ttl)
        assert self.store.setget(key, value, ttl, cond, keep_ttl) == old

    @rule(key=KEYS, ttl=st.integers(-5, 120), when=st.integers(0, 4))
    def expire_if(self, key, ttl, when) -> None:
        item = self.live(key)
        applies = False
        if item:
            current, deadline = item[1], self.clock.now + ttl
            applies = [True, not current, bool(current), bool(current) and deadline > current,
                       not current or deadline < current][when]
            if applies and ttl <= 0:
                del self.model[key]
            elif applies:
                item[1] = deadline
        assert self.store.expire_if(key, ttl, when) is applies

    @rule(key=KEYS, ttl=st.none() | st.integers(-5, 120), persist=st.booleans())
    def getex(self, key, ttl, persist) -> None:
        persist = persist and ttl is None
        item = self.live(key)
        self.hits += item is not None
        self.misses += item is None
        expected = item[0] if item else None
        if item and ttl is not None and ttl <= 0:
            del self.model[key]
        elif item and ttl is not None:
            item[1] = self.clock.now + ttl
        elif item and persist:
            item[1] = 0
        assert self.store.getex(key, ttl, persist) == expected

    @rule(key=KEYS)
    def strlen(self, key) -> None:
        item = self.live(key)
        assert self.store.strlen(key) == (len(item[0]) if item else 0)

    @rule(items=st.lists(st.tuples(KEYS, VALUES), max_size=4), ttl=TTLS)
    def set_many_nx(self, items, ttl) -> None:
        stores = not any(self.live(key) is not None for key, _ in items)
        if stores:
            for key, value in items:
                self.write(key, value, ttl)
        assert self.store.set_many_nx(items, ttl) is stores

    @rule(budget=st.integers(0, 3))
    def active_expire(self, budget) -> None:
        self.store.active_expire(budget)  # reclaims only what the model already treats as gone

    @rule()
    def flush(self) -> None:
        expected = sum(self.live(k) is not None for k in list(self.model))
        self.model.clear()
        assert self.store.flush() == expected

    @invariant()
    def agrees_with_model(self) -> None:
        s = self.store
        check_invariants(s)
        now = self.clock.now
        keys = s.keys()
        entries = {k: s.entry(k) for k in keys}
        live = {
            k: [e["value"], e["expires_at_ms"], e["version"]]
            for k, e in entries.items()
            if not e["expires_at_ms"] or e["expires_at_ms"] > now
        }
        expected = {k: v for k, v in self.model.items() if not v[1] or v[1] > now}
        assert live == expected
        assert (s.hits, s.misses) == (self.hits, self.misses)
        assert s.sets == self.version == s._version


TestStoreModel = StoreModel.TestCase
TestStoreModel.settings = settings(
    max_examples=300, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_append_creates_extends_keeps_ttl_and_bumps_version(clock: FakeClock, store: Store) -> None:
    assert store.append(b"k", b"ab") == 2  # a missing key is created (Redis APPEND)
    assert store.ttl(b"k") == -1
    v1 = store.gets(b"k")[1]
    assert store.append(b"k", b"") == 2
    store.expire(b"k", 500)
    assert store.append(b"k", b"cd") == 4
    value, v2 = store.gets(b"k")
    assert value == b"abcd" and v2 > v1
    assert store.ttl(b"k") == 500  # kept, as INCR keeps it
    assert store.sets == 3
    check_invariants(store)


def test_append_past_max_len_is_too_large_and_changes_nothing(store: Store) -> None:
    store.set(b"k", b"12345")
    before = (store.gets(b"k"), store.used_bytes, store.sets, store._version)
    with pytest.raises(TooLarge, match="8 bytes; the limit is 7"):
        store.append(b"k", b"678", max_len=7)
    with pytest.raises(TooLarge):
        store.append(b"new", b"12345678", max_len=7)
    assert (store.gets(b"k"), store.used_bytes, store.sets, store._version) == before
    assert not store.exists(b"new")
    assert store.append(b"k", b"67", max_len=7) == 7  # exactly the limit is fine
    check_invariants(store)


def test_append_respects_the_memory_bound(clock: FakeClock) -> None:
    s = Store(clock, random.Random(1), max_bytes=ENTRY_OVERHEAD + 20, policy="noeviction")
    s.set(b"k", b"x" * 10)
    with pytest.raises(OutOfMemory):
        s.append(b"k", b"y" * 20)
    assert s.get(b"k") == b"x" * 10
    s2 = Store(clock, random.Random(1), max_bytes=2 * ENTRY_OVERHEAD + 60)  # both fit before, not after
    s2.set(b"old", b"o" * 30)
    s2.set(b"k", b"x" * 10)
    s2.append(b"k", b"y" * 30)  # evicts the other key, never the one being appended to
    assert s2.get(b"k") == b"x" * 10 + b"y" * 30 and not s2.exists(b"old")
    assert s2.used_bytes <= s2.max_bytes
    check_invariants(s2)


def test_getdel_returns_and_removes(store: Store) -> None:
    store.set(b"k", b"v", ttl_ms=100)
    assert store.getdel(b"k") == b"v"
    assert not store.exists(b"k") and store.getdel(b"k") is None
    assert (store.hits, store.misses, store.deletes, store.used_bytes, store.expiring) == (1, 1, 1, 0, 0)
    check_invariants(store)


def test_touch_counts_an_access_and_sets_the_ttl_keeping_the_version(clock: FakeClock, store: Store) -> None:
    store.set(b"k", b"v")
    entry = store.entry(b"k")
    hits, version = entry["hits"], entry["version"]
    assert store.touch(b"k") is True
    assert store.entry(b"k")["hits"] == hits + 1 and store.ttl(b"k") == -1
    assert store.touch(b"k", 250) is True
    assert store.ttl(b"k") == 250 and store.entry(b"k")["version"] == version
    assert store.touch(b"missing", 250) is False and not store.exists(b"missing")
    assert (store.hits, store.misses, store.sets) == (0, 0, 1)  # an access, not a lookup
    with pytest.raises(ValueError):
        store.touch(b"k", 0)
    clock.now += 250
    assert store.touch(b"k") is False
    check_invariants(store)


def test_take_and_restore_carry_value_deadline_and_version():
    """What a resize moves between shards: take() on one store, restore() on another."""
    clock = FakeClock()
    src, dst = Store(clock), Store(clock)
    src.set(b"k", b"v", ttl_ms=5000)
    _, version = src.gets(b"k")
    taken = src.take(b"k")
    assert taken == (b"v", 5000, version)
    assert src.get(b"k") is None and src.used_bytes == 0 and src.take(b"k") is None
    assert dst.restore(b"k", *taken) is True
    assert dst.gets(b"k") == (b"v", version)
    assert dst.ttl(b"k") == 5000
    dst.set(b"other", b"x")
    assert dst.gets(b"other")[1] > version  # new writes get versions past the adopted one


def test_keys_arriving_in_another_stores_index_order_insert_in_linear_time(clock: FakeClock) -> None:
    # A snapshot or a resize hands keys over in the source's index order. With one hash seed for
    # every store they would arrive sorted by home slot and pile into one run at the front of the
    # growing table: a probe per key already stored, 20k keys -> ~2e8 probes (minutes). Each
    # store has its own seed, so the probes per insert stay a handful.
    source = Store(clock, random.Random(1))
    for i in range(20_000):
        source.set(b"key:%d" % i, b"v")
    target = Store(clock, random.Random(2))
    probes = 0
    real_find = target._find

    def counting_find(key: bytes, h: int) -> tuple[int, int]:
        nonlocal probes
        i, hd = real_find(key, h)
        probes += ((i - (h >> target._shift)) & target._mask) + 1
        return i, hd

    target._find = counting_find  # type: ignore[method-assign]
    for key, value, expires, version in source.export():
        target.restore(key, value, expires, version)
    assert len(target) == 20_000
    assert probes < 20_000 * 8, probes


def test_restore_many_is_restore_for_each_entry(clock: FakeClock) -> None:
    rng = random.Random(11)
    entries = [(b"k%d" % i, rng.randbytes(rng.choice([0, 5, 900, 3000, 20_000])),
                rng.choice([0, 0, 5000, 1]), rng.randrange(1, 10**9)) for i in range(3000)]
    entries += entries[:50]  # duplicates take the general path: the later one wins
    one, many = Store(clock, random.Random(1)), Store(clock, random.Random(1))
    one.configure(codec=ZstdCodec(min_bytes=1024)), many.configure(codec=ZstdCodec(min_bytes=1024))
    stored = sum(one.restore(*e) for e in entries)
    assert many.restore_many(entries, expected=10) == stored == len(entries)  # grows past `expected` too
    check_invariants(many)
    assert sorted(many.export()) == sorted(one.export())
    assert (many.used_bytes, many.sets, many.expiring, many._version) == (one.used_bytes, 0, one.expiring, one._version)


def test_get_many_agrees_with_get_for_every_kind_of_entry(clock: FakeClock) -> None:
    def filled() -> Store:
        s = Store(clock, random.Random(1), codec=ZstdCodec(min_bytes=1024))
        s.set(b"plain", b"p")
        s.set(b"ttl", b"t", ttl_ms=1000)
        s.set(b"gone", b"g", ttl_ms=5)
        s.set(b"packed", b"z" * 5000)
        s.set(b"aside", random.Random(2).randbytes(20_000))
        return s

    keys = [b"plain", b"ttl", b"gone", b"packed", b"aside", b"missing", b"plain"]
    one, many = filled(), filled()
    clock.now += 10  # b"gone" has expired, unreclaimed
    assert many.get_many(keys) == [one.get(k) for k in keys]
    assert (many.hits, many.misses, many.expired) == (one.hits, one.misses, one.expired) == (5, 2, 1)
    check_invariants(many)
