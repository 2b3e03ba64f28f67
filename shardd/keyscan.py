"""Incremental key iteration for one shard (the ``scan`` op), and Redis glob patterns.

Theory of operation
-------------------
The store has no stable order to resume from: its index is linear probing with backward-shift
deletion, so a key may move to an earlier slot whenever another is deleted, and a Redis-style
cursor over slots could skip it. A scan therefore walks a *snapshot*: the first call (cursor 0)
copies the shard's key list, and every later call examines the next ``count`` positions of that
copy, returning the keys that are still live and match the pattern.

A cursor is ``position << 16 | snapshot id`` (always < 2**48: the caller composes a global cursor
from it and a shard number). A shard keeps at most ``MAX_SNAPSHOTS`` snapshots, least recently
used first out, and drops any idle for ``IDLE_S``; a finished one is dropped at once. A cursor
whose snapshot is gone takes a fresh snapshot and continues from the same position.

Rules
-----
Rule 1: a key that is live for the whole scan is returned exactly once, provided its snapshot
        survives (the snapshot holds each key once, and each position is examined once).
Rule 2: a key is returned only if it is live when the call returns it (checked in that call).
Rule 3: a cursor whose snapshot was dropped (evicted, idle, or its id reused after 2**16 newer
        scans) may repeat or miss keys, as Redis allows for keys not live throughout the scan;
        no cursor is ever an error.
Rule 4: memory is bounded: a snapshot is the keys' bytes joined in one ``bytes`` plus 8 bytes of
        offset per key (no object per key), and at most MAX_SNAPSHOTS exist.

A snapshot costs O(keys) once, at cursor 0 (the worker is busy meanwhile, as in a resize's key
walk); every later call costs O(count).
"""

from __future__ import annotations

import functools
import re
from array import array
from collections import OrderedDict
from collections.abc import Callable
from itertools import accumulate

from shardd.protocol import SCAN_CURSOR_LIMIT

MAX_SNAPSHOTS = 16
IDLE_S = 60.0
_ID_BITS = 16
_ID_MASK = (1 << _ID_BITS) - 1
MAX_CURSOR = SCAN_CURSOR_LIMIT  # cursors are below this: the caller folds a shard number into them


# --- Redis glob patterns ---------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def compile_glob(pattern: bytes) -> re.Pattern[bytes]:
    """A compiled regex that fullmatches exactly what Redis's ``stringmatchlen`` matches (case-sensitive).

    ``*`` any run of bytes, ``?`` one byte, ``[abc]`` / ``[^abc]`` / ``[a-z]`` (a reversed range
    is swapped; ``\\`` escapes inside brackets; ``[]`` matches nothing, ``[^]`` any byte; an
    unclosed ``[`` runs to the end of the pattern), ``\\x`` the byte x (a trailing ``\\`` is
    itself); an empty key matches only the empty pattern. Bytes compare unsigned in ranges
    (Redis compares C ``char``: unsigned on ARM, signed on x86, where a range spanning 0x7F and
    0x80 means something else).

    Every element but ``*`` matches exactly one byte, so taking each fixed run between stars at
    its leftmost match is optimal; atomic groups make the regex do just that, as CPython's
    fnmatch does, so no pattern backtracks exponentially (``a*a*a*…b`` on a long key).
    """
    runs: list[list[bytes]] = [[]]  # one-byte atoms, split at each star
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == 0x2A:  # *
            if runs[-1] or len(runs) == 1:
                runs.append([])
            i += 1
        elif c == 0x3F:  # ?
            runs[-1].append(b".")
            i += 1
        elif c == 0x5B:  # [
            atom, i = _bracket(pattern, i + 1)
            runs[-1].append(atom)
        else:
            if c == 0x5C and i + 1 < n:  # backslash: the next byte, literally
                i += 1
            runs[-1].append(_byte(pattern[i]))
            i += 1
    head, *rest = (b"".join(run) for run in runs)
    if not rest:
        body = head
    else:
        *middle, tail = rest
        # Redis matches no empty key but with an empty pattern, not even with "*" (SCAN and KEYS
        # special-case a lone "*" before matching): hence the lookahead.
        body = b"(?=.)" + head + b"".join(b"(?>.*?" + run + b")" for run in middle) + b".*" + tail
    return re.compile(body, re.DOTALL)


def _byte(c: int) -> bytes:
    return b"\\x%02x" % c


def _bracket(pattern: bytes, i: int) -> tuple[bytes, int]:
    """The class starting after ``[`` at ``i``, as a one-byte regex atom; and where the pattern goes on."""
    n = len(pattern)
    negate = i < n and pattern[i] == 0x5E  # ^
    if negate:
        i += 1
    items: list[bytes] = []
    while i < n:
        c = pattern[i]
        if c == 0x5C and i + 1 < n:
            items.append(_byte(pattern[i + 1]))
            i += 2
        elif c == 0x5D:  # ]
            i += 1
            break
        elif i + 2 < n and pattern[i + 1] == 0x2D:  # a-z (Redis needs the end byte present)
            lo, hi = sorted((c, pattern[i + 2]))
            items.append(_byte(lo) + b"-" + _byte(hi))
            i += 3
        else:
            items.append(_byte(c))
            i += 1
    if not items:
        return (b"." if negate else b"(?!)"), i  # [^] any byte, [] none
    return b"[" + (b"^" if negate else b"") + b"".join(items) + b"]", i


# --- snapshots and cursors -----------------------------------------------------------------------


class _Snapshot:
    """A shard's keys at one moment: their bytes joined, and where each one ends."""

    __slots__ = ("blob", "ends", "used")

    def __init__(self, keys: list[bytes], now: float) -> None:
        self.blob = b"".join(keys)
        self.ends = array("Q", accumulate(map(len, keys)))
        self.used = now

    def __len__(self) -> int:
        return len(self.ends)

    def key(self, j: int) -> bytes:
        return self.blob[self.ends[j - 1] if j else 0:self.ends[j]]


class KeyScans:
    """The scan snapshots of one shard. ``keys`` lists the shard's keys (live or not), ``live``
    says whether one is live now, ``clock`` is monotonic seconds. No I/O."""

    def __init__(self, keys: Callable[[], list[bytes]], live: Callable[[bytes], bool],
                 clock: Callable[[], float]) -> None:
        self._keys = keys
        self._live = live
        self._clock = clock
        self._snapshots: OrderedDict[int, _Snapshot] = OrderedDict()  # id → snapshot, least recently used first
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._snapshots)

    def scan(self, cursor: int, count: int, match: bytes | None = None) -> tuple[int, list[bytes]]:
        """Examine up to ``count`` positions from ``cursor``: (the next cursor, 0 when done; the keys found)."""
        if not 0 <= cursor < MAX_CURSOR:
            raise ValueError(f"cursor must be in [0, 2**48), got {cursor}")
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        now = self._clock()
        self.prune(now)
        position, sid = cursor >> _ID_BITS, cursor & _ID_MASK
        snapshot = self._snapshots.get(sid) if cursor else None
        if snapshot is None:  # a new scan, or its snapshot was dropped (Rule 3)
            sid, snapshot = self._take(now)
        else:
            self._snapshots.move_to_end(sid)
            snapshot.used = now
        end = min(position + count, len(snapshot))
        fullmatch = compile_glob(match).fullmatch if match is not None and match != b"*" else None
        live, key_at = self._live, snapshot.key
        found = []
        for j in range(position, end):
            key = key_at(j)
            if (fullmatch is None or fullmatch(key) is not None) and live(key):
                found.append(key)
        if end >= len(snapshot):
            del self._snapshots[sid]
            return 0, found
        return end << _ID_BITS | sid, found

    def prune(self, now: float | None = None) -> None:
        """Drop snapshots idle for IDLE_S or more (the worker calls this between batches too)."""
        now = self._clock() if now is None else now
        snapshots = self._snapshots
        while snapshots:
            sid, oldest = next(iter(snapshots.items()))
            if now - oldest.used < IDLE_S:
                break
            del snapshots[sid]

    def _take(self, now: float) -> tuple[int, _Snapshot]:
        while len(self._snapshots) >= MAX_SNAPSHOTS:
            self._snapshots.popitem(last=False)
        self._next_id = sid = self._next_id % _ID_MASK + 1  # 1 … 2**16-1, so a cursor is never 0
        self._snapshots.pop(sid, None)
        snapshot = self._snapshots[sid] = _Snapshot(self._keys(), now)
        return sid, snapshot
