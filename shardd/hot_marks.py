"""Which keys a shard marks hot, and the invalidation feed its near-cache clients follow.

Theory of operation
-------------------
A client with a near cache (docs/near-cache.md) reads with ``near_get``; a shard answers a key
it has marked hot with a lease, and from then on publishes an invalidation naming the key
before it answers any op that may change it (or when the key expires, is evicted or stops
being hot). Each worker has its own feed, so its messages are in the order it applied the
ops, and numbers them: ``seq`` counts the messages that drop something (KEYS, ALL) of this
publisher, whose ``incarnation`` is new in every worker process. A near_get reply carries the
``seq`` at the time of the read, so a client knows which invalidations came after its value.

:class:`HotMarks` is the shard's side of that contract, pure (the worker does the sending).
Marking uses the shard's Space-Saving counts (:mod:`shardd.hotkeys`), in which the reads a
client answered itself are credited back (``near_get``'s ``hits``): a cached key keeps its
real demand and stays hot, instead of looking cold the moment clients stop asking for it.

Rules
-----
Rule 1: a key is marked when its access rate is at least ``max(min_rate, share * served)``
        (``served``: the ops per second the shard itself applies), and unmarked below half of
        that; at most ``max_keys`` are marked, the hottest. As marked keys move to the
        clients, ``served`` falls and the next hottest qualify: the shard's load spreads out
        until no single key is worth ``share`` of what is left.
Rule 2: a write to a marked key (any op that may change it), its expiry or eviction, and its
        unmarking each queue the key; ``take`` turns the queue into one KEYS message. The
        worker publishes it before it sends the replies of the ops that queued it, so a
        write is acknowledged only after its invalidation is on its way.
Rule 3: ``reset`` (flush, resize, the feature turned off) unmarks every key and queues one ALL
        message: clients drop everything they hold from this shard.
Rule 4: heartbeats carry the current ``seq`` without advancing it; a client that sees any
        message whose ``seq`` skips one has missed an invalidation and drops the shard's keys.
Rule 5: caching a key that is written as often as it is read saves nothing and costs a message
        per write: a marked key at least half of whose accesses in the last period were writes
        is unmarked and not marked again for ``BENCH_S`` seconds.
"""

from __future__ import annotations

import heapq
import os

from shardd import protocol as p

BENCH_S = 30.0  # how long a write-heavy key is not marked again (Rule 5)


def new_incarnation() -> int:
    """A random 63-bit number for a new feed: a client tells a restarted worker's feed from the old one."""
    return int.from_bytes(os.urandom(8), "big") >> 1


class HotMarks:
    """One shard's hot keys and its invalidation feed's state (see the module docstring)."""

    __slots__ = ("all_pending", "benched", "evaluated_at", "incarnation", "keys_invalidated", "lease_ms", "marked",
                 "max_keys", "messages", "min_rate", "pending", "resets", "seq", "shard", "share", "written")

    def __init__(self, shard: int, share: float, min_rate: float, max_keys: int, lease_ms: int,
                 incarnation: int | None = None) -> None:
        self.shard = shard
        self.incarnation = new_incarnation() if incarnation is None else incarnation
        self.share = share
        self.min_rate = min_rate
        self.max_keys = max_keys
        self.lease_ms = lease_ms
        self.marked: set[bytes] = set()
        self.pending: list[bytes] = []   # keys to name in the next KEYS message (Rule 2)
        self.all_pending = False         # an ALL message is owed (Rule 3)
        self.seq = 0
        self.messages = 0                # KEYS and ALL messages taken for sending
        self.keys_invalidated = 0        # keys named in them
        self.resets = 0
        self.written: dict[bytes, int] = {}   # writes to each marked key since the last evaluation (Rule 5)
        self.benched: dict[bytes, float] = {}  # write-heavy key -> when it may be marked again
        self.evaluated_at: float | None = None

    def evaluate(self, rates: list[tuple[bytes, float]], served_rate: float, now: float) -> tuple[int, int]:
        """Re-mark from ``rates`` ((key, accesses/s), hottest first) (Rules 1 and 5): (marked, unmarked)."""
        on = max(self.min_rate, self.share * served_rate)
        off = on / 2
        marked, benched = self.marked, self.benched
        if self.written:
            period = max(now - self.evaluated_at, 1e-3) if self.evaluated_at is not None else 1.0
            rate_of = dict(rates)
            for key, writes in self.written.items():
                if 2 * writes / period >= rate_of.get(key, 0.0):
                    benched[key] = now + BENCH_S
            self.written = {}
        if benched:
            for key in [key for key, until in benched.items() if until <= now]:
                del benched[key]
        self.evaluated_at = now
        qualify = [(rate, key) for key, rate in rates
                   if rate >= (off if key in marked else on) and key not in benched]
        keep = {key for _, key in heapq.nlargest(self.max_keys, qualify)} if self.max_keys else set()
        gone = marked - keep
        added = len(keep - marked)
        if gone:
            self.pending.extend(gone)
        self.marked = keep
        return added, len(gone)

    def touched(self, key: bytes) -> None:
        """``key`` may change or go (expiry, eviction): queue its invalidation if it is marked."""
        if key in self.marked:
            self.pending.append(key)

    def wrote(self, key: bytes) -> None:
        """An op that may change ``key`` was applied: as ``touched``, and counted for Rule 5."""
        if key in self.marked:
            self.pending.append(key)
            self.written[key] = self.written.get(key, 0) + 1

    def reset(self) -> None:
        """Unmark everything and queue an ALL message (Rule 3)."""
        self.marked = set()
        self.pending = []
        self.all_pending = True

    def take(self) -> bytes | None:
        """The message to publish now, or None if nothing is owed (Rules 2 and 3)."""
        if self.all_pending:
            self.all_pending = False
            self.pending = []
            self.seq += 1
            self.messages += 1
            self.resets += 1
            return p.encode(p.Invalidation(self.shard, self.incarnation, self.seq, p.INVALIDATE_ALL))
        if not self.pending:
            return None
        keys = list(dict.fromkeys(self.pending))  # each key once, in order
        self.pending = []
        self.seq += 1
        self.messages += 1
        self.keys_invalidated += len(keys)
        return p.encode(p.Invalidation(self.shard, self.incarnation, self.seq, p.INVALIDATE_KEYS, keys))

    def heartbeat(self) -> bytes:
        """A HEARTBEAT with the current ``seq`` (Rule 4)."""
        return p.encode(p.Invalidation(self.shard, self.incarnation, self.seq, p.HEARTBEAT))

    def lease(self, key: bytes, ttl_ms: int) -> int:
        """How long a client may keep ``key``'s value: 0 if it is not marked, else the lease, cut
        to the key's remaining TTL (``ttl_ms`` < 0: none) so a copy never outlives the key."""
        if key not in self.marked:
            return 0
        lease = self.lease_ms
        return lease if ttl_ms < 0 else min(lease, ttl_ms)

    def stats(self) -> dict[str, int]:
        return {"marked": len(self.marked), "messages": self.messages, "keys_invalidated": self.keys_invalidated,
                "resets": self.resets, "seq": self.seq}
