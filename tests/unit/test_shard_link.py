"""ShardLink: one shard's mailbox and sequence accounting, with a fake channel."""

from __future__ import annotations

from shardd import protocol as p
from shardd.shard_link import ShardLink


class FakeChannel:
    """Records what is sent; ``connected`` False makes sends fail as with no worker."""

    def __init__(self) -> None:
        self.connected = True
        self.sent: list[bytes] = []

    def send(self, frame: bytes) -> bool:
        if self.connected:
            self.sent.append(frame)
        return self.connected


def _link(up: bool = True) -> tuple[ShardLink, FakeChannel]:
    channel = FakeChannel()
    link = ShardLink(3, channel)
    link.up = up
    return link, channel


def test_queued_ops_go_out_as_one_batch_with_a_new_seq_each_flush() -> None:
    link, channel = _link()
    ops = [p.encode_request(i, p.Get(b"k%d" % i)) for i in range(4)]
    for i in range(3):
        link.queue(ops[i], f"target{i}")
    assert link.inflight == 3
    assert link.flush() is None
    link.queue(ops[3], "target3")
    assert link.flush() is None
    batches = [p.decode_batch(frame) for frame in channel.sent]
    assert [(b.seq, [bytes(op) for op in b.ops]) for b in batches] == [(1, ops[:3]), (2, ops[3:])]
    assert sorted(link.pending) == [1, 2] and link.inflight == 4 == link.high
    assert link.flush() is None and len(channel.sent) == 2  # nothing queued: nothing sent


def test_a_reply_takes_its_batch_once_and_an_unknown_seq_is_dropped() -> None:
    link, _ = _link()
    link.queue(b"a", "ta")
    link.queue(b"b", "tb")
    link.flush()
    assert link.take(99) is None and link.inflight == 2
    assert link.take(1) == (["ta", "tb"], [b"a", b"b"])
    assert link.take(1) is None
    assert link.inflight == 0 and link.idle()


def test_a_send_with_no_worker_hands_the_ops_back_uncounted() -> None:
    link, channel = _link()
    channel.connected = False
    link.queue(b"a", "ta")
    assert link.flush() == (["ta"], [b"a"])
    assert link.inflight == 0 and not link.pending and link.idle()


def test_going_down_hands_back_every_pending_batch_and_forgets_the_endpoint() -> None:
    link, _ = _link()
    link.direct = "tcp://127.0.0.1:1"
    for frame in (b"a", b"b"):
        link.queue(frame, frame.decode())
        link.flush()
    assert link.go_down() == [(["a"], [b"a"]), (["b"], [b"b"])]
    assert (link.up, link.direct, link.inflight, link.pending) == (False, None, 0, {})
    assert link.high == 2  # the high-water mark survives


def test_refusals_down_full_and_the_last_eighth_kept_for_light_clients() -> None:
    link, _ = _link(up=False)
    assert link.refusal(16, heavy=False)[0] == p.UNAVAILABLE
    link.up = True
    for _ in range(14):
        link.queue(b"x", None)
    assert link.refusal(16, heavy=False) is None
    status, message = link.refusal(16, heavy=True)  # 14 >= 16 - 16/8
    assert status == p.BUSY and "7/8" in message
    link.queue(b"x", None)
    link.queue(b"x", None)
    assert link.refusal(16, heavy=False)[0] == p.BUSY
    assert link.busy == 2
