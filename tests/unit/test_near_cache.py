"""A client's near cache (shardd.near_cache, docs/near-cache.md): what it keeps, for how long, and
what drops it.

1. Examples, one or more per rule of the module, against the pure class with a fake clock.
2. A model-checked history (hypothesis draws it, step by step): the shards' side is real
   (``HotMarks`` numbers the messages, grants the leases and decides what a write owes), the
   network between them and the client is the test's: feed messages arrive in order but may be
   lost or late, near_get replies may arrive long after they were sent and out of order with the
   feed, shards restart, flush, resize and re-mark, the clock runs past leases, TTLs and silences,
   the client writes too. The model keeps its own record of every change of every key and checks,
   after every step, each value the cache would serve.
3. Client and AsyncClient against a one-shard fake daemon with a real Shard and a real feed
   (tests/near_support.py): the client's own writes drop its copies even when the daemon's
   invalidation never comes, and the bounds a NearCache is given hold in a client.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shardd import near_cache
from shardd import protocol as p
from shardd.aclient import AsyncClient
from shardd.client import Client
from shardd.errors import ProtocolError
from shardd.hot_marks import HotMarks
from shardd.near_cache import MISS, NearCache
from tests.near_support import WAIT, fake_daemon, read_until_held, stat, wait_until
from tests.unit.test_op_table import SAMPLES  # one op of each kind, on key b"k"

INC = 77
OTHER_INC = 78


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def msg(seq: int, kind: int = p.INVALIDATE_KEYS, keys: list[bytes] | None = None, shard: int = 0,
        inc: int = INC) -> bytes:
    return p.encode(p.Invalidation(shard, inc, seq, kind, keys or []))


def hb(seq: int, shard: int = 0, inc: int = INC) -> bytes:
    return msg(seq, p.HEARTBEAT, shard=shard, inc=inc)


def following(seq: int = 0, shards: tuple[int, ...] = (0,), **kwargs: Any) -> NearCache:
    """A NearCache that has heard each shard's feed (incarnation INC) at ``seq``, at t = 100."""
    cache = NearCache(clock=Clock(), **kwargs)
    for shard in shards:
        cache.on_message(hb(seq, shard), 100.0)
    return cache


def reply(value: bytes | None, seq: int = 0, lease_ms: int = 1000, shard: int = 0, inc: int = INC) -> list[Any]:
    return [value, lease_ms, shard, inc, seq]


# --- Rule 1: what is kept ------------------------------------------------------------------------


def test_a_hot_reply_from_a_followed_feed_is_kept_and_served() -> None:
    cache = following()
    assert cache.admit(b"k", reply(b"v"), 100.0, cache.writes) == b"v"
    assert cache.lookup(b"k", 100.5) == b"v"
    assert cache.stats() == {"entries": 1, "bytes": 2, "hits": 1, "misses": 0, "admitted": 1, "refused": 0,
                             "invalidations": 0, "expired": 0, "resets": 0, "gaps": 0, "feeds": 1}


@pytest.mark.parametrize("answer", [reply(b"v", lease_ms=0), reply(None)], ids=["not hot", "no value"])
def test_a_reply_without_a_lease_or_a_value_is_answered_and_not_kept(answer: list[Any]) -> None:
    cache = following()
    assert cache.admit(b"k", answer, 100.0, 0) == answer[0]
    assert len(cache) == 0 and cache.refused == 0 and not cache.unfollowed


@pytest.mark.parametrize("answer", [reply(b"v", shard=1), reply(b"v", inc=OTHER_INC)],
                         ids=["a feed never heard", "another incarnation"])
def test_a_reply_from_a_feed_not_followed_is_refused_and_asks_for_the_feeds(answer: list[Any]) -> None:
    cache = following()
    assert cache.admit(b"k", answer, 100.0, 0) == b"v"
    assert len(cache) == 0 and cache.refused == 1
    assert cache.unfollowed  # the client re-reads where the feeds are


def test_a_reply_older_than_an_invalidation_of_its_key_is_refused() -> None:
    cache = following(seq=4)
    cache.on_message(msg(5, keys=[b"k"]), 100.0)
    assert cache.admit(b"k", reply(b"old", seq=4), 99.0, 0) == b"old"  # answered, as it was read...
    assert len(cache) == 0 and cache.refused == 1  # ...but not kept
    assert cache.admit(b"k", reply(b"new", seq=5), 100.0, 0) == b"new"  # read after message 5: fresh
    assert cache.lookup(b"k", 100.0) == b"new"
    assert cache.admit(b"j", reply(b"j", seq=4), 99.5, 0) == b"j"  # another key: message 5 says nothing of it
    assert cache.lookup(b"j", 100.0) == b"j"


def test_a_reply_from_before_a_gap_an_all_or_a_restart_is_refused() -> None:
    for event in (msg(7, keys=[b"x"]), msg(5, p.INVALIDATE_ALL), hb(9), hb(0, inc=OTHER_INC)):
        cache = following(seq=4)
        cache.on_message(event, 100.0)
        assert cache.admit(b"k", reply(b"v", seq=4), 99.0, 0) == b"v"
        assert len(cache) == 0 and cache.refused == 1, event


def test_a_reply_to_a_read_sent_before_one_of_our_writes_is_refused() -> None:
    cache = following()
    writes = cache.writes
    cache.wrote(p.Set(b"other", b"x"))  # any write of ours (which may be answered before the read)
    assert cache.admit(b"k", reply(b"v"), 100.0, writes) == b"v"
    assert len(cache) == 0 and cache.refused == 1
    assert cache.admit(b"k", reply(b"v"), 100.0, cache.writes) == b"v"
    assert len(cache) == 1


@pytest.mark.parametrize("answer", [None, [b"v", 1000, 0, INC], b"v", 5])
def test_a_reply_of_the_wrong_shape_is_a_protocol_error(answer: Any) -> None:
    with pytest.raises(ProtocolError, match="lease_ms"):
        following().admit(b"k", answer, 100.0, 0)


def test_a_hot_value_that_is_not_bytes_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="bytes"):
        following().admit(b"k", reply("text"), 100.0, 0)  # type: ignore[arg-type]


# --- Rule 2: until when a copy is served ---------------------------------------------------------


def test_an_invalidation_naming_the_key_drops_it_and_no_other() -> None:
    cache = following()
    for key in (b"a", b"b"):
        cache.admit(key, reply(key), 100.0, 0)
    cache.on_message(msg(1, keys=[b"a", b"zzz"]), 100.0)
    assert cache.lookup(b"a", 100.0) is MISS
    assert cache.lookup(b"b", 100.0) == b"b"
    assert cache.invalidations == 1


@pytest.mark.parametrize(("event", "counter"), [
    (msg(1, p.INVALIDATE_ALL), "resets"),
    (msg(2, keys=[b"x"]), "gaps"),         # message 1 was lost
    (hb(1), "gaps"),                       # a heartbeat that reveals message 1 was lost
    (hb(0, inc=OTHER_INC), None),          # the worker restarted
    (msg(1, keys=[b"x"], inc=OTHER_INC), None),
])
def test_an_all_a_gap_or_a_new_incarnation_drops_every_copy_of_that_shard_only(event: bytes, counter: str) -> None:
    cache = following(shards=(0, 1))
    cache.admit(b"a", reply(b"a"), 100.0, 0)
    cache.admit(b"b", reply(b"b"), 100.0, 0)
    cache.admit(b"c", reply(b"c", shard=1), 100.0, 0)
    before = cache.stats()
    cache.on_message(event, 100.0)
    assert cache.lookup(b"a", 100.0) is MISS and cache.lookup(b"b", 100.0) is MISS
    assert cache.lookup(b"c", 100.0) == b"c"
    if counter is not None:
        assert cache.stats()[counter] == before[counter] + 1


def test_heartbeats_and_messages_in_sequence_drop_nothing_else() -> None:
    cache = following()
    cache.admit(b"k", reply(b"v"), 100.0, 0)
    for event in (hb(0), hb(0), msg(1, keys=[b"x"]), hb(1), msg(2, keys=[b"y"]), hb(2)):
        cache.on_message(event, 100.0)
    assert cache.lookup(b"k", 100.0) == b"v"
    assert cache.gaps == cache.resets == 0


def test_after_a_gap_the_feed_is_followed_from_where_it_is() -> None:
    cache = following()
    cache.on_message(msg(3, keys=[b"x"]), 100.0)  # gap
    cache.admit(b"k", reply(b"v", seq=3), 100.0, 0)
    cache.on_message(msg(4, keys=[b"y"]), 100.0)  # in sequence again
    assert cache.lookup(b"k", 100.0) == b"v" and cache.gaps == 1


def test_a_copy_is_served_until_its_lease_counted_from_when_the_read_was_sent() -> None:
    cache = following()
    cache.admit(b"k", reply(b"v", lease_ms=250), 100.0, 0)  # sent at 100.0, answered whenever
    cache.on_message(hb(0), 100.2)
    assert cache.lookup(b"k", 100.249) == b"v"
    assert cache.lookup(b"k", 100.25) is MISS
    assert cache.expired == 1 and len(cache) == 0


def test_a_copy_is_not_served_once_its_feed_has_been_silent_for_silence_s() -> None:
    cache = following(silence_s=0.5)
    cache.admit(b"k", reply(b"v", lease_ms=10_000), 100.0, 0)
    assert cache.lookup(b"k", 100.5) == b"v"  # heard at 100.0: silent for exactly 0.5 s
    cache.admit(b"j", reply(b"j", lease_ms=10_000), 100.0, 0)
    assert cache.lookup(b"k", 100.5001) is MISS
    cache.on_message(hb(0), 101.0)
    assert cache.lookup(b"j", 101.1) == b"j"  # (j was kept meanwhile: the feed speaks again)


def test_each_shards_silence_is_its_own() -> None:
    cache = following(shards=(0, 1))
    cache.admit(b"a", reply(b"a", lease_ms=10_000), 100.0, 0)
    cache.admit(b"c", reply(b"c", lease_ms=10_000, shard=1), 100.0, 0)
    cache.on_message(hb(0, shard=1), 101.0)
    assert cache.lookup(b"a", 101.0) is MISS
    assert cache.lookup(b"c", 101.0) == b"c"


@pytest.mark.parametrize("frame", [b"\xc1", b"\x90", msgspec.msgpack.encode([0, INC, "x", 0, []])],
                         ids=["not msgpack", "wrong shape", "wrong type"])
def test_an_unreadable_message_drops_everything_and_forgets_every_feeds_position(frame: bytes) -> None:
    cache = following(shards=(0, 1))
    cache.admit(b"a", reply(b"a"), 100.0, 0)
    cache.admit(b"c", reply(b"c", shard=1), 100.0, 0)
    cache.on_message(frame, 100.0)
    assert len(cache) == 0 and cache.bytes == 0
    assert cache.admit(b"a", reply(b"a"), 100.0, 0) == b"a" and len(cache) == 0  # nothing kept...
    cache.on_message(hb(0), 100.0)  # ...until the feed speaks again
    cache.admit(b"a", reply(b"a"), 100.0, 0)
    assert cache.lookup(b"a", 100.0) == b"a"


def test_past_its_memory_of_recent_keys_a_feed_refuses_replies_it_cannot_decide(monkeypatch) -> None:
    monkeypatch.setattr(near_cache, "_RECENT_MAX", 4)
    cache = following()
    cache.on_message(msg(1, keys=[b"k1", b"k2"]), 100.0)
    cache.on_message(msg(2, keys=[b"k3", b"k4"]), 100.0)
    cache.on_message(msg(3, keys=[b"k5"]), 100.0)  # forgets k1..k4: replies read before 2 are undecidable
    for key, seq, kept in [(b"k1", 0, False), (b"k9", 1, False), (b"k9", 2, True), (b"k5", 2, False),
                           (b"k5", 3, True)]:
        cache.admit(key, reply(key, seq=seq), 100.0, 0)
        assert (key in cache.entries) is kept, (key, seq)


# --- Rule 4: this client's own writes ----------------------------------------------------------


KEYED_WRITES = sorted((cls for cls, spec in p.OPS.items() if spec.kind == p.KEYED and spec.write),
                      key=lambda cls: cls.__name__)


@pytest.mark.parametrize("cls", KEYED_WRITES, ids=lambda cls: cls.__name__)
def test_every_keyed_write_of_ours_drops_our_copy_before_it_is_sent(cls: type) -> None:
    cache = following()
    for key in (b"k", b"other"):
        cache.admit(key, reply(key), 100.0, 0)
    writes = cache.writes
    cache.wrote(SAMPLES[cls])
    assert cache.lookup(b"k", 100.0) is MISS
    assert cache.lookup(b"other", 100.0) == b"other"
    assert cache.writes == writes + 1


@pytest.mark.parametrize("op", [
    p.SetMany([(b"a", b"1"), (b"x", b"2")]), p.SetManyNx([(b"x", b"2"), (b"a", b"1")]), p.DeleteMany([b"x", b"a"]),
], ids=lambda op: type(op).__name__)
def test_a_multi_key_write_of_ours_drops_each_of_its_keys(op: p.Op) -> None:
    cache = following()
    for key in (b"a", b"b"):
        cache.admit(key, reply(key), 100.0, 0)
    cache.wrote(op)
    assert cache.lookup(b"a", 100.0) is MISS and cache.lookup(b"b", 100.0) == b"b"
    assert cache.writes == 1


@pytest.mark.parametrize("op", [p.Flush(), p.Resize(3)], ids=["flush", "resize"])
def test_a_flush_or_resize_of_ours_drops_everything(op: p.Op) -> None:
    cache = following(shards=(0, 1))
    cache.admit(b"a", reply(b"a"), 100.0, 0)
    cache.admit(b"c", reply(b"c", shard=1), 100.0, 0)
    cache.wrote(op)
    assert len(cache) == 0 and cache.writes == 1
    cache.admit(b"a", reply(b"a"), 100.0, cache.writes)  # read after it, but the feed has not spoken since
    assert len(cache) == 0


@pytest.mark.parametrize("op", [p.Get(b"a"), p.GetMany([b"a"]), p.Gets(b"a"), p.Exists(b"a"), p.Ping(),
                                p.Stats(), p.Topology()], ids=lambda op: type(op).__name__)
def test_reads_are_not_writes(op: p.Op) -> None:
    cache = following()
    cache.admit(b"a", reply(b"a"), 100.0, 0)
    cache.wrote(op)
    assert cache.writes == 0 and cache.lookup(b"a", 100.0) == b"a"


# --- Rule 5: bounds, and the hits a copy answered ----------------------------------------------------


def test_at_most_max_entries_the_oldest_copy_goes_first() -> None:
    cache = following(max_entries=3)
    for i in range(5):
        cache.admit(b"k%d" % i, reply(b"v"), 100.0, 0)
    assert list(cache.entries) == [b"k2", b"k3", b"k4"]


def test_at_most_max_bytes_the_oldest_copies_go_first_and_a_large_value_is_never_kept() -> None:
    cache = following(max_bytes=1024)
    for i in range(20):
        cache.admit(b"k%02d" % i, reply(b"x" * 60), 100.0, 0)  # 63 bytes each: 16 fit in 1024
    assert cache.bytes == 16 * 63 and next(iter(cache.entries)) == b"k04"
    cache.admit(b"big", reply(b"x" * 62), 100.0, 0)  # 65 bytes > 1024 / 16
    assert b"big" not in cache.entries and cache.refused == 1


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_entries": 0}, "max_entries"), ({"max_entries": True}, "max_entries"), ({"max_entries": 1.5}, "max_entries"),
    ({"max_bytes": 1023}, "max_bytes"), ({"silence_s": 0}, "silence_s"), ({"silence_s": 61}, "silence_s"),
])
def test_bounds_are_checked(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NearCache(**kwargs)


def test_a_dropped_copys_hits_are_credited_with_the_keys_next_read() -> None:
    cache = following()
    cache.admit(b"k", reply(b"v"), 100.0, 0)
    for _ in range(3):
        cache.lookup(b"k", 100.0)
    assert cache.request(b"k") == p.NearGet(b"k", 0)  # still held: nothing to report yet
    cache.on_message(msg(1, keys=[b"k"]), 100.0)
    assert cache.request(b"k") == p.NearGet(b"k", 3)
    assert cache.request(b"k") == p.NearGet(b"k", 0)  # reported once


@st.composite
def admissions(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    keys = st.binary(min_size=1, max_size=8)
    return draw(st.lists(st.tuples(keys, st.binary(max_size=120)), max_size=60))


@settings(max_examples=200, deadline=None)
@given(admissions(), st.integers(1, 6), st.sampled_from([1024, 1500, 4096]))
def test_the_bounds_hold_whatever_is_admitted(items: list[tuple[bytes, bytes]], max_entries: int,
                                              max_bytes: int) -> None:
    cache = following(max_entries=max_entries, max_bytes=max_bytes)
    for key, value in items:
        cache.admit(key, reply(value), 100.0, 0)
        assert len(cache) <= max_entries and cache.bytes <= max_bytes
        assert cache.bytes == sum(len(k) + len(e[0]) for k, e in cache.entries.items())
        if len(key) + len(value) <= max_bytes >> 4:
            assert cache.entries[key][0] == value  # the newest admit is always kept...
        else:
            assert key not in cache.entries  # ...unless it is too large


# --- the model ------------------------------------------------------------------------------------


KEYS = {b"a": 0, b"b": 0, b"c": 1, b"d": 1}  # key -> its shard
LEASE_MS = 750
SILENCE_S = 0.5


class Change:
    """A change of a key's value at its shard, and the first message that followed it there.

    ``cover`` = (incarnation, seq): once the client has heard that feed at ``seq`` or later, the
    change (or a gap showing it missed it) has reached it. A change that was followed by no message
    before its worker restarted is covered by any message of the next incarnation.
    """

    __slots__ = ("cover", "key", "version")

    def __init__(self, key: bytes, version: int) -> None:
        self.key, self.version = key, version
        self.cover: tuple[int, int] | None = None


class ServerShard:
    def __init__(self, shard: int, inc: int) -> None:
        self.shard = shard
        self.hm = HotMarks(shard, 0.01, 1.0, 8, LEASE_MS, incarnation=inc)
        self.seq = 0
        self.resizing = False
        self.uncovered: list[Change] = []

    @property
    def inc(self) -> int:
        return self.hm.incarnation


class Read:
    __slots__ = ("answer", "key", "sent_at", "version", "writes_then")

    def __init__(self, key: bytes, sent_at: float, writes_then: int) -> None:
        self.key, self.sent_at, self.writes_then = key, sent_at, writes_then
        self.answer: list[Any] | None = None
        self.version = 0


def value_of(key: bytes, version: int, pad: int) -> bytes:
    return b"%s:%d:" % (key, version) + b"." * pad


def version_of(value: bytes) -> tuple[bytes, int]:
    key, version, _ = value.split(b":", 2)
    return key, int(version)


class Model:
    """Two shards, a lossy network and one client's NearCache (module docstring, item 2).

    Times are multiples of 1/8 s (leases and TTLs of 125 ms), exact in binary floating point, so
    the model's boundaries are the cache's to the last bit.
    """

    def __init__(self) -> None:
        self.now = 1000.0
        self.cache = NearCache(max_entries=3, max_bytes=1024, silence_s=SILENCE_S, clock=lambda: self.now)
        self.incs = iter(range(1, 1 << 30))
        self.shards = [ServerShard(i, next(self.incs)) for i in range(2)]
        self.queues: list[list[tuple[int, int, bytes]]] = [[], []]  # per shard: (incarnation, seq, frame)
        self.version = 0
        self.store: dict[bytes, tuple[int, bytes | None, float | None]] = {k: (0, None, None) for k in KEYS}
        self.expiry: dict[tuple[bytes, int], float] = {}  # (key, version) -> when that value expires
        self.changes: dict[bytes, list[Change]] = {k: [] for k in KEYS}
        self.own: dict[bytes, int] = dict.fromkeys(KEYS, 0)  # our own newest write's version
        self.heard_at: dict[int, float] = {}
        self.delivered: dict[tuple[int, int], int] = {}  # (shard, incarnation) -> highest seq delivered
        self.kept: dict[bytes, tuple[int, float, int]] = {}  # key -> (version, served until, shard)
        self.reads: list[Read] = []
        self.served = 0

    def healthy_start(self) -> None:
        """Every key hot and holding a value, both feeds followed: copies are kept from the first read."""
        for shard in (0, 1):
            self.mark(shard, set(KEYS))
            self.heartbeat(shard)
            self.deliver(shard, 1)
        for key in sorted(KEYS):
            self.someone_writes(key)
        for shard in (0, 1):
            self.all_is_well(shard)

    # --- the shards ---------------------------------------------------------------------------

    def change(self, key: bytes, value: bytes | None, ttl: float | None = None) -> int:
        """A key's value changes at its shard (a write, a delete, an expiry, a restart's loss)."""
        sh = self.shards[KEYS[key]]
        self.version += 1
        expires = None if ttl is None or value is None else self.now + ttl
        self.store[key] = (self.version, value, expires)
        if expires is not None:
            self.expiry[(key, self.version)] = expires
        c = Change(key, self.version)
        self.changes[key].append(c)
        sh.uncovered.append(c)
        return self.version

    def write(self, key: bytes, value: bytes | None, ttl: float | None = None) -> int:
        self.shards[KEYS[key]].hm.touched(key)  # as Shard.run does, for every write
        return self.change(key, value, ttl)

    def current(self, key: bytes) -> tuple[int, bytes | None, float | None]:
        version, value, expires = self.store[key]
        if expires is not None and expires <= self.now:
            return version, None, None  # expired (a read reclaims it without a message: its leases ended)
        return version, value, expires

    def someone_writes(self, key: bytes, pad: int = 0, ttl: float | None = None, delete: bool = False) -> None:
        self.write(key, None if delete else value_of(key, self.version + 1, pad), ttl)

    def active_expiry(self, shard: int) -> None:
        for key, sh in KEYS.items():
            _, value, expires = self.store[key]
            if sh == shard and value is not None and expires is not None and expires <= self.now:
                self.shards[shard].hm.touched(key)  # Store.vanishing
                self.change(key, None)

    def mark(self, shard: int, hot: set[bytes]) -> None:
        sh = self.shards[shard]
        if not sh.resizing:
            sh.hm.evaluate([(key, 10.0) for key in sorted(hot) if KEYS[key] == shard], 0.0, 0.0)

    def publish(self, shard: int) -> None:
        sh = self.shards[shard]
        frame = sh.hm.take()
        if frame is None:
            return
        sh.seq += 1
        message = p.decode_invalidation(frame)
        assert (message.shard, message.incarnation, message.seq) == (shard, sh.inc, sh.seq)
        for c in sh.uncovered:
            c.cover = (sh.inc, sh.seq)
        sh.uncovered = []
        self.queues[shard].append((sh.inc, sh.seq, frame))

    def heartbeat(self, shard: int) -> None:
        sh = self.shards[shard]
        frame = sh.hm.heartbeat()
        assert p.decode_invalidation(frame).seq == sh.seq
        self.queues[shard].append((sh.inc, sh.seq, frame))

    def someone_flushes(self) -> None:
        for sh in self.shards:
            sh.hm.reset()
        for key in KEYS:
            if self.store[key][1] is not None:
                self.change(key, None)

    def resize_starts(self, shard: int) -> None:
        sh = self.shards[shard]
        sh.hm.reset()
        sh.resizing = True

    def resize_ends(self, shard: int) -> None:
        self.shards[shard].resizing = False

    def worker_restarts(self, shard: int) -> None:
        old = self.shards[shard]
        new = self.shards[shard] = ServerShard(shard, next(self.incs))
        for key, sh in KEYS.items():
            if sh == shard and self.store[key][1] is not None:
                self.change(key, None)  # lost with the process
        for c in old.uncovered + new.uncovered:
            c.cover = (new.inc, 0)  # no message of the old feed will follow it: the new feed's first does
        old.uncovered = new.uncovered = []

    # --- the network ----------------------------------------------------------------------------

    def deliver(self, shard: int, n: int) -> None:
        queue = self.queues[shard]
        for inc, seq, frame in queue[:n]:
            self.cache.on_message(frame, self.now)
            self.delivered[(shard, inc)] = max(self.delivered.get((shard, inc), -1), seq)
            self.heard_at[shard] = self.now
        del queue[:n]

    def all_is_well(self, shard: int) -> None:
        """What happens most of the time: the shard publishes what it owes and heartbeats, the
        client hears all of it, and a little time passes."""
        self.publish(shard)
        self.heartbeat(shard)
        self.deliver(shard, len(self.queues[shard]))
        self.now += 0.125

    def lose(self, shard: int) -> None:
        del self.queues[shard][:1]

    def unreadable_message(self) -> None:
        self.cache.on_message(b"\xc1", self.now)
        assert len(self.cache) == 0

    # --- the client -----------------------------------------------------------------------------

    def get(self, key: bytes) -> Read | None:
        """A read: served from the cache (checked), or a near_get sent (returned)."""
        value = self.cache.lookup(key, self.now)
        if value is not MISS:
            self.check_served(key, value)
            self.served += 1
            return None
        request = self.cache.request(key)
        assert request.key == key and request.hits >= 0
        read = Read(key, self.now, self.cache.writes)
        self.reads.append(read)
        return read

    def answer(self, read: Read) -> None:
        """The shard applies the read: the reply is what it is now, and on its way."""
        sh = self.shards[KEYS[read.key]]
        version, value, expires = self.current(read.key)
        lease = 0
        if value is not None and not sh.resizing:
            ttl_ms = -1 if expires is None else round((expires - self.now) * 1000)
            lease = sh.hm.lease(read.key, ttl_ms)
        assert sh.hm.seq == sh.seq
        read.answer, read.version = [value, lease, sh.shard, sh.inc, sh.seq], version

    def arrive(self, read: Read) -> None:
        """The reply reaches the client, which offers it to the cache."""
        self.reads.remove(read)
        admitted = self.cache.admitted
        assert read.answer is not None
        value = self.cache.admit(read.key, read.answer, read.sent_at, read.writes_then)
        assert value == read.answer[0]
        if self.cache.admitted > admitted:
            lease = read.answer[1]
            assert lease > 0 and value is not None
            self.kept[read.key] = (read.version, read.sent_at + lease / 1000, read.answer[2])

    def we_write(self, key: bytes, how: str, pad: int = 0) -> None:
        value = value_of(key, self.version + 1, pad)
        op: p.Op = {"set": p.Set(key, value), "delete": p.Delete(key), "set_many": p.SetMany([(key, value)]),
                    "delete_many": p.DeleteMany([key]), "set_many_nx": p.SetManyNx([(key, value)]),
                    "incr": p.Incr(key)}[how]
        self.cache.wrote(op)
        assert key not in self.cache.entries  # Rule 4: before it is sent
        # (what incr or set_many_nx did does not matter to the model: any change gets a new version)
        self.own[key] = self.write(key, None if how.startswith("delete") else value)

    def we_flush(self) -> None:
        self.cache.wrote(p.Flush())
        assert len(self.cache) == 0
        self.someone_flushes()
        self.own = {key: self.store[key][0] for key in KEYS}

    # --- what must hold -----------------------------------------------------------------------------

    def check_served(self, key: bytes, value: bytes) -> None:
        served_key, version = version_of(value)
        assert served_key == key
        assert key in self.kept and self.kept[key][0] == version, "served a value that was never kept"
        _, until, shard = self.kept[key]
        assert self.now < until, "served past its lease"
        assert self.now - self.heard_at[shard] <= SILENCE_S, "served while its feed was silent"
        assert self.now < self.expiry.get((key, version), float("inf")), "served past the key's TTL"
        assert version >= self.own[key], "our own write is not visible"
        for c in self.changes[key]:
            if c.cover is not None and self.delivered.get((shard, c.cover[0]), -1) >= c.cover[1]:
                assert version >= c.version, f"stale: version {version} after change {c.version} was delivered"

    def check(self) -> None:
        """Every copy the cache would serve now is allowed, and the bounds hold."""
        cache = self.cache
        for key, entry in cache.entries.items():
            if self.now < entry[1] and self.now - entry[2].heard <= SILENCE_S:
                self.check_served(key, entry[0])
        assert len(cache) <= cache.max_entries
        assert cache.bytes == sum(len(k) + len(e[0]) for k, e in cache.entries.items()) <= cache.max_bytes

    # --- one step of a history ------------------------------------------------------------------------

    def step(self, action: str, key: bytes, shard: int, n: int) -> None:
        reads = self.reads
        if action == "get":  # a blocking client's read: nothing happens between its send and its reply
            read = self.get(key)
            if read is not None:
                self.answer(read)
                self.arrive(read)
        elif action == "get_later":
            self.get(key)
        elif action == "answer" and any(r.answer is None for r in reads):
            waiting = [r for r in reads if r.answer is None]
            self.answer(waiting[n % len(waiting)])
        elif action == "arrive" and any(r.answer is not None for r in reads):
            answered = [r for r in reads if r.answer is not None]
            self.arrive(answered[n % len(answered)])
        elif action == "write":
            self.someone_writes(key, pad=(0, 20, 70)[n % 3], ttl=(None, None, 0.5, 2.0)[n % 4], delete=n == 7)
        elif action == "we_write":
            self.we_write(key, ("set", "delete", "set_many", "delete_many", "set_many_nx", "incr")[n % 6], n % 2 * 20)
        elif action == "all_is_well":
            self.all_is_well(shard)
        elif action == "publish":
            self.publish(shard)
        elif action == "heartbeat":
            self.heartbeat(shard)
        elif action == "deliver":
            self.deliver(shard, 1 + n % 3)
        elif action == "lose":
            self.lose(shard)
        elif action == "tick":
            self.now += (0.125, 0.25, 0.5, 0.625, 1.0)[n % 5]
        elif action == "mark":
            self.mark(KEYS[key], self.shards[KEYS[key]].hm.marked | {key})
        elif action == "unmark":
            self.mark(KEYS[key], self.shards[KEYS[key]].hm.marked - {key})
        elif action == "expire":
            self.active_expiry(shard)
        elif action == "flush":
            self.someone_flushes()
        elif action == "we_flush":
            self.we_flush()
        elif action == "resize_starts":
            self.resize_starts(shard)
        elif action == "resize_ends":
            self.resize_ends(shard)
        elif action == "restart":
            self.worker_restarts(shard)
        elif action == "unreadable":
            self.unreadable_message()


# How often each action is drawn: mostly reads, writes and a healthy feed; now and then loss,
# restarts, flushes and resizes.
ACTIONS = (["get"] * 24 + ["get_later"] * 8 + ["answer"] * 8 + ["arrive"] * 8 + ["write"] * 12 + ["we_write"] * 4
           + ["all_is_well"] * 18 + ["publish"] * 4 + ["heartbeat"] * 3 + ["deliver"] * 6 + ["lose"] * 2
           + ["tick"] * 4 + ["mark"] * 2 + ["resize_ends"] * 3
           + ["unmark", "expire", "flush", "we_flush", "resize_starts", "restart", "unreadable"])
HISTORY = st.lists(st.tuples(st.sampled_from(ACTIONS), st.sampled_from(sorted(KEYS)), st.integers(0, 1),
                             st.integers(0, 7)), min_size=40, max_size=150)


def run_history(history: list[tuple[str, bytes, int, int]]) -> Model:
    m = Model()
    m.healthy_start()
    m.check()
    for step in history:
        m.step(*step)
        m.check()
    return m


# Histories worth running every time, whatever hypothesis draws: a near_get answered before a
# change of its key, whose reply arrives after the client heard of the change by...
def race(*actions: str) -> list[tuple[str, bytes, int, int]]:
    """A read of a, answered; then ``actions`` ("write:b" names a key, else a; on shard 0); then the
    read's reply arrives."""
    steps = [(action.partition(":")[0], (action.partition(":")[2] or "a").encode(), 0, 0) for action in actions]
    return [("get_later", b"a", 0, 0), ("answer", b"a", 0, 0), *steps, ("arrive", b"a", 0, 0)]


RACES = [
    race("write", "all_is_well"),  # its message
    race("flush", "all_is_well"),  # an ALL
    race("write", "publish", "lose", "write:b", "all_is_well"),  # a gap
    race("write", "publish", "lose", "heartbeat", "deliver"),  # a gap a heartbeat shows
    race("we_write"),  # a write of ours
    race("restart", "all_is_well"),  # a new incarnation
    # ...and messages naming more keys after it than the feed remembers (with _RECENT_MAX = 2)
    race("write", "all_is_well", "write:b", "all_is_well", "write:b", "all_is_well"),
]


def with_races(test: Any) -> Any:
    for history in RACES:
        test = example(history)(test)
    return test


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(HISTORY)
@with_races
def test_the_model_never_sees_a_copy_served_that_it_should_not_be(history: list[tuple[str, bytes, int, int]]) -> None:
    run_history(history)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(HISTORY)
@with_races
def test_the_model_with_a_feed_that_remembers_two_recent_keys(history: list[tuple[str, bytes, int, int]]) -> None:
    saved = near_cache._RECENT_MAX
    near_cache._RECENT_MAX = 2  # its floor moves up at almost every message
    try:
        run_history(history)
    finally:
        near_cache._RECENT_MAX = saved


def test_the_model_is_not_vacuous() -> None:
    """A fixed history: copies are kept, served, refused, invalidated, dropped on a gap and expired."""
    m = run_history([("get", b"a", 0, 0), ("get", b"a", 0, 0)])
    assert m.cache.admitted == 1 and m.served == 1
    m.step("get_later", b"a", 0, 0)  # (served: no read sent)
    m.step("write", b"a", 0, 0)
    m.step("get", b"a", 0, 0)  # still served: the write's message has not arrived
    assert m.served == 3
    m.step("all_is_well", b"a", 0, 0)
    m.step("get", b"a", 0, 0)  # invalidated: read again and kept again
    assert m.cache.invalidations == 1 and m.cache.admitted == 2
    m.step("get", b"c", 1, 0)
    assert m.get(b"c") is None  # c is held now
    m.step("we_write", b"c", 1, 0)
    read = m.get(b"c")
    assert read is not None
    m.answer(read)
    m.step("write", b"c", 0, 0)
    m.step("all_is_well", b"c", 1, 0)
    m.arrive(read)  # read before the write its invalidation came from
    assert m.cache.refused == 1
    m.step("write", b"b", 0, 0)
    m.step("get", b"b", 0, 0)
    m.step("write", b"a", 0, 0)
    m.step("publish", b"a", 0, 0)
    m.step("lose", b"a", 0, 0)
    m.step("all_is_well", b"b", 0, 0)  # the write to a was lost: a gap, b dropped too
    assert m.cache.gaps == 1 and b"b" not in m.cache.entries
    m.step("get", b"c", 0, 0)
    m.step("tick", b"c", 0, 4)
    m.step("get", b"c", 0, 0)
    assert m.cache.expired >= 1
    m.check()


# --- Client and AsyncClient against the fake daemon -----------------------------------------------


def test_a_client_serves_a_hot_key_from_its_copy() -> None:
    with fake_daemon() as fake, Client(fake.endpoint, timeout=WAIT) as c:
        fake.put(b"k", b"v")
        fake.mark(b"k")
        assert read_until_held(c, b"k") == b"v"
        n = len(fake.tags())
        for _ in range(100):
            assert c.get(b"k") == b"v"
        assert fake.tags()[n:].count("near_get") <= 1  # (a lease of 10 s may not run out meanwhile)
        stats = c.near_cache_stats()
        assert stats is not None and stats["following"] and stats["entries"] == 1


# (method, args, the value read after it); each on key "k" holding b"1".
OWN_WRITES: list[tuple[str, tuple[Any, ...], bytes | None]] = [
    ("set", ("k", b"new"), b"new"),
    ("set", ("k", b"new"), b"new"),
    ("delete", ("k",), None),
    ("incr", ("k",), b"2"),
    ("decr", ("k", 5), b"-4"),
    ("append", ("k", b"x"), b"1x"),
    ("getdel", ("k",), None),
    ("expire", ("k", 100.0), b"1"),
    ("persist", ("k",), b"1"),
    ("touch", ("k", 100.0), b"1"),
    ("set_many", ({"k": b"m", "other": b"o"},), b"m"),
    ("delete_many", (["other", "k"],), None),
    ("flush", (), None),
]


def _own_write_ids() -> list[str]:
    return [f"{method}{i}" for i, (method, _, _) in enumerate(OWN_WRITES)]


@pytest.mark.parametrize(("method", "args", "after"), OWN_WRITES, ids=_own_write_ids())
def test_a_clients_own_write_is_read_back_though_its_invalidation_never_comes(method: str, args: tuple[Any, ...],
                                                                             after: bytes | None) -> None:
    with fake_daemon() as fake, Client(fake.endpoint, timeout=WAIT) as c:
        fake.put(b"k", b"1")
        fake.mark(b"k", b"other")
        read_until_held(c, b"k")
        fake.publish = False  # the daemon's invalidations are held back: only the client's own rule helps
        getattr(c, method)(*args)
        n = len(fake.tags())
        assert c.get(b"k") == after
        assert fake.tags()[n:] == ["near_get"]  # the copy was dropped: the read went to the daemon


def test_a_clients_own_pipelined_write_is_read_back() -> None:
    with fake_daemon() as fake, Client(fake.endpoint, timeout=WAIT) as c:
        fake.put(b"k", b"1")
        fake.mark(b"k")
        read_until_held(c, b"k")
        fake.publish = False
        with c.pipeline() as pipe:
            pipe.get("k")
            pipe.set("k", b"piped")
            assert pipe.execute() == [b"1", True]
        assert c.get(b"k") == b"piped"


def test_a_clients_own_cas_is_read_back() -> None:
    with fake_daemon() as fake, Client(fake.endpoint, timeout=WAIT) as c:
        fake.put(b"k", b"1")
        fake.mark(b"k")
        read_until_held(c, b"k")
        fake.publish = False
        _, version = c.gets("k")
        assert c.cas("k", b"swapped", version) is True
        assert c.get(b"k") == b"swapped"


@pytest.mark.parametrize(("method", "args", "after"), OWN_WRITES[::3], ids=_own_write_ids()[::3])
def test_an_async_clients_own_write_is_read_back(method: str, args: tuple[Any, ...], after: bytes | None) -> None:
    async def main(fake: Any) -> None:
        async with AsyncClient(fake.endpoint, timeout=WAIT) as ac:

            async def held() -> bool:
                hits = stat(ac, "hits")
                await ac.get(b"k")
                return stat(ac, "hits") > hits

            deadline = time.monotonic() + WAIT
            while not await held():
                assert time.monotonic() < deadline
                await asyncio.sleep(0.002)
            fake.publish = False
            await getattr(ac, method)(*args)
            n = len(fake.tags())
            assert await ac.get(b"k") == after
            assert fake.tags()[n:] == ["near_get"]

    with fake_daemon() as fake:
        fake.put(b"k", b"1")
        fake.mark(b"k", b"other")
        asyncio.run(main(fake))


def test_a_client_keeps_no_more_than_its_near_cache_allows() -> None:
    keys = [b"k%d" % i for i in range(6)]
    with fake_daemon() as fake, Client(fake.endpoint, timeout=WAIT, near_cache=NearCache(max_entries=2)) as c:
        for key in keys:
            fake.put(key, b"v")
        fake.mark(*keys)
        read_until_held(c, keys[0])
        for _ in range(5):
            for key in keys:
                assert c.get(key) == b"v"
                assert stat(c, "entries") <= 2
        assert stat(c, "admitted") > 2


def test_near_cache_must_be_a_bool_or_a_near_cache() -> None:
    with pytest.raises(TypeError, match="near_cache"):
        Client("tcp://127.0.0.1:1", near_cache=1024)  # type: ignore[arg-type]


def test_silence_is_measured_from_when_the_feed_last_spoke_not_from_when_the_client_read_it() -> None:
    """Was a bug (fixed in issue 15): a copy is served after its feed has been silent for longer than silence_s.

    docs/near-cache.md, guarantee 4: a copy is "not [served] at all once its shard's feed has been
    silent for 0.5 s (a dead worker or connection)". The client stamps each feed message with the
    time it *drains* it (ClientBase._drain passes the lookup's ``now``), so a heartbeat that
    reached the socket before the worker died, drained a second later, counts as heard just now,
    and the copy is served for another silence_s after the feed went quiet. Seen for real in
    tests/integration/test_near_cache.py (a SIGKILLed worker's copy served after a newer write).
    """
    with fake_daemon() as fake, Client(fake.endpoint, timeout=WAIT, near_cache=NearCache(silence_s=0.2)) as c:
        fake.put(b"k", b"v")
        fake.mark(b"k")
        read_until_held(c, b"k")
        with fake.lock:
            fake.silent = True  # the worker "dies": no message is sent from now on...
            fake.feed.send(fake.near.heartbeat())  # ...after this last one, which reaches the socket
            quiet_since = time.monotonic()
        assert c._feed is not None
        wait_until(c._feed.pending, what="the last heartbeat in the client's socket")
        wait_until(lambda: time.monotonic() > quiet_since + 0.3, what="longer than silence_s")
        n = len(fake.tags())
        c.get(b"k")
        assert fake.tags()[n:] == ["near_get"], "the copy was served though the feed was silent > silence_s"


def test_a_router_mode_client_follows_a_restarted_workers_feed() -> None:
    """Was a bug (fixed): after a worker restarts (new incarnation, new feed port), a router-mode client never
    reads the topology again, so it never follows the new feed and keeps nothing of that shard.

    Client._near_get / AsyncClient._near_get only consult ``_near_due`` in the ``elif`` of ``if
    self._feed is not None``: once a feed is followed, ``near.unfollowed`` (set by every refused
    reply of the new incarnation) is never acted on. (Direct mode recovers, through the placement's
    topology refresh.) docs/near-cache.md: "a new incarnation ... drops the shard's copies"; the
    brief of issue 15: "the next get fetches the topology (router mode) and subscribes".
    """
    with fake_daemon() as fake, Client(fake.endpoint, timeout=WAIT) as c:
        fake.put(b"k", b"v")
        fake.mark(b"k")
        read_until_held(c, b"k")
        fake.restart_feed()
        fake.put(b"k", b"v2")
        fake.mark(b"k")
        admitted = stat(c, "admitted")

        def admits_again() -> bool:
            assert c.get(b"k") in (b"v", b"v2")
            return stat(c, "admitted") > admitted

        wait_until(admits_again, timeout=5.0, what="the client keeping copies from the restarted feed")
        assert c.get(b"k") == b"v2"
