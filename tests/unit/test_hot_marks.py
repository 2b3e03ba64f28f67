"""The shard's side of near caches (shardd.hot_marks, docs/near-cache.md): which keys are marked
hot, what each write, expiry, eviction, flush and resize queues on the invalidation feed, how the
messages are numbered, and that a worker publishes them before it answers.

Pure HotMarks first, then a real Shard over a real Store with a fake clock (no processes), then
the worker's loops (``_serve``, ``_serve_direct``) with in-process fakes for their sockets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from shardd import hot_marks, worker
from shardd import protocol as p
from shardd.config import build_config
from shardd.hashing import shard_for
from shardd.hot_marks import HotMarks
from shardd.store import Store
from shardd.worker import MARK_EVERY_S, Shard
from tests.unit.test_op_table import SAMPLES
from tests.unit.test_store import FakeClock

INC = 0x1234_5678_9ABC


def marks(share: float = 0.01, min_rate: float = 200.0, max_keys: int = 64, lease_ms: int = 1000,
          shard: int = 3) -> HotMarks:
    return HotMarks(shard, share, min_rate, max_keys, lease_ms, incarnation=INC)


def decoded(frame: bytes | None) -> tuple[int, int, int, int, list[bytes]]:
    assert frame is not None
    msg = p.decode_invalidation(frame)
    return msg.shard, msg.incarnation, msg.seq, msg.kind, msg.keys


# --- Rule 1: marking ------------------------------------------------------------------------


@pytest.mark.parametrize(("served", "threshold"), [
    (0.0, 200.0),        # an idle shard: the floor rate
    (10_000.0, 200.0),   # 1% of 10k/s = 100/s < the floor
    (50_000.0, 500.0),   # 1% of 50k/s = 500/s > the floor
])
def test_a_key_is_marked_at_the_larger_of_the_floor_rate_and_its_share(served: float, threshold: float) -> None:
    hm = marks()
    rates = [(b"above", threshold), (b"below", threshold * 0.999)]
    assert hm.evaluate(rates, served, 0.0) == (1, 0)
    assert hm.marked == {b"above"}
    assert hm.pending == []  # marking a key owes nobody anything


def test_a_marked_key_stays_marked_down_to_half_the_threshold_and_its_unmarking_is_published() -> None:
    hm = marks(min_rate=100.0)
    hm.evaluate([(b"k", 100.0)], 0.0, 0.0)
    for rate in (99.0, 60.0, 50.0):  # hysteresis: not unmarked while >= half
        assert hm.evaluate([(b"k", rate)], 0.0, 0.0) == (0, 0)
        assert hm.marked == {b"k"}
    assert hm.take() is None
    assert hm.evaluate([(b"k", 49.9)], 0.0, 0.0) == (0, 1)
    assert hm.marked == set()
    # A client may hold it under a lease; it is told, since nothing will name it again.
    assert decoded(hm.take()) == (3, INC, 1, p.INVALIDATE_KEYS, [b"k"])
    # An unmarked key needs the full threshold again.
    assert hm.evaluate([(b"k", 99.0)], 0.0, 0.0) == (0, 0)
    assert hm.evaluate([(b"k", 100.0)], 0.0, 0.0) == (1, 0)


def test_a_key_missing_from_the_rates_is_unmarked() -> None:
    hm = marks(min_rate=1.0)
    hm.evaluate([(b"a", 5.0), (b"b", 5.0)], 0.0, 0.0)
    hm.evaluate([(b"a", 5.0)], 0.0, 0.0)
    assert hm.marked == {b"a"}
    assert decoded(hm.take())[4] == [b"b"]


def test_at_most_max_keys_are_marked_the_hottest() -> None:
    hm = marks(min_rate=1.0, max_keys=3)
    rates = [(b"k%d" % i, float(10 + i)) for i in range(10)]
    assert hm.evaluate(rates, 0.0, 0.0) == (3, 0)
    assert hm.marked == {b"k9", b"k8", b"k7"}
    # A hotter key displaces the coolest marked one, even though that one still qualifies.
    hm.evaluate([*rates, (b"new", 100.0)], 0.0, 0.0)
    assert hm.marked == {b"new", b"k9", b"k8"}
    assert decoded(hm.take())[4] == [b"k7"]


def test_max_keys_zero_marks_nothing_and_unmarks_everything() -> None:
    hm = marks(min_rate=1.0)
    hm.evaluate([(b"a", 1000.0), (b"b", 1000.0)], 0.0, 0.0)
    hm.max_keys = 0  # hot_keys_max = 0, live
    assert hm.evaluate([(b"a", 1000.0), (b"b", 1000.0)], 0.0, 0.0) == (0, 2)
    assert hm.marked == set()
    assert sorted(decoded(hm.take())[4]) == [b"a", b"b"]


def test_as_marked_keys_move_to_the_clients_the_next_hottest_qualify() -> None:
    # Rule 1's cascade: the rates include what clients answered themselves (credited hits), the
    # served rate does not; as the hottest keys are served by clients the shard's own load
    # falls, the threshold with it, and cooler keys qualify.
    hm = marks(share=0.1, min_rate=10.0)
    rates = [(b"a", 5000.0), (b"b", 900.0), (b"c", 300.0), (b"d", 50.0), (b"e", 5.0)]
    hm.evaluate(rates, 20_000.0, 0.0)  # threshold 2000/s
    assert hm.marked == {b"a"}
    hm.evaluate(rates, 10_000.0, 0.0)  # a's reads are answered by the clients now: threshold 1000
    assert hm.marked == {b"a"}
    hm.evaluate(rates, 8_000.0, 0.0)  # and some of b's: threshold 800
    assert hm.marked == {b"a", b"b"}
    hm.evaluate(rates, 2_500.0, 0.0)  # threshold 250
    assert hm.marked == {b"a", b"b", b"c"}
    hm.evaluate(rates, 100.0, 0.0)  # the floor (10/s) now: d qualifies, e never does
    assert hm.marked == {b"a", b"b", b"c", b"d"}
    assert hm.take() is None  # nothing was unmarked on the way


# --- Rules 2-4: the messages -------------------------------------------------------------------


def test_touched_queues_only_marked_keys_and_take_numbers_each_message() -> None:
    hm = marks(min_rate=1.0)
    hm.evaluate([(b"hot", 5.0), (b"warm", 5.0)], 0.0, 0.0)
    hm.touched(b"cold")
    assert hm.take() is None and hm.seq == 0  # nothing owed: no message, no number used
    hm.touched(b"hot")
    assert decoded(hm.take()) == (3, INC, 1, p.INVALIDATE_KEYS, [b"hot"])
    assert hm.take() is None
    hm.touched(b"warm")
    hm.touched(b"cold")
    hm.touched(b"hot")
    assert decoded(hm.take()) == (3, INC, 2, p.INVALIDATE_KEYS, [b"warm", b"hot"])
    assert hm.stats() == {"marked": 2, "messages": 2, "keys_invalidated": 3, "resets": 0, "seq": 2}


def test_a_key_touched_many_times_is_named_once_in_order_of_first_touch() -> None:
    hm = marks(min_rate=1.0)
    hm.evaluate([(b"a", 5.0), (b"b", 5.0), (b"c", 5.0)], 0.0, 0.0)
    for key in (b"b", b"a", b"b", b"b", b"c", b"a"):
        hm.touched(key)
    assert decoded(hm.take())[2:] == (1, p.INVALIDATE_KEYS, [b"b", b"a", b"c"])
    assert hm.keys_invalidated == 3


def test_reset_unmarks_everything_and_owes_one_all_message_that_covers_the_queue() -> None:
    hm = marks(min_rate=1.0)
    hm.evaluate([(b"a", 5.0), (b"b", 5.0)], 0.0, 0.0)
    hm.touched(b"a")
    hm.reset()
    assert hm.marked == set()
    hm.touched(b"b")  # no longer marked: nothing more to say
    assert decoded(hm.take()) == (3, INC, 1, p.INVALIDATE_ALL, [])
    assert hm.take() is None
    hm.reset()
    hm.reset()  # two resets before a take: one message
    assert decoded(hm.take())[2:4] == (2, p.INVALIDATE_ALL)
    assert hm.take() is None
    assert hm.stats() == {"marked": 0, "messages": 2, "keys_invalidated": 0, "resets": 2, "seq": 2}


def test_a_heartbeat_repeats_the_last_number_without_advancing_it() -> None:
    hm = marks(min_rate=1.0)
    assert decoded(hm.heartbeat()) == (3, INC, 0, p.HEARTBEAT, [])
    hm.evaluate([(b"a", 5.0)], 0.0, 0.0)
    hm.touched(b"a")
    assert decoded(hm.heartbeat())[2] == 0  # owed but not taken: not yet numbered
    assert decoded(hm.take())[2] == 1
    for _ in range(3):
        assert decoded(hm.heartbeat()) == (3, INC, 1, p.HEARTBEAT, [])
    hm.reset()
    assert decoded(hm.take())[2] == 2
    assert decoded(hm.heartbeat())[2] == 2
    assert hm.seq == 2 and hm.messages == 2


def test_every_feed_has_its_own_incarnation() -> None:
    seen = {hot_marks.new_incarnation() for _ in range(100)} | {HotMarks(0, 0.01, 1, 1, 1).incarnation}
    assert len(seen) == 101
    assert all(0 < inc < 1 << 63 for inc in seen)  # msgpack int64 and never 0 (a client's "none")


@pytest.mark.parametrize(("marked", "ttl_ms", "lease"), [
    (False, -1, 0),      # not hot: do not keep it
    (True, -1, 1000),    # no TTL: the lease
    (True, 250, 250),    # cut to the TTL left
    (True, 5000, 1000),
])
def test_the_lease_is_for_marked_keys_and_never_outlives_the_key(marked: bool, ttl_ms: int, lease: int) -> None:
    hm = marks(min_rate=1.0)
    if marked:
        hm.evaluate([(b"k", 5.0)], 0.0, 0.0)
    assert hm.lease(b"k", ttl_ms) == lease


# --- a real Shard over a real Store, with a fake clock ---------------------------------------------


class World:
    """One shard of two, its store's clock (ms) and its own (s) both under test control."""

    def __init__(self, **config: Any) -> None:
        self.clock = FakeClock(1_000_000)
        self.config = build_config({"shards": 2, "runtime_dir": "/nonexistent", "hot_key_min_rate": 10.0,
                                    "hot_key_share": 0.001, **config})
        self.store = Store(self.clock)
        self.shard = Shard(self.store, self.config, 0, None, clock=lambda: self.clock.now / 1000)
        self.rid = 0

    @property
    def near(self) -> HotMarks:
        assert self.shard.near is not None
        return self.shard.near

    def run(self, op: p.Op) -> p.Reply:
        self.rid += 1
        return p.decode_reply(self.shard.apply(p.encode_request(self.rid, op)))

    def ok(self, op: p.Op) -> Any:
        reply = self.run(op)
        assert reply.status == p.OK, reply
        return reply.value

    def advance(self, seconds: float) -> None:
        self.clock.now += int(seconds * 1000)

    def mark(self, *keys: bytes) -> None:
        """Make ``keys`` hot the way a worker does: reads (20/s > the 10/s floor), then the re-marking."""
        for key in keys:
            for _ in range(20):
                self.ok(p.Get(key))
        self.advance(MARK_EVERY_S)
        self.shard.tick()
        assert set(keys) <= self.near.marked, self.near.marked

    def message(self) -> tuple[int, int, int, int, list[bytes]] | None:
        frame = self.near.take()
        return None if frame is None else decoded(frame)


def test_marking_happens_once_a_second_from_the_shards_own_counts() -> None:
    w = World()
    for _ in range(50):
        w.ok(p.Get(b"k"))
    w.shard.tick()
    assert w.near.marked == set()  # not a second yet since the worker started
    w.advance(MARK_EVERY_S)
    w.shard.tick()
    assert w.near.marked == {b"k"}
    assert w.ok(p.Stats())["near"] == {"marked": 1, "messages": 0, "keys_invalidated": 0, "resets": 0, "seq": 0}


def test_near_get_answers_value_lease_shard_incarnation_and_seq() -> None:
    w = World(near_cache_lease_ms=700)
    w.ok(p.Set(b"cold", b"c"))
    w.ok(p.Set(b"hot", b"h"))
    w.ok(p.Set(b"ttl", b"t", 1500))
    w.mark(b"hot", b"ttl", b"gone")
    inc = w.near.incarnation
    assert w.ok(p.NearGet(b"cold")) == [b"c", 0, 0, inc, 0]
    assert w.ok(p.NearGet(b"hot")) == [b"h", 700, 0, inc, 0]
    assert w.ok(p.NearGet(b"gone")) == [None, 0, 0, inc, 0]  # nothing to keep
    assert w.store.ttl(b"ttl") == 500  # marking took a second of its 1500 ms
    assert w.ok(p.NearGet(b"ttl")) == [b"t", 500, 0, inc, 0]  # the lease cut to the TTL left
    w.ok(p.Set(b"hot", b"h2"))
    assert w.message()[2] == 1
    assert w.ok(p.NearGet(b"hot")) == [b"h2", 700, 0, inc, 1]  # the seq as it is at the read


def test_without_near_caches_near_get_is_a_get_that_never_grants_a_lease() -> None:
    w = World(near_cache=False)
    assert w.shard.near is None and w.store.vanishing is None
    w.ok(p.Set(b"k", b"v"))
    for _ in range(50):
        w.ok(p.NearGet(b"k"))
    w.advance(MARK_EVERY_S)
    w.shard.tick()
    assert w.ok(p.NearGet(b"k")) == [b"v", -1, 0, 0, 0]  # -1: this daemon has none, the client stops asking
    assert "near" not in w.ok(p.Stats())


def test_in_cluster_mode_there_are_no_near_caches() -> None:
    w = World(cluster_etcd=["http://127.0.0.1:2379"], bind="tcp://127.0.0.1:7400")
    assert w.shard.near is None


KEYED_WRITES = sorted((cls for cls, spec in p.OPS.items() if spec.kind == p.KEYED and spec.write),
                      key=lambda cls: cls.__name__)


@pytest.mark.parametrize("cls", KEYED_WRITES, ids=lambda cls: cls.__name__)
def test_every_keyed_write_to_a_marked_key_is_published_before_its_reply_is(cls: type) -> None:
    w = World()
    w.ok(p.Set(b"k", b"1"))
    w.ok(p.Set(b"other", b"1"))
    w.mark(b"k", b"other")
    w.run(SAMPLES[cls])  # on b"k"; its outcome (even an error such as NotInteger) does not matter
    assert w.message() == (0, w.near.incarnation, 1, p.INVALIDATE_KEYS, [b"k"])


def test_a_keyed_write_to_an_unmarked_key_owes_nothing() -> None:
    w = World()
    w.mark(b"hot")
    w.ok(p.Set(b"cold", b"1"))
    w.ok(p.Delete(b"cold2"))
    assert w.message() is None


@pytest.mark.parametrize("op", [
    p.Get(b"k"), p.Gets(b"k"), p.Exists(b"k"), p.Ttl(b"k"), p.Strlen(b"k"), p.NearGet(b"k", 7),
    p.GetMany([b"k", b"x"]), p.Scan(0),
], ids=lambda op: type(op).__name__)
def test_reads_owe_nothing(op: p.Op) -> None:
    w = World()
    w.ok(p.Set(b"k", b"1"))
    w.mark(b"k")
    w.ok(op)
    assert w.message() is None


@pytest.mark.parametrize("op", [
    p.SetMany([(b"a", b"1"), (b"hot1", b"2"), (b"b", b"3"), (b"hot2", b"4")]),
    p.DeleteMany([b"a", b"hot1", b"b", b"hot2", b"hot1"]),
    p.SetManyNx([(b"hot1", b"2"), (b"a", b"1"), (b"hot2", b"4")]),
], ids=lambda op: type(op).__name__)
def test_multi_key_writes_name_their_marked_keys_once(op: p.Op) -> None:
    w = World()
    w.mark(b"hot1", b"hot2")
    w.ok(op)
    assert w.message()[2:] == (1, p.INVALIDATE_KEYS, [b"hot1", b"hot2"])


def test_ops_of_one_batch_share_one_message() -> None:
    w = World()
    w.mark(b"a", b"b")
    frames = [p.encode_request(i, op) for i, op in enumerate([p.Set(b"a", b"1"), p.Get(b"a"), p.Incr(b"b"),
                                                                 p.Delete(b"a")], 1)]
    reply = p.decode_batch_reply(w.shard.apply_batch(p.encode_batch(9, frames)))
    assert [p.decode_reply(bytes(r)).status for r in reply.replies] == [p.OK] * 4
    assert w.message()[2:] == (1, p.INVALIDATE_KEYS, [b"a", b"b"])
    assert w.message() is None


def test_flush_owes_an_all_message_and_unmarks_everything() -> None:
    w = World()
    w.ok(p.Set(b"k", b"1"))
    w.mark(b"k")
    w.ok(p.Set(b"k", b"2"))
    w.ok(p.Flush())
    assert w.message()[2:] == (1, p.INVALIDATE_ALL, [])  # the queued KEYS is covered by it
    assert w.near.marked == set()
    w.ok(p.Set(b"k", b"3"))
    assert w.ok(p.NearGet(b"k"))[1] == 0
    assert w.ok(p.Stats())["near"]["resets"] == 1


def test_a_resize_owes_an_all_message_and_nothing_is_cacheable_until_it_ends() -> None:
    w = World()
    w.ok(p.Set(b"k", b"1"))
    w.mark(b"k")
    assert w.ok(p.NearGet(b"k"))[1] > 0
    w.ok(p.Migrate(2, 3, 2))
    assert w.message()[2:] == (1, p.INVALIDATE_ALL, [])
    for _ in range(3):  # however hot it is meanwhile, it is neither marked nor leased
        for _ in range(50):
            assert w.ok(p.NearGet(b"k"))[1] == 0
        w.advance(MARK_EVERY_S)
        w.shard.tick()
        assert w.near.marked == set()
    assert w.message() is None


def test_a_marked_key_that_expires_is_published_by_active_expiry() -> None:
    w = World()
    for key in (b"a", b"b", b"cold"):
        w.ok(p.Set(key, b"1", 10_000))
    w.mark(b"a", b"b")
    w.advance(10.0)
    assert w.store.active_expire(1000) == 3
    msg = w.message()
    assert msg[2:4] == (1, p.INVALIDATE_KEYS) and sorted(msg[4]) == [b"a", b"b"]  # (in the sampler's order)


def test_a_read_that_finds_a_marked_key_expired_owes_nothing_as_every_lease_ended_with_the_ttl() -> None:
    w = World(near_cache_lease_ms=5000)
    w.ok(p.Set(b"k", b"1", 3000))
    w.mark(b"k")
    assert w.ok(p.NearGet(b"k"))[1] == 2000  # a copy given out now is kept until the key expires at most
    w.advance(2.0)
    assert w.ok(p.NearGet(b"k")) == [None, 0, 0, w.near.incarnation, 0]
    assert w.message() is None


def test_a_marked_key_that_is_evicted_is_published() -> None:
    w = World()
    w.ok(p.Set(b"hot", b"x" * 100))
    w.mark(b"hot")
    w.store.configure(w.store.used_bytes + 50, "allkeys-random")  # room for about one such entry
    w.ok(p.Set(b"filler", b"y" * 100))  # not a write to the hot key: its eviction is what is published
    assert w.store.get(b"hot") is None and w.store.evictions == {"allkeys-random": 1}
    assert w.message()[2:] == (1, p.INVALIDATE_KEYS, [b"hot"])


def test_hits_a_client_answered_itself_count_as_accesses() -> None:
    w = World(hot_key_min_rate=100.0)
    w.ok(p.Set(b"k", b"1"))
    w.ok(p.NearGet(b"k", 500))  # one read on the wire, 500 answered by a near cache
    rows = {key: count for key, _, count, _ in w.shard.hot.top(10, w.clock.now / 1000)[1]}
    assert rows[b"k"] == 502  # the set, the read, and the 500
    w.advance(MARK_EVERY_S)
    w.shard.tick()
    assert w.near.marked == {b"k"}  # ~500/s, though the shard itself saw one read


# --- the worker's loops: invalidations go out before the replies (Rule 2) ---------------------


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []


class FakeInbox:
    def __init__(self, log: Log, frames: list[bytes], peer: bytes) -> None:
        self.log, self.frames, self.peer = log, frames, peer

    def receive(self, limit: int) -> list[tuple[bytes, bytes, int, None]]:
        frames, self.frames = self.frames, []
        return [(self.peer, frame, 0, None) for frame in frames]

    def send(self, peer: bytes, frame: bytes) -> None:
        self.log.events.append(("reply", frame))


class FakeFeed:
    def __init__(self, log: Log) -> None:
        self.log = log

    def send(self, frame: bytes) -> None:
        self.log.events.append(("publish", decoded(frame)))

    def subscriptions(self) -> int:
        return 0


class FakeHub:
    """Calls every watched inbox's handler once per poll."""

    def __init__(self) -> None:
        self.handlers: list[Callable[[], None]] = []

    def watch(self, source: Any, handler: Callable[[], None], on_event: Any = None) -> None:
        if isinstance(source, FakeInbox):
            self.handlers.append(handler)

    def watch_fd(self, fd: int, handler: Callable[[], None]) -> None:
        pass

    def poll(self, timeout_ms: int) -> None:
        for handler in self.handlers:
            handler()


def run_serve(w: World, router: list[bytes], direct: list[bytes]) -> list[tuple[str, Any]]:
    log = Log()
    hub = FakeHub()
    inbox = FakeInbox(log, router, b"router")
    direct_inbox = FakeInbox(log, direct, b"client")
    feed = FakeFeed(log)
    polls = iter([False, True])
    worker._serve(hub, inbox, w.shard, -1, lambda: next(polls), direct_inbox, feed)  # type: ignore[arg-type]
    return [event for event in log.events if not (event[0] == "publish" and event[1][3] == p.HEARTBEAT)]


def test_the_worker_publishes_a_batchs_invalidations_before_its_reply() -> None:
    w = World()
    w.mark(b"a", b"b")
    batch = p.encode_batch(1, [p.encode_request(1, p.Set(b"a", b"2")), p.encode_request(2, p.Get(b"b")),
                               p.encode_request(3, p.Delete(b"b"))])
    events = run_serve(w, [batch], [])
    assert [kind for kind, _ in events] == ["publish", "reply"]
    assert events[0][1][2:] == (1, p.INVALIDATE_KEYS, [b"a", b"b"])


def test_the_worker_publishes_a_direct_writes_invalidation_before_its_reply() -> None:
    w = World()
    keys = [key for key in (b"k%d" % i for i in range(100)) if shard_for(key, 2) == 0][:2]
    w.mark(*keys)
    direct = [p.encode_request(1, p.Get(keys[0])), p.encode_request(2, p.Set(keys[0], b"v")),
              p.encode_request(3, p.Incr(keys[1]))]
    events = run_serve(w, [], direct)
    assert [kind for kind, _ in events] == ["reply", "publish", "reply", "publish", "reply"]
    assert [e[1][2:] for e in events if e[0] == "publish"] == [(1, p.INVALIDATE_KEYS, [keys[0]]),
                                                              (2, p.INVALIDATE_KEYS, [keys[1]])]
    assert [p.decode_reply(e[1]).status for e in events if e[0] == "reply"] == [p.OK] * 3


def test_the_worker_heartbeats_with_the_current_number() -> None:
    w = World()
    w.mark(b"a")
    w.ok(p.Set(b"a", b"1"))  # owed, not yet published: the loop publishes it before the heartbeat
    log = Log()
    polls = iter([False, True])
    worker._serve(FakeHub(), FakeInbox(log, [], b"r"), w.shard, -1, lambda: next(polls), None,  # type: ignore[arg-type]
                  FakeFeed(log))
    assert [e[1][2:4] for e in log.events] == [(1, p.INVALIDATE_KEYS), (1, p.HEARTBEAT)]
