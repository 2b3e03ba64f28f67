"""Hot-key tracking in bounded memory: Space-Saving (Metwally, Agrawal & El Abbadi, 2005).

Theory of operation
-------------------
A shard sees every access to its keys but cannot count them all. :class:`SpaceSaving`
keeps at most ``2 * capacity`` counters. A key already counted is incremented (one dict
update). A new key, when the table is full, triggers a *prune*: the ``capacity`` highest
counters are kept, and ``floor`` becomes the highest count dropped. A new key starts at
``floor + 1`` with error ``floor``, exactly as Space-Saving's "replace the minimum" does,
but the O(capacity log capacity) prune runs once per ``capacity`` new keys, so each access
costs O(1) amortised and the common case (a key already in the table) is one dict get and
one dict set.

Rules
-----
Rule 1: ``count(key)`` never underestimates: true count <= count <= true count + error.
Rule 2: any key whose true count exceeds ``floor`` is in the table (Space-Saving's
        guarantee), so a key taking more than 1/capacity of the traffic is never missed.
Rule 3: memory is bounded: at most ``2 * capacity`` keys are held.

:class:`HotKeys` turns counts into rates with two tumbling windows: the current one and
the one before it, so a rate always covers between one and two windows of traffic.
Rule 4: ``HotKeys.add`` stays valid for the object's whole life: a rotation or a resize
        changes the tables in place, so a caller may bind ``add`` once (the worker does).
Pure code, no I/O: the caller passes the time in.
"""

from __future__ import annotations

import heapq


class SpaceSaving:
    """Approximate top-K counter over a stream of keys (see module docstring)."""

    __slots__ = ("capacity", "counts", "errors", "floor")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.counts: dict[bytes, int] = {}
        self.errors: dict[bytes, int] = {}  # only keys admitted while floor > 0
        self.floor = 0

    def add(self, key: bytes) -> None:
        counts = self.counts
        count = counts.get(key)
        if count is not None:
            counts[key] = count + 1
            return
        if len(counts) >= 2 * self.capacity:
            self._prune()
            counts = self.counts  # a new dict: writing to the old one lost every key that triggered a prune
        floor = self.floor
        counts[key] = floor + 1
        if floor:
            self.errors[key] = floor

    def credit(self, key: bytes, n: int) -> None:
        """Count ``n`` accesses of ``key`` at once (reads a client answered from its near cache)."""
        count = self.counts.get(key)
        if count is None:
            self.add(key)  # admitted as Space-Saving admits a new key (may prune)
            n -= 1
            count = self.counts[key]
        self.counts[key] = count + n

    def resize(self, capacity: int) -> None:
        """Keep ``capacity`` counters from now on; a table past ``2 * capacity`` is pruned now (Rule 3)."""
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        if len(self.counts) > 2 * capacity:
            self._prune()

    def take(self) -> SpaceSaving:
        """Move this table's counts into a new SpaceSaving and start again empty, in place."""
        taken = SpaceSaving(self.capacity)
        taken.counts, taken.errors, taken.floor = self.counts, self.errors, self.floor
        self.counts, self.errors, self.floor = {}, {}, 0
        return taken

    def _prune(self) -> None:
        # A sort of the counts alone (ints, in C) finds the cut; heapq.nlargest over the items with a
        # key function cost ~3x as much, and with uniform keys a prune runs every capacity adds.
        counts, capacity = self.counts, self.capacity
        ranked = sorted(counts.values(), reverse=True)
        cut = ranked[capacity - 1]  # the capacity-th highest count: kept
        kept = {k: c for k, c in counts.items() if c > cut}
        ties = capacity - len(kept)
        for k, c in counts.items():
            if not ties:
                break
            if c == cut:
                kept[k] = c
                ties -= 1
        self.floor = max(self.floor, ranked[capacity] if len(ranked) > capacity else 0)
        self.counts = kept
        self.errors = {k: e for k, e in self.errors.items() if k in kept}

    def top(self, n: int) -> list[tuple[bytes, int, int]]:
        """The ``n`` highest (key, count, error), highest count first."""
        errors = self.errors
        best = heapq.nlargest(n, self.counts.items(), key=lambda item: item[1])
        return [(key, count, errors.get(key, 0)) for key, count in best]


class HotKeys:
    """Space-Saving over two tumbling windows of ``window_s`` seconds, for rates."""

    def __init__(self, capacity: int, window_s: float, now: float) -> None:
        self.capacity = capacity
        self.window_s = window_s
        self.current = SpaceSaving(capacity)
        self.previous: SpaceSaving | None = None
        self.started = now
        self.add = self.current.add
        self.credit = self.current.credit

    def rotate(self, now: float) -> None:
        """Start a new window if the current one is over (call it from a timer).

        The current table is emptied in place, never replaced, so ``add`` keeps counting (Rule 4).
        """
        if now - self.started < self.window_s:
            return
        self.previous = self.current.take()
        self.started = now

    def resize(self, capacity: int) -> None:
        """Track ``capacity`` keys from now on (a live ``hotkeys_capacity``); counts are kept."""
        self.capacity = capacity
        self.current.resize(capacity)
        if self.previous is not None:
            self.previous.resize(capacity)

    def top(self, n: int, now: float) -> tuple[float, list[tuple[bytes, float, int, int]]]:
        """(seconds covered, [(key, accesses per second, count, error), …]) hottest first."""
        span = max(now - self.started, 1e-3)
        counts = dict(self.current.counts)
        errors = dict(self.current.errors)
        if self.previous is not None:
            span += self.window_s
            prev_floor = self.previous.floor
            for key, count in self.previous.counts.items():
                counts[key] = counts.get(key, 0) + count
                errors[key] = errors.get(key, 0) + self.previous.errors.get(key, 0)
            # A key missing from one window may have had up to that window's floor there.
            for key in counts:
                if key not in self.previous.counts:
                    counts[key] += prev_floor
                    errors[key] = errors.get(key, 0) + prev_floor
        best = heapq.nlargest(n, counts.items(), key=lambda item: item[1])
        return span, [(key, count / span, count, errors.get(key, 0)) for key, count in best]
