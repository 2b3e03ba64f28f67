"""shardd.keyscan: Redis glob patterns (against a port of Redis's matcher) and scan cursors over snapshots."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardd.keyscan import IDLE_S, MAX_CURSOR, MAX_SNAPSHOTS, KeyScans, compile_glob
from shardd.store import Store
from tests.unit.test_store import FakeClock


def redis_match(pattern: bytes, string: bytes) -> bool:
    """A line-by-line port of Redis 7's ``stringmatchlen`` (case-sensitive, unsigned bytes): the reference."""
    p = s = 0
    plen, slen = len(pattern), len(string)
    while p < plen and s < slen:
        c = pattern[p]
        if c == ord("*"):
            while p + 1 < plen and pattern[p + 1] == ord("*"):
                p += 1
            if p + 1 == plen:
                return True
            return any(redis_match(pattern[p + 1:], string[t:]) for t in range(s, slen))
        if c == ord("?"):
            s += 1
        elif c == ord("["):
            p += 1
            negate = p < plen and pattern[p] == ord("^")
            if negate:
                p += 1
            match = False
            while True:
                if p < plen and pattern[p] == ord("\\") and plen - p >= 2:
                    p += 1
                    match = match or pattern[p] == string[s]
                elif p < plen and pattern[p] == ord("]"):
                    break
                elif p >= plen:
                    p -= 1
                    break
                elif plen - p >= 3 and pattern[p + 1] == ord("-"):
                    lo, hi = sorted((pattern[p], pattern[p + 2]))
                    p += 2
                    match = match or lo <= string[s] <= hi
                else:
                    match = match or pattern[p] == string[s]
                p += 1
            if match == negate:
                return False
            s += 1
        else:
            if c == ord("\\") and plen - p >= 2:
                p += 1
            if pattern[p] != string[s]:
                return False
            s += 1
        p += 1
        if s == slen:
            while p < plen and pattern[p] == ord("*"):
                p += 1
            break
    return p == plen and s == slen


def glob(pattern: bytes, key: bytes) -> bool:
    return compile_glob(pattern).fullmatch(key) is not None


# --- glob patterns ------------------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "key", "expected"), [
    (b"*", b"", False),  # Redis never matches an empty key but with an empty pattern (SCAN special-cases "*")
    (b"", b"", True),
    (b"", b"a", False),
    (b"*", b"anything\n at all", True),  # a star crosses newlines too
    (b"user:*", b"user:42", True),
    (b"user:*", b"users:42", False),
    (b"*:42", b"user:42", True),
    (b"h?llo", b"hello", True),
    (b"h?llo", b"hllo", False),
    (b"h*llo", b"hllo", True),
    (b"h[ae]llo", b"hallo", True),
    (b"h[ae]llo", b"hillo", False),
    (b"h[^e]llo", b"hallo", True),
    (b"h[^e]llo", b"hello", False),
    (b"h[a-b]llo", b"hbllo", True),
    (b"h[b-a]llo", b"hbllo", True),  # a reversed range is swapped
    (b"h[a-b]llo", b"hcllo", False),
    (b"h[^a-c]llo", b"hdllo", True),
    (b"[\\]]", b"]", True),  # an escaped ] inside brackets
    (b"[\\^a]", b"^", True),
    (b"[a\\-z]", b"-", True),  # an escaped - is not a range
    (b"[a\\-z]", b"b", False),
    (b"[a-]", b"-", False),  # "a-]" is the range ]..a, and the class runs to the end
    (b"[a-]", b"_", True),
    (b"[]", b"a", False),  # an empty class matches nothing
    (b"[]", b"", False),
    (b"[^]", b"a", True),  # its negation any byte
    (b"[abc", b"b", True),  # unclosed: the class runs to the end
    (b"[", b"[", False),
    (b"\\*", b"*", True),  # escapes outside brackets
    (b"\\*", b"a", False),
    (b"\\?x", b"?x", True),
    (b"a\\", b"a\\", True),  # a trailing backslash is itself
    (b"\\[a]", b"[a]", True),
    (b"a.b", b"a.b", True),  # regex metacharacters are literal
    (b"a.b", b"axb", False),
    (b"(a|b)+", b"(a|b)+", True),
    (b"*\x00*", b"x\x00y", True),
    (b"caf\xc3\xa9*", "café au lait".encode(), True),
    (b"**a**", b"bab", True),
])
def test_glob_cases(pattern: bytes, key: bytes, expected: bool) -> None:
    assert redis_match(pattern, key) is expected, "the reference disagrees: fix the case"
    assert glob(pattern, key) is expected


ALPHABET = b"ab*?[]^-\\"


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=8).map(lambda b: bytes(ALPHABET[c % len(ALPHABET)] for c in b)),
       st.binary(max_size=8).map(lambda b: bytes(b"ab]-^\\*"[c % 7] for c in b)))
def test_glob_agrees_with_redis(pattern: bytes, key: bytes) -> None:
    assert glob(pattern, key) is redis_match(pattern, key), (pattern, key)


def test_no_pattern_backtracks_exponentially() -> None:
    started = time.perf_counter()
    assert not glob(b"a*" * 30 + b"b", b"a" * 1024)
    assert not glob(b"*a*a*a*a*a*a*a*a*a*a*c", b"ab" * 512)
    assert time.perf_counter() - started < 1.0


def test_compiled_patterns_are_cached() -> None:
    assert compile_glob(b"cached:*") is compile_glob(b"cached:*")


# --- scans --------------------------------------------------------------------------------------


class Keys:
    """A shard's keyspace as a set, and a clock in seconds."""

    def __init__(self, keys: list[bytes]) -> None:
        self.live = set(keys)
        self.now = 0.0
        self.snapshots_taken = 0

    def scans(self) -> KeyScans:
        def keys() -> list[bytes]:
            self.snapshots_taken += 1
            return sorted(self.live)

        return KeyScans(keys, self.live.__contains__, lambda: self.now)


def scan_all(scans: KeyScans, count: int = 10, match: bytes | None = None,
             between: object = None) -> list[bytes]:
    cursor, out = 0, []
    while True:
        cursor, found = scans.scan(cursor, count, match)
        out += found
        assert 0 <= cursor < MAX_CURSOR
        if cursor == 0:
            return out
        if callable(between):
            between()


def test_a_scan_returns_every_key_once_and_ends_with_cursor_zero() -> None:
    ks = Keys([b"k%d" % i for i in range(1000)])
    scans = ks.scans()
    got = scan_all(scans, count=7)
    assert sorted(got) == sorted(ks.live) and len(got) == len(set(got))
    assert len(scans) == 0  # a finished snapshot is dropped at once


def test_count_bounds_positions_examined_and_match_filters() -> None:
    ks = Keys([b"user:%d" % i for i in range(50)] + [b"order:%d" % i for i in range(50)])
    scans = ks.scans()
    cursor, found = scans.scan(0, 10)
    assert cursor != 0 and len(found) == 10
    assert sorted(scan_all(scans, 10, b"user:1?")) == sorted(b"user:1%d" % i for i in range(10))
    assert scans.scan(0, 100_000, b"nothing*") == (0, [])
    assert scans.scan(0, 5, b"*") [1] == sorted(ks.live)[:5]  # "*" needs no regex


def test_keys_deleted_meanwhile_are_not_returned_and_keys_live_throughout_are_returned_once() -> None:
    ks = Keys([b"k%03d" % i for i in range(300)])
    original = set(ks.live)
    stable = {k for k in ks.live if int(k[1:]) % 3 == 0}
    doomed = sorted(ks.live - stable)
    rng = random.Random(5)
    scans = ks.scans()
    cursor, got = 0, []
    while True:
        cursor, found = scans.scan(cursor, 9)
        assert set(found) <= ks.live  # Rule 2: live when returned
        got += found
        if not cursor:
            break
        for _ in range(5):  # delete some, add some: neither may disturb the stable keys
            if doomed:
                ks.live.discard(doomed.pop(rng.randrange(len(doomed))))
        ks.live.add(b"new%d" % rng.randrange(10**6))
    assert len(got) == len(set(got))  # Rule 1
    assert stable <= set(got) <= original  # keys made after the snapshot are not in it


def test_a_key_is_only_returned_while_live() -> None:
    ks = Keys([b"a", b"b", b"c"])
    scans = ks.scans()
    cursor, found = scans.scan(0, 1)
    assert found == [b"a"]
    ks.live.discard(b"b")
    assert scans.scan(cursor, 10) == (0, [b"c"])


def test_at_most_max_snapshots_least_recently_used_out() -> None:
    ks = Keys([b"k%d" % i for i in range(100)])
    scans = ks.scans()
    cursors = [scans.scan(0, 10)[0] for _ in range(MAX_SNAPSHOTS)]
    assert len(scans) == MAX_SNAPSHOTS and ks.snapshots_taken == MAX_SNAPSHOTS
    cursors[0] = scans.scan(cursors[0], 10)[0]  # used: now the most recent
    scans.scan(0, 10)  # a 17th: the least recently used (the second) goes
    assert len(scans) == MAX_SNAPSHOTS
    taken = ks.snapshots_taken
    scans.scan(cursors[0], 10)
    assert ks.snapshots_taken == taken  # still there
    cursor, found = scans.scan(cursors[1], 10)  # gone: a fresh snapshot, from the same position (10)
    assert ks.snapshots_taken == taken + 1
    assert found == sorted(ks.live)[10:20] and cursor != 0


def test_idle_snapshots_are_dropped() -> None:
    ks = Keys([b"k%d" % i for i in range(100)])
    scans = ks.scans()
    old = scans.scan(0, 10)[0]
    ks.now += IDLE_S / 2
    recent = scans.scan(0, 10)[0]
    ks.now += IDLE_S / 2
    scans.prune()
    assert len(scans) == 1  # the first was idle for IDLE_S
    taken = ks.snapshots_taken
    scans.scan(recent, 10)
    assert ks.snapshots_taken == taken
    scans.scan(old, 10)
    assert ks.snapshots_taken == taken + 1  # taken again


def test_bad_cursor_or_count_is_a_value_error() -> None:
    scans = Keys([b"a"]).scans()
    for cursor, count in ((-1, 10), (MAX_CURSOR, 10), (0, 0)):
        with pytest.raises(ValueError):
            scans.scan(cursor, count)


def test_a_forged_cursor_past_the_end_just_ends() -> None:
    scans = Keys([b"a", b"b"]).scans()
    assert scans.scan(12345 << 16 | 1, 10) == (0, [])


def test_an_empty_shard_scans_to_zero_at_once() -> None:
    scans = Keys([]).scans()
    assert scans.scan(0, 10) == (0, []) and len(scans) == 0


def test_a_snapshot_holds_one_bytes_object_not_one_per_key() -> None:
    ks = Keys([b"k%d" % i for i in range(1000)])
    scans = ks.scans()
    scans.scan(0, 1)
    (snapshot,) = scans._snapshots.values()
    assert type(snapshot.blob) is bytes and len(snapshot.blob) == sum(map(len, ks.live))
    assert snapshot.ends.itemsize == 8 and len(snapshot) == 1000


def test_over_a_real_store_expired_keys_are_never_returned() -> None:
    clock = FakeClock(1000)
    store = Store(clock, random.Random(1))
    for i in range(100):
        store.set(b"k%d" % i, b"v", ttl_ms=50 if i % 2 else None)
    scans = KeyScans(store.keys, store.exists, lambda: clock.now / 1000)
    cursor, first = scans.scan(0, 50)
    clock.now += 50  # the odd keys expire mid-scan
    rest = scan_all_from(scans, cursor)
    got = first + rest
    assert len(got) == len(set(got))
    assert {k for k in got if int(k[1:]) % 2 == 0} == {b"k%d" % i for i in range(0, 100, 2)}
    assert all(int(k[1:]) % 2 == 0 for k in rest)


def scan_all_from(scans: KeyScans, cursor: int) -> list[bytes]:
    out: list[bytes] = []
    while cursor:
        cursor, found = scans.scan(cursor, 10)
        out += found
    return out


def test_a_workers_idle_scans_are_pruned_between_batches() -> None:
    from shardd.config import build_config
    from shardd.worker import Shard

    now = [0.0]
    store = Store(FakeClock(1000), random.Random(1))
    store.set_many([(b"k%d" % i, b"v") for i in range(20)])
    shard = Shard(store, build_config({"shards": 1, "runtime_dir": "/nonexistent"}), 0, None, clock=lambda: now[0])
    cursor, found = shard.scans.scan(0, 5)
    assert cursor and len(found) == 5 and len(shard.scans) == 1
    now[0] += IDLE_S + 10
    shard.tick()
    assert len(shard.scans) == 0
