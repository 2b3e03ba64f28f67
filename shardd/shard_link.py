"""The router's view of one shard: its channel, health, mailbox and what is in flight to it.

``ShardLink`` is the one place where a shard's mailbox and sequence accounting is written;
the router asks it, never edits the counters itself. The channel is the transport's
``ShardChannel`` (or, in unit tests, any object with ``send(frame) -> bool``).

Invariants
----------
Rule 1: ``inflight`` is exact: +1 for each op queued (``queue``), -1 for each reply taken
        (``take``) and for each op handed back as failed (``flush`` with no live connection,
        ``go_down``). Each failed op is handed back exactly once, for the router to answer.
Rule 2: every Batch sent carries a new seq; ``pending`` holds the batches sent and not yet
        answered, by seq. A reply whose seq is not pending (from before a restart, or for a
        batch already failed) is recognised and dropped.
Rule 3: the frames of a pending batch are kept (not copied), so an op failed because its
        shard went down can be answered with its own request id.
"""

from __future__ import annotations

from typing import Any

from shardd import protocol as p

# (targets, frames) of one batch: a target is a client peer, (gather, context) or a step.
Batch = tuple[list[Any], list[bytes]]


class ShardLink:
    """One shard's channel, mailbox and sequence accounting (Rules 1-3)."""

    __slots__ = (
        "busy",
        "channel",
        "direct",
        "high",
        "inflight",
        "invalidations",
        "moved_until",
        "next_seq",
        "out_frames",
        "out_targets",
        "pending",
        "shard",
        "up",
    )

    def __init__(self, shard: int, channel: Any) -> None:
        self.shard = shard
        self.channel = channel
        self.up = False
        self.inflight = 0
        self.high = 0       # the most ever in flight
        self.busy = 0       # ops refused BUSY
        self.next_seq = 1
        self.pending: dict[int, Batch] = {}
        self.out_frames: list[bytes] = []   # queued, sent as one Batch by ``flush``
        self.out_targets: list[Any] = []
        # Replies to batches with a seq below this may carry MOVED (a resize is or was running).
        self.moved_until: float = 0
        self.direct: str | None = None  # the worker's own endpoint, for direct-mode clients
        self.invalidations: str | None = None  # its invalidation feed, for near-cache clients (hot_marks)

    def refusal(self, limit: int, heavy: bool) -> tuple[int, str] | None:
        """Why an op may not be queued now (UNAVAILABLE, BUSY), or None. ``heavy``: the sender is
        past its fair share and may fill only 7/8 of the mailbox (router.py, Rule 5)."""
        if not self.up:
            return p.UNAVAILABLE, f"shard {self.shard} is down (being restarted); retry shortly"
        inflight = self.inflight
        if inflight >= limit or (heavy and inflight >= limit - (limit >> 3)):
            self.busy += 1
            share = "" if inflight >= limit else ", 7/8 of it for a connection sending this much"
            return p.BUSY, (f"shard {self.shard} has {inflight} requests in flight "
                            f"(mailbox_limit {limit}{share}); back off and retry")
        return None

    def queue(self, frame: bytes, target: Any) -> None:
        self.inflight += 1
        self.out_frames.append(frame)
        self.out_targets.append(target)

    def flush(self) -> Batch | None:
        """Send what is queued as one Batch; the ops back if no worker is connected (Rule 1)."""
        frames, targets = self.out_frames, self.out_targets
        if not frames:
            return None
        self.out_frames, self.out_targets = [], []
        seq = self.next_seq
        self.next_seq = seq + 1
        if not self.channel.send(p.encode_batch(seq, frames)):
            self.inflight -= len(targets)
            return targets, frames
        self.pending[seq] = (targets, frames)
        if self.inflight > self.high:
            self.high = self.inflight
        return None

    def take(self, seq: int) -> Batch | None:
        """The batch a reply with ``seq`` answers, or None if it is not pending (Rule 2)."""
        entry = self.pending.pop(seq, None)
        if entry is not None:
            self.inflight -= len(entry[0])
        return entry

    def go_down(self) -> list[Batch]:
        """The worker disconnected: forget its endpoint and hand back every pending batch."""
        self.up = False
        self.direct = self.invalidations = None
        failed = list(self.pending.values())
        self.pending = {}
        for targets, _ in failed:
            self.inflight -= len(targets)
        return failed

    def idle(self) -> bool:
        return not self.pending and not self.out_frames
