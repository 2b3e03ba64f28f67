"""The Router as a unit: fake inboxes and channels, the real worker op code (``Shard``) behind them.

Nothing here opens a socket: a channel's ``send`` hands the batch to an in-process Shard when the
test says so (``pump``), so each test decides exactly what is in flight when.
"""

from __future__ import annotations

import time
from typing import Any

from shardd import protocol as p
from shardd.config import Config
from shardd.hashing import shard_for
from shardd.router import Router
from shardd.shard_link import ShardLink
from shardd.store import Store
from shardd.worker import Shard


class FakeChannel:
    """A shard channel: batches are kept until ``serve`` applies them on the worker."""

    def __init__(self, worker: Shard) -> None:
        self.worker = worker
        self.connected = True
        self.sent: list[bytes] = []
        self.replies: list[bytes] = []

    def send(self, frame: bytes) -> bool:
        if self.connected:
            self.sent.append(frame)
        return self.connected

    def serve(self) -> int:
        batches, self.sent = self.sent, []
        self.replies += [self.worker.apply_batch(frame) for frame in batches]
        return len(batches)

    def receive(self):
        replies, self.replies = self.replies, []
        yield from replies


class FakeInbox:
    def __init__(self) -> None:
        self.incoming: list[tuple[bytes, bytes, int, bool]] = []
        self.replies: list[tuple[bytes, p.Reply]] = []

    def receive(self, limit: int):
        taken, self.incoming = self.incoming[:limit], self.incoming[limit:]
        yield from taken

    def send(self, peer: bytes, frame: bytes) -> bool:
        self.replies.append((peer, p.decode_reply(frame)))
        return True


class Daemon:
    """A router over ``shards`` fake channels to real Shards, all up."""

    def __init__(self, tmp_path, shards: int = 2, **settings: Any) -> None:
        self.config = Config(shards=shards, runtime_dir=str(tmp_path), **settings)
        self.channels: list[FakeChannel] = []
        self.frontend, self.control = FakeInbox(), FakeInbox()
        self.notified = 0
        self.removed: list[int] = []
        self.router = Router(self.config, self.frontend, [], self.control, self.connect)
        self.router.links = [ShardLink(i, self.connect(i)) for i in range(shards)]
        self.router.n = shards
        self.router.notify_supervisor = self.notify  # type: ignore[method-assign]
        self.router.on_removed_link = lambda link: self.removed.append(link.shard)  # type: ignore[method-assign]
        for link in self.router.links:
            self.router.on_shard_event(link, "up")
        self.pump()

    def notify(self) -> None:
        self.notified += 1

    def connect(self, shard: int) -> FakeChannel:
        worker = Shard(Store(lambda: int(time.monotonic() * 1000)), self.config, shard, None)
        worker.direct_endpoint = f"tcp://127.0.0.1:{9000 + shard}"
        self.channels.append(FakeChannel(worker))
        return self.channels[-1]

    def send(self, *ops: p.Op, peer: bytes = b"c1", first_id: int = 1, control: bool = False) -> None:
        inbox = self.control if control else self.frontend
        inbox.incoming += [(peer, p.encode_request(first_id + i, op), 0, False) for i, op in enumerate(ops)]
        (self.router.on_control if control else self.router.on_frontend)()

    def pump(self, rounds: int = 1000) -> None:
        """Let every worker answer until nothing is in flight (or ``rounds`` passes)."""
        for _ in range(rounds):
            if not any(channel.serve() for channel in self.channels):
                return
            for link in [*self.router.links, *self.router.retiring]:
                self.router.on_shard(link)

    def answers(self, control: bool = False) -> dict[int, p.Reply]:
        inbox = self.control if control else self.frontend
        replies, inbox.replies = inbox.replies, []
        return {reply.id: reply for _, reply in replies}

    def call(self, op: p.Op, control: bool = False) -> p.Reply:
        self.send(op, control=control)
        self.pump()
        (reply,) = self.answers(control).values()
        return reply


def test_a_keyed_op_reaches_its_owner_and_the_reply_comes_back(tmp_path) -> None:
    d = Daemon(tmp_path)
    assert [link.direct for link in d.router.links] == ["tcp://127.0.0.1:9000", "tcp://127.0.0.1:9001"]
    assert d.call(p.Set(b"k", b"v")).status == p.OK
    owner = shard_for(b"k", 2)
    assert d.channels[owner].worker.store.get(b"k") == b"v"
    assert not d.channels[1 - owner].worker.store.exists(b"k")
    assert d.call(p.Get(b"k")).value == b"v"


def test_one_pass_over_the_inbox_is_one_batch_per_shard(tmp_path) -> None:
    d = Daemon(tmp_path)
    d.send(*[p.Get(b"k%d" % i) for i in range(50)])
    assert [len(channel.sent) for channel in d.channels] == [1, 1]
    assert sum(link.inflight for link in d.router.links) == 50
    d.pump()
    assert len(d.answers()) == 50
    assert all(link.inflight == 0 for link in d.router.links) and d.router.peer_inflight == {}


def test_busy_past_the_mailbox_limit_and_the_count_stays_exact(tmp_path) -> None:
    d = Daemon(tmp_path, mailbox_limit=8)
    key = b"k"
    link = d.router.links[shard_for(key, 2)]
    # Ten clients with one request each: none is heavy, so the whole mailbox fills.
    for i in range(10):
        d.send(p.Get(key), peer=b"c%d" % i, first_id=i + 1)
    statuses = [reply.status for reply in d.answers().values()]
    assert statuses == [p.BUSY, p.BUSY] and link.inflight == 8 and link.busy == 2
    d.pump()
    assert [r.status for r in d.answers().values()] == [p.OK] * 8
    assert link.inflight == 0 and d.router.peer_inflight == {}


def test_a_flooding_client_leaves_the_last_eighth_to_others(tmp_path) -> None:
    d = Daemon(tmp_path, mailbox_limit=16)
    link = d.router.links[shard_for(b"k", 2)]
    d.send(*[p.Get(b"k")] * 16, peer=b"flood")
    assert link.inflight == 14  # past its fair share (2) the flooder may fill 16 - 16/8
    assert {r.status for r in d.answers().values()} == {p.BUSY}
    d.send(p.Get(b"k"), peer=b"light", first_id=100)
    assert link.inflight == 15 and d.answers() == {}


def test_a_multi_key_op_is_split_gathered_and_never_half_applied(tmp_path) -> None:
    d = Daemon(tmp_path, mailbox_limit=4)
    items = [(b"m%d" % i, b"%d" % i) for i in range(20)]
    assert d.call(p.SetMany(items)).value == 20
    assert d.call(p.GetMany([k for k, _ in items] + [b"absent"])).value == [v for _, v in items] + [None]
    # Fill one shard's mailbox: a set_many touching both shards is BUSY and the other gets nothing.
    d.send(*[p.Get(b"x")] * 4, peer=b"other")
    other = d.router.links[1 - shard_for(b"x", 2)]
    d.send(p.SetMany([(b"n%d" % i, b"v") for i in range(20)]), first_id=50)
    assert d.answers()[50].status == p.BUSY and other.inflight == 0
    d.pump()
    d.answers()
    assert d.call(p.GetMany([])).value == []


def test_a_shard_going_down_answers_unavailable_for_what_was_in_flight_only(tmp_path) -> None:
    d = Daemon(tmp_path)
    down = d.router.links[shard_for(b"a", 2)]
    up_key = next(b"b%d" % i for i in range(100) if shard_for(b"b%d" % i, 2) != down.shard)
    d.send(p.Get(b"a"), p.Get(up_key))
    d.channels[down.shard].sent.clear()  # the worker died with the batch
    d.router.on_shard_event(down, "down")
    d.pump()
    answers = d.answers()
    assert answers[1].status == p.UNAVAILABLE and answers[2].status == p.OK
    assert down.inflight == 0 and down.direct is None
    assert d.call(p.Get(b"a")).status == p.UNAVAILABLE  # refused at once while down
    health = d.call(p.Health(500)).value
    assert health["ok"] is False and health["shards"][down.shard]["status"] == "down"
    # A send that fails (no live connection yet) is UNAVAILABLE too, and counted back.
    d.channels[down.shard].connected = False
    down.up = True
    assert d.call(p.Get(b"a")).status == p.UNAVAILABLE and down.inflight == 0


def test_a_reply_to_a_batch_already_failed_is_dropped(tmp_path) -> None:
    d = Daemon(tmp_path)
    link = d.router.links[shard_for(b"a", 2)]
    d.send(p.Set(b"a", b"1"))
    d.channels[link.shard].serve()  # the worker answers, but the router sees the disconnect first
    d.router.on_shard_event(link, "down")
    d.router.on_shard_event(link, "up")
    d.pump()
    assert [r.status for r in d.answers().values()] == [p.UNAVAILABLE]
    assert link.inflight == 0


def test_stats_answer_without_a_stuck_shard_after_the_deadline(tmp_path) -> None:
    d = Daemon(tmp_path)
    d.send(p.Stats())
    d.channels[0].serve()
    d.router.on_shard(d.router.links[0])
    assert d.answers() == {}  # shard 1 has not answered yet
    d.router.expire_gathers(time.monotonic() + 1)
    stats = d.answers()[1].value
    assert stats["missing"] == [{"shard": 1, "status": "timeout"}]
    assert [row["status"] for row in stats["shards"]] == ["up", "timeout"]
    d.pump()  # the late part changes nothing
    assert d.answers() == {} and d.router.timed == []


def _resize(d: Daemon, shards: int) -> dict[str, Any]:
    d.send(p.Resize(shards))
    assert d.notified == 1 and d.router.topology()["pending_resize"] == shards
    assert d.call(p.ResizeStart(shards), control=True).value is True
    for link in d.router.links:
        d.router.on_shard_event(link, "up")
    d.router.advance_resize()
    d.pump()
    (reply,) = d.answers().values()
    assert reply.status == p.OK, reply.value
    return reply.value


def test_growing_moves_keys_and_every_key_stays_readable(tmp_path) -> None:
    d = Daemon(tmp_path)
    items = [(b"g%d" % i, b"%d" % i) for i in range(200)]
    d.call(p.SetMany(items))
    result = _resize(d, 3)
    moved = sum(1 for k, _ in items if shard_for(k, 3) != shard_for(k, 2))
    assert (result["from"], result["to"], result["moved"], result["total"], result["epoch"]) == (2, 3, moved, 200, 2)
    topology = d.router.topology()
    assert (topology["shards"], topology["epoch"], topology["resizing"]) == (3, 2, None)
    assert d.call(p.GetMany([k for k, _ in items])).value == [v for _, v in items]
    for key, _ in items:
        assert d.channels[shard_for(key, 3)].worker.store.exists(key)
    assert d.notified == 2  # the resize is over: the supervisor is told


def test_shrinking_retires_the_removed_link_once_idle(tmp_path) -> None:
    d = Daemon(tmp_path, shards=3)
    items = [(b"s%d" % i, b"%d" % i) for i in range(100)]
    d.call(p.SetMany(items))
    result = _resize(d, 2)
    assert result["to"] == 2 and len(d.router.links) == 2
    assert d.removed == [2] and d.router.retiring == [] and d.notified == 2
    assert d.call(p.GetMany([k for k, _ in items])).value == [v for _, v in items]


def test_moved_replies_are_rerouted_to_the_new_owner_during_a_resize(tmp_path) -> None:
    d = Daemon(tmp_path)
    key = next(b"r%d" % i for i in range(1000) if shard_for(b"r%d" % i, 3) == 2)
    old = shard_for(key, 2)
    d.call(p.Set(key, b"before"))
    d.send(p.Resize(3))
    d.call(p.ResizeStart(3), control=True)
    d.router.on_shard_event(d.router.links[2], "up")
    d.pump(rounds=1)  # describe answered; migrate sent to every shard
    d.router.advance_resize()
    d.pump(rounds=3)  # migrate, then a first migrate_out: the key is taken from its old owner
    assert not d.channels[old].worker.store.exists(key)
    assert d.router.resize is not None and d.router.n == 2  # still routing by the old placement
    assert d.router.migration is d.router.resize
    d.send(p.Set(key, b"after"), first_id=40)  # to the old owner, which answers MOVED
    d.pump()
    answers = d.answers()
    assert answers[40].status == p.OK and d.router.n == 3
    assert d.call(p.Get(key)).value == b"after"


def test_a_resize_is_refused_while_one_runs_or_a_shard_is_down(tmp_path) -> None:
    d = Daemon(tmp_path)
    assert d.call(p.Resize(2)).value["moved"] == 0  # the same count: nothing to do
    d.send(p.Resize(3))
    assert d.call(p.Resize(4)).status == p.BUSY
    assert d.call(p.ResizeStart(5), control=True).status == p.BAD_REQUEST
    d2 = Daemon(tmp_path / "b")
    d2.router.on_shard_event(d2.router.links[0], "down")
    assert d2.call(p.Resize(3)).status == p.UNAVAILABLE


def test_set_many_nx_goes_whole_to_the_one_shard_of_its_keys(tmp_path) -> None:
    d = Daemon(tmp_path)
    zero, one = [k for k in (b"x", b"y", b"n1") if shard_for(k, 2) == 0], b"n1"
    assert shard_for(one, 2) == 1 and len(zero) == 2
    items = [(zero[0], b"1"), (zero[1], b"2")]
    assert d.call(p.SetManyNx(items)).value is True
    assert d.channels[0].worker.store.get_many(zero) == [b"1", b"2"]
    assert d.call(p.SetManyNx([(zero[1], b"x")])).value is False  # live: nothing stored
    assert d.channels[0].worker.store.get(zero[1]) == b"2"
    reply = d.call(p.SetManyNx([(zero[0], b"1"), (one, b"2")]))
    assert reply.status == p.BAD_REQUEST and "shards 0, 1" in reply.value and "one shard" in reply.value
    assert not d.channels[1].worker.store.exists(one)  # nothing sent anywhere
    assert all(link.inflight == 0 for link in d.router.links)


def test_scan_walks_each_named_shard_and_refuses_a_shard_that_is_not_there(tmp_path) -> None:
    d = Daemon(tmp_path)
    keys = {b"scan:%d" % i for i in range(200)}
    assert d.call(p.SetMany([(k, b"v") for k in keys])).status == p.OK
    seen: list[bytes] = []
    for shard in range(2):
        cursor = 0
        while True:
            cursor, found = d.call(p.Scan(shard, cursor, 17, b"scan:*")).value
            assert all(shard_for(k, 2) == shard for k in found)
            seen += found
            if not cursor:
                break
    assert sorted(seen) == sorted(keys)
    reply = d.call(p.Scan(2))
    assert reply.status == p.BAD_REQUEST and "no shard 2; there are 2" in reply.value
