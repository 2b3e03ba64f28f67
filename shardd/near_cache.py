"""A client's near cache of hot keys, sans-IO: what it may keep, for how long, and what drops it.

Theory of operation
-------------------
Each worker marks its hot keys and publishes an invalidation feed (:mod:`shardd.hot_marks`,
docs/near-cache.md). A client reads with ``near_get``; the reply says whether the key is hot
(``lease_ms`` > 0) and where the read stood in the shard's feed (``incarnation``, ``seq``). This
module decides, for one client, whether to keep that value and when to stop serving it. The
client does the I/O: it hands every feed message to :meth:`NearCache.on_message`, asks
:meth:`NearCache.lookup` before it sends a GET, and offers each ``near_get`` reply to
:meth:`NearCache.admit`.

Rules
-----
Rule 1: a value is kept only if the client follows the shard's feed (same incarnation), has
        not missed part of it since the read (``seq`` >= the feed's ``floor``), has seen no
        invalidation of the key numbered after the read, and has sent no write of its own
        since it sent the read. Otherwise the reply is answered and forgotten.
Rule 2: a kept value is served until the first of: an invalidation naming the key, an ALL
        message, a sequence gap or a new incarnation on its shard's feed, its lease (counted
        from when the read was *sent*, so never longer than the shard granted), or the feed
        falling silent for ``silence_s`` (the worker heartbeats every 0.1 s), or its connection
        dropping (``feed_lost``: the worker died).
Rule 3: the client drains its feed before every lookup and before every admit, so an
        invalidation that has reached the client's socket is applied before the next read.
Rule 4: a client's own write drops its copy of every key the write names before it is sent
        (a flush: every copy), so it reads its writes.
Rule 5: memory is bounded: at most ``max_entries`` values and ``max_bytes`` of keys and values;
        past either the oldest copies go first. A value larger than ``max_bytes / 16`` is not kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec

from shardd import protocol as p
from shardd.errors import ProtocolError

__all__ = ["MISS", "NearCache"]

MISS: Any = object()
"""What :meth:`NearCache.lookup` returns when it has no value to serve."""

_KEYED_WRITES = frozenset(cls for cls, spec in p.OPS.items() if spec.kind == p.KEYED and spec.write)
_RECENT_MAX = 4096  # invalidated keys remembered per feed for Rule 1; past it the feed's floor moves up


class Feed:
    """One shard's invalidation feed as this client has followed it."""

    __slots__ = ("floor", "heard", "incarnation", "recent", "seq")

    def __init__(self, incarnation: int, seq: int, now: float) -> None:
        self.incarnation = incarnation
        self.seq = seq            # the last message's number
        self.floor = seq          # recent names every key invalidated after this number (Rule 1)
        self.recent: dict[bytes, int] = {}
        self.heard = now

    def restart(self, incarnation: int, seq: int) -> None:
        self.incarnation, self.seq, self.floor = incarnation, seq, seq
        self.recent = {}


class NearCache:
    """One client's copies of hot values (see the module docstring); give each client its own.

    ``max_entries`` and ``max_bytes`` bound it (Rule 5); ``silence_s``: how long a feed may say
    nothing before its shard's copies stop being served (Rule 2).
    """

    def __init__(self, max_entries: int = 1024, max_bytes: int = 16 * 1024 * 1024, silence_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be an int >= 1, got {max_entries!r}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1024:
            raise ValueError(f"max_bytes must be an int >= 1024, got {max_bytes!r}")
        if not 0 < silence_s <= 60:
            raise ValueError(f"silence_s must be in (0, 60], got {silence_s!r}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.silence_s = silence_s
        self.clock = clock
        # key -> [value, served until (client clock), feed, hits since admitted]
        self.entries: dict[bytes, list[Any]] = {}
        self.bytes = 0
        self.feeds: dict[int, Feed] = {}
        self.writes = 0  # this client's writes sent so far (Rule 1)
        self.unfollowed = False  # a reply came from a feed this client does not follow: re-read where they are
        self.unreported: dict[bytes, int] = {}  # hits of dropped copies, sent with the key's next near_get
        self.hits = self.misses = self.admitted = self.refused = 0
        self.invalidations = self.dropped = self.resets = self.gaps = self.expired = 0

    def __len__(self) -> int:
        return len(self.entries)

    # --- reads -------------------------------------------------------------------------

    def lookup(self, key: bytes, now: float) -> Any:
        """The value to serve for ``key`` from here, or MISS (Rule 2)."""
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return MISS
        if now >= entry[1] or now - entry[2].heard > self.silence_s:
            self._drop(key)
            self.expired += 1
            self.misses += 1
            return MISS
        entry[3] += 1
        self.hits += 1
        return entry[0]

    def request(self, key: bytes) -> p.NearGet:
        """The near_get to send for ``key``, with the hits to credit it (protocol.NearGet)."""
        return p.NearGet(key, self.unreported.pop(key, 0) if self.unreported else 0)

    def admit(self, key: bytes, answer: Any, sent_at: float, writes_then: int) -> bytes | None:
        """Take a near_get reply's value: keep it if Rule 1 allows; return the value either way."""
        try:
            value, lease_ms, shard, incarnation, seq = answer
        except (TypeError, ValueError):
            raise ProtocolError(f"expected [value, lease_ms, shard, incarnation, seq], got {answer!r:.80}") from None
        if type(lease_ms) is not int or type(seq) is not int:
            raise ProtocolError(f"expected int lease_ms and seq, got {answer!r:.80}")
        if lease_ms <= 0 or value is None:
            return value
        if type(value) is not bytes:
            raise ProtocolError(f"expected bytes or nil, got {type(value).__name__}")
        feed = self.feeds.get(shard)
        if feed is None or feed.incarnation != incarnation:
            self.unfollowed = True
            self.refused += 1
            return value
        if seq < feed.floor or writes_then != self.writes or feed.recent.get(key, -1) > seq:
            self.refused += 1
            return value
        size = len(key) + len(value)
        if size > self.max_bytes >> 4:
            self.refused += 1
            return value
        if key in self.entries:
            self._drop(key)
        entries = self.entries
        while entries and (len(entries) >= self.max_entries or self.bytes + size > self.max_bytes):
            self._drop(next(iter(entries)))  # the oldest copy (Rule 5)
        entries[key] = [value, sent_at + lease_ms / 1000, feed, 0]
        self.bytes += size
        self.admitted += 1
        return value

    # --- the feed ------------------------------------------------------------------------

    def on_message(self, frame: bytes, now: float) -> None:
        """Apply one message of a shard's invalidation feed (Rules 1 and 2)."""
        try:
            msg = p.decode_invalidation(frame)
        except msgspec.DecodeError:
            self.reset_all()  # cannot tell what it said: assume the worst
            return
        shard, seq, kind = msg.shard, msg.seq, msg.kind
        feed = self.feeds.get(shard)
        if feed is None:
            self.feeds[shard] = Feed(msg.incarnation, seq, now)  # nothing of this shard is held yet
            return
        if now > feed.heard:
            feed.heard = now
        if feed.incarnation != msg.incarnation or seq != feed.seq + (kind != p.HEARTBEAT):
            # A restarted worker, or a gap: whatever was missed may have named any key we hold.
            if feed.incarnation == msg.incarnation:
                self.gaps += 1
            self._drop_shard(feed)
            feed.restart(msg.incarnation, seq)
            return
        if kind == p.HEARTBEAT:
            return
        feed.seq = seq
        if kind == p.INVALIDATE_ALL:
            self.resets += 1
            self._drop_shard(feed)
            feed.restart(msg.incarnation, seq)
            return
        recent, entries = feed.recent, self.entries
        if len(recent) + len(msg.keys) > _RECENT_MAX:
            recent.clear()
            feed.floor = seq - 1  # this message's keys are recorded below: reads at seq - 1 stay decidable
        for key in msg.keys:
            recent[key] = seq
            entry = entries.get(key)
            if entry is not None and entry[2] is feed:
                self._drop(key)
                self.invalidations += 1

    def feed_lost(self, shard: int) -> None:
        """The connection to ``shard``'s feed dropped: drop its copies, keep nothing from it until a
        feed speaks again, and have the client re-read where the feeds are (a restarted worker)."""
        feed = self.feeds.get(shard)
        if feed is not None:
            self.resets += 1
            self._drop_shard(feed)
            feed.restart(0, 0)
        self.unfollowed = True

    # --- this client's own writes (Rule 4) -------------------------------------------------

    def wrote(self, op: Any) -> None:
        """``op`` is about to be sent: drop every copy it may change."""
        cls = type(op)
        if cls in _KEYED_WRITES:
            self.writes += 1
            if op.key in self.entries:
                self._drop(op.key)
        elif cls is p.SetMany or cls is p.SetManyNx:
            self.writes += 1
            for key, _ in op.items:
                if key in self.entries:
                    self._drop(key)
        elif cls is p.DeleteMany:
            self.writes += 1
            for key in op.keys:
                if key in self.entries:
                    self._drop(key)
        elif cls is p.Flush or cls is p.Resize:
            self.writes += 1
            self.reset_all()

    def reset_all(self) -> None:
        """Drop every copy and forget every feed's position (a reconnect, an unreadable message)."""
        for key in list(self.entries):
            self._drop(key)
        for feed in self.feeds.values():
            feed.restart(0, 0)  # no reply carries incarnation 0: nothing is kept until the feed speaks again

    # --- bookkeeping -------------------------------------------------------------------------

    def _drop(self, key: bytes) -> None:
        value, _, _, hits = self.entries.pop(key)
        self.bytes -= len(key) + len(value)
        self.dropped += 1
        if hits:
            unreported = self.unreported
            if len(unreported) >= self.max_entries:
                unreported.clear()  # bounded: a lost credit only makes a key look a little colder
            unreported[key] = unreported.get(key, 0) + hits

    def _drop_shard(self, feed: Feed) -> None:
        for key in [key for key, entry in self.entries.items() if entry[2] is feed]:
            self._drop(key)

    def stats(self) -> dict[str, Any]:
        """The near cache's counters (shown by ``Client.near_cache_stats()``)."""
        return {"entries": len(self.entries), "bytes": self.bytes, "hits": self.hits, "misses": self.misses,
                "admitted": self.admitted, "refused": self.refused, "invalidations": self.invalidations,
                "expired": self.expired, "resets": self.resets, "gaps": self.gaps, "feeds": len(self.feeds)}
