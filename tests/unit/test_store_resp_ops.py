"""The store's Redis-exact variants: setget, expire_if, getex, strlen, set_many_nx.

The model-based test in test_store.py checks them against a dict; these pin the edges the RESP
endpoint relies on (each named after the Redis command form it serves), the counters, compression
and the memory bound.
"""

from __future__ import annotations

import random

import pytest

from shardd.codec import ZstdCodec
from shardd.errors import OutOfMemory
from shardd.protocol import EXPIRE_ALWAYS, EXPIRE_GT, EXPIRE_LT, EXPIRE_NX, EXPIRE_XX, IF_ABSENT, IF_PRESENT
from shardd.store import ENTRY_OVERHEAD, Store, entry_cost
from tests.unit.test_store import FakeClock, check_invariants

DOC = b'{"name": "shardd", "tags": ["cache", "shard"], "n": 1}' * 100  # compresses well


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000)


@pytest.fixture(params=[None, ZstdCodec(min_bytes=1024)], ids=["plain", "zstd"])
def store(request: pytest.FixtureRequest, clock: FakeClock) -> Store:
    return Store(clock, random.Random(7), codec=request.param)


# --- setget (SET … GET, GETSET) -----------------------------------------------------------------


def test_setget_returns_the_old_value_and_stores_the_new(store: Store) -> None:
    assert store.setget(b"k", DOC) is None  # missing: created
    assert store.setget(b"k", b"v2") == DOC  # the value as written, decompressed
    assert store.get(b"k") == b"v2"
    assert (store.hits, store.misses, store.sets) == (2, 1, 2)  # 1 + the get: a lookup like GET
    check_invariants(store)


def test_setget_clears_sets_or_keeps_the_ttl(clock: FakeClock, store: Store) -> None:
    store.set(b"k", b"v", ttl_ms=500)
    assert store.setget(b"k", b"w", keep_ttl=True) == b"v"  # SET k w KEEPTTL GET
    assert store.ttl(b"k") == 500
    _, version = store.gets(b"k")
    assert store.setget(b"k", b"x", ttl_ms=300) == b"w"
    assert store.ttl(b"k") == 300 and store.gets(b"k")[1] > version  # a new value, a new version
    assert store.setget(b"k", b"y") == b"x"  # no ttl_ms, no keep_ttl: the TTL is cleared (Redis SET)
    assert store.ttl(b"k") == -1
    assert store.setget(b"new", b"n", keep_ttl=True) is None  # KEEPTTL on a missing key: no TTL
    assert store.ttl(b"new") == -1
    clock.now += 10_000
    assert store.get(b"k") == b"y"
    check_invariants(store)


def test_setget_conditions(store: Store) -> None:
    assert store.setget(b"k", b"1", cond=IF_PRESENT) is None  # SET k 1 XX GET on a missing key
    assert not store.exists(b"k")
    assert store.setget(b"k", b"1", cond=IF_ABSENT) is None  # NX on a missing key: stored
    assert store.setget(b"k", b"2", cond=IF_ABSENT) == b"1"  # NX on a live key: the old value, nothing stored
    assert store.get(b"k") == b"1"
    assert store.setget(b"k", b"3", cond=IF_PRESENT) == b"1"
    assert store.get(b"k") == b"3"
    assert store.sets == 2
    check_invariants(store)


def test_setget_refused_by_its_condition_keeps_the_ttl_and_version(store: Store) -> None:
    store.set(b"k", b"v", ttl_ms=500)
    before = store.entry(b"k")
    assert store.setget(b"k", b"w", cond=IF_ABSENT) == b"v"
    assert store.entry(b"k")["version"] == before["version"] and store.ttl(b"k") == 500


@pytest.mark.parametrize(("kwargs", "problem"), [
    ({"ttl_ms": 100, "keep_ttl": True}, "keep_ttl"),
    ({"ttl_ms": 0}, "positive"),
    ({"cond": 3}, "cond"),
])
def test_setget_bad_arguments_change_nothing(store: Store, kwargs: dict, problem: str) -> None:
    store.set(b"k", b"v", ttl_ms=500)
    with pytest.raises(ValueError, match=problem):
        store.setget(b"k", b"w", **kwargs)
    assert store.get(b"k") == b"v" and store.ttl(b"k") == 500


def test_setget_out_of_memory_changes_nothing(clock: FakeClock) -> None:
    s = Store(clock, random.Random(1), max_bytes=ENTRY_OVERHEAD + 20, policy="noeviction")
    s.set(b"k", b"x" * 10)
    before = (s.entry(b"k"), s.used_bytes, s.sets, s.hits, s.misses)
    with pytest.raises(OutOfMemory):
        s.setget(b"k", b"y" * 30)
    with pytest.raises(OutOfMemory):
        s.setget(b"other", b"z")
    assert (s.entry(b"k"), s.used_bytes, s.sets, s.hits, s.misses) == before
    assert s.oom_rejected == 2 and not s.exists(b"other")
    check_invariants(s)


def test_setget_evicts_others_never_its_own_key(clock: FakeClock) -> None:
    s = Store(clock, random.Random(1), max_bytes=2 * ENTRY_OVERHEAD + 60)
    s.set(b"old", b"o" * 30)
    s.set(b"k", b"x" * 10)
    assert s.setget(b"k", b"y" * 40) == b"x" * 10
    assert s.get(b"k") == b"y" * 40 and not s.exists(b"old")
    assert s.used_bytes <= s.max_bytes
    check_invariants(s)


# --- expire_if (EXPIRE / PEXPIRE / PEXPIREAT with NX, XX, GT, LT) ----------------------------------


@pytest.mark.parametrize(("when", "on_plain", "later_on_ttl", "earlier_on_ttl"), [
    (EXPIRE_ALWAYS, True, True, True),
    (EXPIRE_NX, True, False, False),
    (EXPIRE_XX, False, True, True),
    (EXPIRE_GT, False, True, False),  # no TTL is an infinite deadline: nothing is later
    (EXPIRE_LT, True, False, True),  # ... and anything is earlier
])
def test_expire_if_conditions(store: Store, when: int, on_plain: bool, later_on_ttl: bool,
                              earlier_on_ttl: bool) -> None:
    store.set(b"plain", b"v")
    store.set(b"later", b"v", ttl_ms=500)
    store.set(b"earlier", b"v", ttl_ms=500)
    versions = {k: store.entry(k)["version"] for k in (b"plain", b"later", b"earlier")}
    assert store.expire_if(b"plain", 1000, when) is on_plain
    assert store.ttl(b"plain") == (1000 if on_plain else -1)
    assert store.expire_if(b"later", 1000, when) is later_on_ttl
    assert store.ttl(b"later") == (1000 if later_on_ttl else 500)
    assert store.expire_if(b"earlier", 100, when) is earlier_on_ttl
    assert store.ttl(b"earlier") == (100 if earlier_on_ttl else 500)
    assert store.expire_if(b"missing", 100, when) is False and not store.exists(b"missing")
    assert {k: store.entry(k)["version"] for k in versions} == versions  # TTL-only: versions kept
    check_invariants(store)


def test_expire_if_an_equal_deadline_is_neither_greater_nor_less(store: Store) -> None:
    store.set(b"k", b"v", ttl_ms=500)
    assert store.expire_if(b"k", 500, EXPIRE_GT) is False
    assert store.expire_if(b"k", 500, EXPIRE_LT) is False


@pytest.mark.parametrize("ttl", [0, -1, -(2**53 - 1)])
def test_expire_if_in_the_past_deletes_the_key_when_the_condition_holds(store: Store, ttl: int) -> None:
    store.set(b"k", b"v")
    store.set(b"t", DOC, ttl_ms=500)
    assert store.expire_if(b"k", ttl, EXPIRE_XX) is False and store.exists(b"k")  # no TTL: XX does not apply
    assert store.expire_if(b"t", ttl, EXPIRE_GT) is False and store.exists(b"t")  # an earlier deadline
    assert store.expire_if(b"k", ttl) is True and not store.exists(b"k")
    assert store.expire_if(b"t", ttl, EXPIRE_LT) is True and not store.exists(b"t")
    assert (store.expired, store.deletes, store.used_bytes, store.expiring) == (2, 0, 0, 0)  # as Redis counts it
    assert store.expire_if(b"k", ttl) is False
    check_invariants(store)


def test_expire_if_rejects_an_unknown_condition(store: Store) -> None:
    store.set(b"k", b"v")
    with pytest.raises(ValueError, match="when"):
        store.expire_if(b"k", 100, 5)
    assert store.ttl(b"k") == -1


# --- getex (GETEX EX / PX / EXAT / PXAT / PERSIST) ------------------------------------------------


def test_getex_reads_and_changes_the_ttl(clock: FakeClock, store: Store) -> None:
    store.set(b"k", DOC, ttl_ms=500)
    version = store.entry(b"k")["version"]
    assert store.getex(b"k") == DOC and store.ttl(b"k") == 500  # no option: the TTL is left as it is
    assert store.getex(b"k", 2000) == DOC and store.ttl(b"k") == 2000
    assert store.getex(b"k", persist=True) == DOC and store.ttl(b"k") == -1
    assert store.getex(b"k", persist=True) == DOC and store.ttl(b"k") == -1  # persisting twice is harmless
    assert store.entry(b"k")["version"] == version
    assert store.getex(b"missing", 100) is None and not store.exists(b"missing")
    assert (store.hits, store.misses, store.sets) == (4, 1, 1)
    check_invariants(store)


def test_getex_counts_an_access(store: Store) -> None:
    store.set(b"k", b"v")
    hits = store.entry(b"k")["hits"]
    store.getex(b"k")
    assert store.entry(b"k")["hits"] == hits + 1


@pytest.mark.parametrize("ttl", [0, -5])
def test_getex_with_a_deadline_in_the_past_reads_then_deletes(store: Store, ttl: int) -> None:
    store.set(b"k", DOC, ttl_ms=500)
    assert store.getex(b"k", ttl) == DOC
    assert not store.exists(b"k") and store.getex(b"k", ttl) is None
    assert (store.expired, store.deletes, store.used_bytes, store.expiring) == (1, 0, 0, 0)
    check_invariants(store)


def test_getex_ttl_and_persist_together_is_refused(store: Store) -> None:
    store.set(b"k", b"v", ttl_ms=500)
    with pytest.raises(ValueError, match="persist"):
        store.getex(b"k", 100, persist=True)
    assert store.ttl(b"k") == 500 and store.hits == 0


# --- strlen -------------------------------------------------------------------------------------


def test_strlen_of_every_kind_of_entry(clock: FakeClock, store: Store) -> None:
    big = random.Random(3).randbytes(40_000)  # kept aside, incompressible
    store.set(b"plain", b"abc")
    store.set(b"empty", b"")
    store.set(b"ttl", b"abcd", ttl_ms=10)
    store.set(b"doc", DOC)  # compressed with the zstd codec
    store.set(b"big", big)
    store.set(b"bigdoc", DOC * 10)  # compressed and (maybe) aside
    lengths = {k: store.strlen(k) for k in (b"plain", b"empty", b"ttl", b"doc", b"big", b"bigdoc", b"missing")}
    assert lengths == {b"plain": 3, b"empty": 0, b"ttl": 4, b"doc": len(DOC), b"big": len(big),
                       b"bigdoc": len(DOC) * 10, b"missing": 0}
    clock.now += 10
    assert store.strlen(b"ttl") == 0 and store.expired == 1
    assert (store.hits, store.misses) == (0, 0)  # not a lookup, like exists


def test_strlen_of_a_compressed_value_reads_its_frame_header_only(clock: FakeClock) -> None:
    codec = ZstdCodec(min_bytes=64)
    s = Store(clock, random.Random(1), codec=codec)
    s.set(b"doc", DOC)
    assert s.entry(b"doc")["packed"]

    def no_unpack(data: bytes) -> bytes:
        raise AssertionError("strlen decompressed the value")

    codec.unpack = no_unpack  # type: ignore[method-assign]
    assert s.strlen(b"doc") == len(DOC)
    s.configure(codec=None)  # compression turned off: values packed before are still measured
    assert s.strlen(b"doc") == len(DOC)


def test_strlen_decompresses_a_frame_without_its_size(clock: FakeClock) -> None:
    class SizelessCodec(ZstdCodec):
        def raw_size(self, data: bytes) -> int:
            return -1  # zstd's "content size unknown"

    s = Store(clock, random.Random(1), codec=SizelessCodec(min_bytes=64))
    s.set(b"doc", DOC)
    assert s.entry(b"doc")["packed"] and s.strlen(b"doc") == len(DOC)


# --- set_many_nx (MSETNX) -------------------------------------------------------------------------


def test_set_many_nx_stores_all_only_if_none_is_live(clock: FakeClock, store: Store) -> None:
    assert store.set_many_nx([(b"a", b"1"), (b"b", DOC)]) is True
    assert store.get_many([b"a", b"b"]) == [b"1", DOC]
    before = sorted(store.export())
    assert store.set_many_nx([(b"c", b"3"), (b"a", b"x")]) is False  # a is live: nothing written
    assert sorted(store.export()) == before and not store.exists(b"c")
    store.set(b"t", b"v", ttl_ms=10)
    clock.now += 10
    assert store.set_many_nx([(b"t", b"new"), (b"c", b"3"), (b"c", b"4")], ttl_ms=100) is True  # t expired
    assert store.get_many([b"t", b"c"]) == [b"new", b"4"]  # a later duplicate wins
    assert store.ttl(b"t") == store.ttl(b"c") == 100
    assert store.sets == 6 and store.expired == 1  # 2 + the set of t + 3 items
    check_invariants(store)


def test_set_many_nx_bad_ttl_changes_nothing(store: Store) -> None:
    with pytest.raises(ValueError):
        store.set_many_nx([(b"a", b"1")], ttl_ms=0)
    assert not store.exists(b"a")


def test_set_many_nx_out_of_memory_writes_nothing(clock: FakeClock) -> None:
    s = Store(clock, random.Random(1), max_bytes=3 * entry_cost(1, 10), policy="noeviction")
    s.set(b"k", b"x" * 10)
    with pytest.raises(OutOfMemory):
        s.set_many_nx([(b"a", b"1" * 10), (b"b", b"2" * 10), (b"c", b"3" * 10)])  # two fit, three do not
    assert s.keys() == [b"k"] and s.oom_rejected == 1
    assert s.set_many_nx([(b"a", b"1" * 10), (b"b", b"2" * 10)]) is True
    check_invariants(s)


def test_set_many_nx_larger_than_the_share_is_refused_without_evicting(clock: FakeClock) -> None:
    # set_many would store such a batch while evicting its own first items; all-or-nothing cannot.
    s = Store(clock, random.Random(1), max_bytes=3 * entry_cost(1, 10), policy="allkeys-lru")
    s.set(b"k", b"x" * 10)
    items = [(bytes([c]), b"v" * 10) for c in b"abcd"]
    with pytest.raises(OutOfMemory, match="share of max_memory"):
        s.set_many_nx(items)
    assert s.keys() == [b"k"] and s.evicted == 0 and s.oom_rejected == 1
    check_invariants(s)


def test_set_many_nx_evicts_other_keys_to_fit(clock: FakeClock) -> None:
    s = Store(clock, random.Random(1), max_bytes=3 * entry_cost(1, 10), policy="allkeys-lru")
    s.set(b"k", b"x" * 10)
    s.set(b"l", b"x" * 10)
    assert s.set_many_nx([(b"a", b"1" * 10), (b"b", b"2" * 10)]) is True
    assert s.get_many([b"a", b"b"]) == [b"1" * 10, b"2" * 10] and s.evicted == 1
    assert s.used_bytes <= s.max_bytes
    check_invariants(s)
