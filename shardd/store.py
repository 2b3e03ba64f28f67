"""The per-shard key/value store: a dict of compact entries with TTLs, versions and stats.

Why this module is over 500 lines: it is one class whose Rules (below) tie every method to the
same structures (``_data``, ``_keys``, ``_ttl_keys``, ``used_bytes``, the version counter).
Eviction and active expiry are the code that reads and repairs all of them at once; moved to
another module they would reach into Store's private state by convention, which is worse than
length.

Theory of operation
-------------------
One worker owns one :class:`Store` and applies every op on its shard to it, one at a time
(docs/design.md, decision 2), so nothing here locks. The store does no I/O: time comes from an
injected ``clock`` (monotonic milliseconds, an ``int`` >= 0) and randomness from an
injected ``random.Random``, so tests drive it with a fake clock and a seeded rng.

Keys map to :class:`_Entry` objects (``__slots__``, no per-entry dict). Expiry is the
Redis model: *lazy* expiry on every read and write path, which treats an expired key as
absent and reclaims it the moment it is touched, plus *active* expiry
(:meth:`Store.active_expire`), which the worker calls between batches to reclaim keys
nobody touches. Active expiry samples from ``_ttl_keys``, a list of exactly the keys
that have a TTL; each entry remembers its position in that list (``ttl_index``) so it
can be swap-removed in O(1).

Memory is bounded by ``max_bytes`` (the shard's share of the daemon's ``max_memory``). A
write that would take ``used_bytes`` past it first evicts keys chosen by ``policy``; if it
cannot (``noeviction``, no key with a TTL under ``volatile-ttl``, or the entry alone is
bigger than the share) it raises OutOfMemory before anything changes. Eviction samples
``EVICTION_SAMPLES`` random keys and drops the worst, as Redis does (maxmemory-samples 5).
Random sampling needs random access, which a dict has not: ``_keys`` lists every key, with
*stale* slots allowed (a removed key's slot stays until a sample finds it and swap-removes
it, or until the list is rebuilt once it is twice the dict's size), so removal stays O(1)
with no per-entry index.

Recency and frequency use a coarse clock, ``lru_clock`` (milliseconds), that the owner
refreshes with :meth:`Store.touch_clock` once per batch, as Redis refreshes its LRU clock
in serverCron: reading the real clock on every GET would break Rule 6, and every entry
touched in one batch shares one int object instead of owning one. ``hits`` is an access
count halved for every ``LFU_HALF_LIFE_MS`` the key sat idle (Redis's LFU decay, on a
linear counter).

Every value write (SET, CAS, INCR, APPEND, SET_MANY items) takes the next value of a per-store
counter as the entry's version, like memcached's CAS unique. TTL-only changes (EXPIRE,
PERSIST, TOUCH) keep the version, as memcached's TOUCH keeps the CAS unique: a version names a
value, and CAS compares values.

Rules
-----
Rule 1: a key is live iff it has an entry and (``expires_at_ms == 0`` or
        ``expires_at_ms > clock()``). A key set with ``ttl_ms=100`` at t=0 is gone at
        t=100. No public method ever returns or acts on an expired entry.
Rule 2: ``entry.expires_at_ms != 0`` iff ``entry.ttl_index >= 0``, and then
        ``_ttl_keys[entry.ttl_index]`` is the entry's key. ``_ttl_keys`` holds no other key.
Rule 3: versions are unique and strictly increasing within a store: the first write gets
        version 1, and a key that is deleted and written again gets a new, higher version,
        so a CAS with a version read before the delete can never succeed.
Rule 4: ``used_bytes`` is the sum over all entries (live or not yet reclaimed) of
        ``len(key) + len(value) + ENTRY_OVERHEAD``, kept up to date on every insert,
        replace and removal; it is 0 when the store is empty.
Rule 5: an op that raises (bad argument, INCR on a non-integer or overflow) changes
        nothing visible. Reclaiming an expired entry on the way is not visible.
Rule 6: the hot paths (GET, SET without TTL on a key without TTL) never read the clock
        and allocate nothing beyond a new entry and its version int; GET never raises.
Rule 7: after every public method ``used_bytes <= max_bytes`` unless ``max_bytes`` was
        lowered by :meth:`Store.configure` under ``noeviction`` (then writes that grow the
        store are refused until deletes bring it back under). A write refused with
        OutOfMemory changes nothing but the evictions made while trying to fit it.
Rule 8: every key of ``_data`` is in ``_keys`` at least once, and ``len(_keys) <= _compact_at``,
        which is ``2 * len(_data) + 64`` as of the last rebuild: stale slots cost at most a
        word or two per key the store held.
"""

from __future__ import annotations

import random
import re
import struct
import sys
from collections.abc import Callable, Container, Iterable, Iterator
from typing import Any

from shardd.errors import NotInteger, OutOfMemory, TooLarge
from shardd.protocol import ALWAYS, IF_ABSENT, IF_PRESENT

_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1

# Redis's string2ll is this strict; Python's int() would also take b" 1", b"+1", b"1_0",
# b"01" and non-ASCII digits, which would make INCR disagree with every other client.
_match_int = re.compile(rb"-?(?:0|[1-9][0-9]*)").fullmatch
# len(b"-9223372036854775808"): anything longer cannot fit, and int() of a huge digit
# string is slow (and past 4300 digits raises ValueError).
_MAX_INT_LEN = 20

# Redis's activeExpireCycle defaults: ACTIVE_EXPIRE_CYCLE_KEYS_PER_LOOP = 20 and
# "repeat while more than 25% of the sample was expired".
EXPIRE_SAMPLE = 20

# Redis's maxmemory-samples default: 5 "approximates LRU very well"; 10 is closer to true
# LRU and costs more CPU per eviction.
EVICTION_SAMPLES = 5

# An idle key's LFU count halves every minute, like Redis's lfu-decay-time 1 (one minute).
LFU_HALF_LIFE_MS = 60_000

POLICIES = ("allkeys-lru", "allkeys-lfu", "volatile-ttl", "allkeys-random", "noeviction")


class _Entry:
    """One stored value. ``expires_at_ms`` 0 means no TTL; ``ttl_index`` -1 means not in _ttl_keys.

    ``atime`` is the store's ``lru_clock`` at the last access; ``hits`` the decayed access count.
    """

    __slots__ = ("atime", "expires_at_ms", "hits", "ttl_index", "value", "version")

    def __init__(self, value: bytes, expires_at_ms: int, version: int, ttl_index: int, atime: int = 0) -> None:
        self.value = value
        self.expires_at_ms = expires_at_ms
        self.version = version
        self.ttl_index = ttl_index
        self.atime = atime
        self.hits = 1


def _dict_slot_estimate() -> int:
    # A dict entry is (hash, key, value): three words, plus a 4-byte slot in the index
    # table, which is 3/2 the size of the entry table. At its fullest (2/3 of the index
    # table) that is 3 words + 6 bytes per key; right after a resize it is about twice
    # that. 7/5 is roughly the geometric middle of that sawtooth; calibrate against RSS.
    word = struct.calcsize("P")
    return (3 * word + 6) * 7 // 5


# Allocators hand out blocks in steps of 16 bytes (pymalloc below 512 bytes; glibc malloc
# above, plus an 8-byte header): a bytes object wastes 7.5 bytes on average, 8 rounded up.
_ROUNDING = 8

# What one entry costs beyond the bytes of its key and value: the _Entry object (with its
# GC header, which sys.getsizeof includes), the headers of the key and value bytes objects
# (getsizeof(b"") is the header plus the trailing NUL) and their allocator rounding, the
# version int (always a separate object once the counter passes 256), the entry's share of
# the dict and its slot in _keys (one word, up to two with stale slots: 1.5 counted).
# ``atime`` is shared with the other entries of its batch and ``hits`` is a cached small
# int for all but hot keys, so neither is counted; nor is TTL bookkeeping (the deadline
# int and a _ttl_keys slot). tests/unit/test_memory.py checks the sum against tracemalloc
# and process RSS for small and large values.
ENTRY_OVERHEAD: int = (
    sys.getsizeof(_Entry(b"", 0, 0, -1))
    + 2 * (sys.getsizeof(b"") + _ROUNDING)
    + sys.getsizeof(1 << 20)
    + _dict_slot_estimate()
    + struct.calcsize("P") * 3 // 2
)


class Store:
    """One shard's keys. Not thread-safe: exactly one worker loop may call it.

    Counters (plain ints, read them for stats): ``hits`` and ``misses`` count key lookups
    by get/gets/get_many/getdel; ``sets`` counts values written (set, set_many items, a CAS that
    stored, INCR, APPEND); ``deletes`` counts live keys removed by delete/delete_many/getdel; ``expired``
    counts keys reclaimed because their TTL had passed (lazily, actively or by flush);
    ``used_bytes`` is the accounted size (Rule 4); ``evictions`` counts keys evicted, by the
    policy that chose them; ``oom_rejected`` counts writes refused with OutOfMemory.

    ``max_bytes`` (0: unlimited) and ``policy`` may be changed at any time with
    :meth:`configure`.
    """

    def __init__(self, clock: Callable[[], int], rng: random.Random | None = None,
                 max_bytes: int = 0, policy: str = "allkeys-lru") -> None:
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._data: dict[bytes, _Entry] = {}
        self._ttl_keys: list[bytes] = []
        self._keys: list[bytes] = []
        self._compact_at = 64
        self._version = 0
        self.lru_clock = clock()
        self.hits = 0
        self.misses = 0
        self.sets = 0
        self.deletes = 0
        self.expired = 0
        self.used_bytes = 0
        self.evictions: dict[str, int] = {}
        self.oom_rejected = 0
        self.max_bytes = 0
        self.policy = "allkeys-lru"
        self._limit = sys.maxsize
        self.configure(max_bytes, policy)

    def configure(self, max_bytes: int | None = None, policy: str | None = None) -> int:
        """Change the memory limit and/or eviction policy; returns how many keys were evicted.

        Lowering ``max_bytes`` below ``used_bytes`` evicts down to it at once (by the new
        policy); under ``noeviction`` nothing is evicted and writes that grow the store are
        refused until it is back under the limit.
        """
        if policy is not None:
            if policy not in POLICIES:
                raise ValueError(f"eviction policy must be one of {', '.join(POLICIES)}, got {policy!r}")
            self.policy = policy
        if max_bytes is not None:
            if max_bytes < 0:
                raise ValueError(f"max_bytes must be >= 0 (0: unlimited), got {max_bytes}")
            self.max_bytes = max_bytes
            self._limit = max_bytes or sys.maxsize
        evicted = 0
        if self.policy != "noeviction":
            while self.used_bytes > self._limit and self._evict_one(()):
                evicted += 1
        return evicted

    def touch_clock(self) -> None:
        """Refresh the coarse clock that access times are taken from (call once per batch)."""
        self.lru_clock = self._clock()

    @property
    def evicted(self) -> int:
        """Keys evicted so far, over all policies."""
        return sum(self.evictions.values())

    def __len__(self) -> int:
        """Number of entries, including expired ones not yet reclaimed (an upper bound on live keys)."""
        return len(self._data)

    @property
    def expiring(self) -> int:
        """Number of entries with a TTL (Redis INFO's ``expires``), including unreclaimed ones."""
        return len(self._ttl_keys)

    # --- reads ----------------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        entry = self._data.get(key)
        if entry is None:
            self.misses += 1
            return None
        expires = entry.expires_at_ms
        if expires and expires <= self._clock():
            self._reclaim(key, entry)
            self.misses += 1
            return None
        now = self.lru_clock
        if now - entry.atime >= LFU_HALF_LIFE_MS:
            entry.hits >>= (now - entry.atime) // LFU_HALF_LIFE_MS
        entry.atime = now
        entry.hits += 1
        self.hits += 1
        return entry.value

    def gets(self, key: bytes) -> tuple[bytes, int] | None:
        """The value and its version (the CAS token), or None if the key is missing."""
        entry = self._data.get(key)
        if entry is None:
            self.misses += 1
            return None
        expires = entry.expires_at_ms
        if expires and expires <= self._clock():
            self._reclaim(key, entry)
            self.misses += 1
            return None
        self._use(entry)
        self.hits += 1
        return entry.value, entry.version

    def get_many(self, keys: Iterable[bytes]) -> list[bytes | None]:
        """Values in the order of ``keys``; None for each missing key."""
        lookup = self._data.get
        clock = self._clock
        use = self._use
        now = -1  # read the clock at most once per call, and only if a TTL needs it
        out: list[bytes | None] = []
        append = out.append
        hits = 0
        for key in keys:
            entry = lookup(key)
            if entry is not None:
                expires = entry.expires_at_ms
                if expires:
                    if now < 0:
                        now = clock()
                    if expires <= now:
                        self._reclaim(key, entry)
                        append(None)
                        continue
                use(entry)
                hits += 1
                append(entry.value)
            else:
                append(None)
        self.hits += hits
        self.misses += len(out) - hits
        return out

    def exists(self, key: bytes) -> bool:
        return self._live(key) is not None

    def ttl(self, key: bytes) -> int:
        """Milliseconds left (>= 1) for a live key with a TTL; -1 if it has none; -2 if missing.

        The clock is integral and a live key has ``expires_at_ms > now`` (Rule 1), so the
        difference is already the ceiling and never 0 (Redis PTTL convention).
        """
        entry = self._live(key)
        if entry is None:
            return -2
        if not entry.expires_at_ms:
            return -1
        return entry.expires_at_ms - self._clock()

    # --- writes ---------------------------------------------------------------------

    def set(self, key: bytes, value: bytes, ttl_ms: int | None = None, cond: int = ALWAYS) -> bool:
        """Store ``value``; returns whether it stored (cond IF_ABSENT/IF_PRESENT may refuse).

        Without ``ttl_ms`` any previous TTL is cleared (Redis SET semantics).
        """
        if ttl_ms is not None and ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be a positive number of milliseconds, got {ttl_ms}")
        entry = self._data.get(key)
        if entry is not None:
            expires = entry.expires_at_ms
            if expires and expires <= self._clock():
                self._reclaim(key, entry)
                entry = None
        if cond:
            if cond == IF_ABSENT:
                if entry is not None:
                    return False
            elif cond == IF_PRESENT:
                if entry is None:
                    return False
            else:
                raise ValueError(f"cond must be ALWAYS, IF_ABSENT or IF_PRESENT (0, 1, 2), got {cond!r}")
        if ttl_ms is not None or (entry is not None and entry.ttl_index >= 0):
            self._reserve(key, entry, value)
            self._write(key, entry, value, ttl_ms)
            return True
        # The hot path (Rule 6): _write inlined for a key that ends up without a TTL; the
        # saved method call is about a tenth of a SET's time in the store.
        if entry is None:
            size = len(key) + len(value) + ENTRY_OVERHEAD
            if self.used_bytes + size > self._limit:
                self._make_room(size, size, (key,))
            self._version = version = self._version + 1
            self._data[key] = _Entry(value, 0, version, -1, self.lru_clock)
            keys = self._keys
            keys.append(key)
            if len(keys) > self._compact_at:
                self._compact_keys()
            self.used_bytes += size
        else:
            grow = len(value) - len(entry.value)
            if grow > 0 and self.used_bytes + grow > self._limit:
                self._make_room(len(key) + len(value) + ENTRY_OVERHEAD, grow, (key,))
            self._version = version = self._version + 1
            self.used_bytes += grow
            entry.value = value
            entry.version = version
            self._use(entry)
        self.sets += 1
        return True

    def set_many(self, items: Iterable[tuple[bytes, bytes]], ttl_ms: int | None = None) -> int:
        """SET each (key, value) in order (later duplicates win); returns how many were stored."""
        if ttl_ms is not None and ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be a positive number of milliseconds, got {ttl_ms}")
        items = list(items)
        each = not self._reserve_many(items)
        lookup = self._data.get
        clock = self._clock
        write = self._write
        count = 0
        for key, value in items:
            entry = lookup(key)
            if entry is not None:
                expires = entry.expires_at_ms
                if expires and expires <= clock():
                    self._reclaim(key, entry)
                    entry = None
            if each:
                self._reserve(key, entry, value)
            write(key, entry, value, ttl_ms)
            count += 1
        return count

    def cas(self, key: bytes, value: bytes, version: int, ttl_ms: int | None = None) -> bool | None:
        """Store ``value`` only if the key's version is still ``version``.

        Returns None if the key is missing, False if the version is stale (nothing
        changes), True if stored. Like SET, no ``ttl_ms`` clears the TTL.
        """
        if ttl_ms is not None and ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be a positive number of milliseconds, got {ttl_ms}")
        entry = self._live(key)
        if entry is None:
            return None
        if entry.version != version:
            return False
        self._reserve(key, entry, value)
        self._write(key, entry, value, ttl_ms)
        return True

    def incr(self, key: bytes, delta: int) -> int:
        """Add ``delta`` to the decimal integer at ``key`` (missing: 0) and return the result.

        The key keeps its TTL (Redis INCR). Raises NotInteger, changing nothing, if the
        value is not a canonical signed 64-bit decimal or the result would overflow.
        """
        if not _I64_MIN <= delta <= _I64_MAX:
            raise ValueError(f"delta must fit in a signed 64-bit integer, got {delta}")
        entry = self._live(key)
        if entry is None:
            result = delta
        else:
            raw = entry.value
            if len(raw) > _MAX_INT_LEN or _match_int(raw) is None:
                raise NotInteger("value is not an integer or out of range")
            current = int(raw)
            if not _I64_MIN <= current <= _I64_MAX:
                raise NotInteger("value is not an integer or out of range")
            result = current + delta
        if not _I64_MIN <= result <= _I64_MAX:
            raise NotInteger("increment would overflow")
        self._update(key, entry, b"%d" % result)
        return result

    def append(self, key: bytes, value: bytes, max_len: int | None = None) -> int:
        """Append ``value`` to the value at ``key`` (missing: created without TTL); returns the new length.

        The key keeps its TTL and gets a new version (Redis APPEND). Raises TooLarge, changing
        nothing, if the result would be longer than ``max_len`` (the daemon's max_value_bytes:
        no append can grow a value past what one SET may store), and OutOfMemory as SET does.
        The value is copied whole: appending is O(length), not amortised O(appended).
        """
        entry = self._live(key)
        old = b"" if entry is None else entry.value
        length = len(old) + len(value)
        if max_len is not None and length > max_len:
            raise TooLarge(f"append would make the value {length} bytes; the limit is {max_len} (max_value_bytes)")
        self._update(key, entry, old + value)
        return length

    def _update(self, key: bytes, entry: _Entry | None, value: bytes) -> None:
        """Write a new value that keeps the key's TTL (INCR, APPEND): a missing key is created without one."""
        self._reserve(key, entry, value)
        if entry is None:
            self._write(key, None, value, None)
            return
        # Not _write: that would clear the TTL.
        self._version += 1
        self.used_bytes += len(value) - len(entry.value)
        entry.value = value
        entry.version = self._version
        self._use(entry)
        self.sets += 1

    def getdel(self, key: bytes) -> bytes | None:
        """The value at ``key``, removing the key in the same step; None if it was missing."""
        entry = self._live(key)
        if entry is None:
            self.misses += 1
            return None
        self._remove(key, entry)
        self.hits += 1
        self.deletes += 1
        return entry.value

    def touch(self, key: bytes, ttl_ms: int | None = None) -> bool:
        """Whether ``key`` is live. A live key counts as accessed (LRU/LFU) and, with ``ttl_ms``, gets
        that TTL from now, as EXPIRE gives it (the version is kept). Nothing is created."""
        if ttl_ms is not None and ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be a positive number of milliseconds, got {ttl_ms}")
        entry = self._live(key)
        if entry is None:
            return False
        self._use(entry)
        if ttl_ms is not None:
            self._track(key, entry, self._clock() + ttl_ms)
        return True

    def expire(self, key: bytes, ttl_ms: int) -> bool:
        """Give a live key a TTL of ``ttl_ms`` from now (replacing any); False if missing."""
        if ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be a positive number of milliseconds, got {ttl_ms}")
        entry = self._live(key)
        if entry is None:
            return False
        self._track(key, entry, self._clock() + ttl_ms)
        return True

    def persist(self, key: bytes) -> bool:
        """Remove a live key's TTL; True if it had one."""
        entry = self._live(key)
        if entry is None or not entry.expires_at_ms:
            return False
        self._untrack(entry)
        return True

    def delete(self, key: bytes) -> bool:
        """Remove a key; True if it was live."""
        entry = self._live(key)
        if entry is None:
            return False
        self._remove(key, entry)
        self.deletes += 1
        return True

    def delete_many(self, keys: Iterable[bytes]) -> int:
        """Remove each key; returns how many were live (a duplicate key counts once)."""
        live = self._live
        remove = self._remove
        count = 0
        for key in keys:
            entry = live(key)
            if entry is not None:
                remove(key, entry)
                count += 1
        self.deletes += count
        return count

    def flush(self) -> int:
        """Remove every key; returns how many were live. Versions keep counting up (Rule 3)."""
        data = self._data
        # Only TTL keys can be stale, so counting them costs O(keys with TTL), not O(keys).
        stale = 0
        if self._ttl_keys:
            now = self._clock()
            for key in self._ttl_keys:
                if data[key].expires_at_ms <= now:
                    stale += 1
        live = len(data) - stale
        self.expired += stale
        data.clear()
        self._ttl_keys.clear()
        self._keys = []
        self._compact_at = 64
        self.used_bytes = 0
        return live

    # --- active expiry --------------------------------------------------------------

    def active_expire(self, budget_ms: int) -> int:
        """Reclaim expired keys nobody touches; returns how many were removed.

        Redis's activeExpireCycle: each round checks ``EXPIRE_SAMPLE`` random keys with a
        TTL (all of them, if there are no more than that) and reclaims the expired ones.
        Rounds repeat while more than 25% of a round's sample was expired, keys with a TTL
        remain and less than ``budget_ms`` has passed on the clock. The first round always
        runs, so a budget of 0 means one round. The clock is read once per round.
        """
        keys = self._ttl_keys
        if not keys:
            return 0
        data = self._data
        randrange = self._rng.randrange
        reclaim = self._reclaim
        start = now = self._clock()
        removed = 0
        while True:
            n = len(keys)
            expired = 0
            if n <= EXPIRE_SAMPLE:
                # Backwards, so a swap-remove only moves keys already checked.
                sampled = n
                for i in range(n - 1, -1, -1):
                    key = keys[i]
                    entry = data[key]
                    if entry.expires_at_ms <= now:
                        reclaim(key, entry)
                        expired += 1
            else:
                # With replacement: removals reshuffle the list, and a repeat is harmless.
                sampled = EXPIRE_SAMPLE
                for _ in range(EXPIRE_SAMPLE):
                    key = keys[randrange(len(keys))]
                    entry = data[key]
                    if entry.expires_at_ms <= now:
                        reclaim(key, entry)
                        expired += 1
            removed += expired
            if not keys or expired * 4 <= sampled:
                return removed
            now = self._clock()
            if now - start >= budget_ms:
                return removed

    # --- internals ------------------------------------------------------------------

    # --- snapshots (warm restart) -------------------------------------------------------

    def export(self) -> Iterator[tuple[bytes, bytes, int, int]]:
        """(key, value, expires_at_ms, version) of every live entry, for a snapshot."""
        now = self._clock()
        for key, entry in self._data.items():
            expires = entry.expires_at_ms
            if not expires or expires > now:
                yield key, entry.value, expires, entry.version

    def keys(self) -> list[bytes]:
        """Every key (live or not yet reclaimed), as a new list."""
        return list(self._data)

    def take(self, key: bytes) -> tuple[bytes, int, int] | None:
        """Remove a live entry and return (value, expires_at_ms, version); it moves to another shard."""
        entry = self._live(key)
        if entry is None:
            return None
        taken = entry.value, entry.expires_at_ms, entry.version  # before _remove clears the TTL
        self._remove(key, entry)
        return taken

    def restore(self, key: bytes, value: bytes, expires_at_ms: int, version: int) -> bool:
        """Insert an entry from a snapshot, keeping its deadline (this clock) and version.

        Returns False if it does not fit the memory bound (then nothing is written). The
        version counter moves past ``version`` so later writes still get new versions.
        """
        entry = self._live(key)
        try:
            self._reserve(key, entry, value)
        except OutOfMemory:
            return False
        self._write(key, entry, value, None)
        self.sets -= 1  # a restore is not a client SET
        entry = self._data[key]
        entry.version = version
        if version > self._version:
            self._version = version
        if expires_at_ms:
            self._track(key, entry, expires_at_ms)
        return True

    def _live(self, key: bytes) -> _Entry | None:
        """The key's entry if it is live; an expired one is reclaimed and reads as missing."""
        entry = self._data.get(key)
        if entry is None:
            return None
        expires = entry.expires_at_ms
        if expires and expires <= self._clock():
            self._reclaim(key, entry)
            return None
        return entry

    def _write(self, key: bytes, entry: _Entry | None, value: bytes, ttl_ms: int | None) -> None:
        """Store ``value`` at ``key`` (``entry``: its live entry or None) with a new version."""
        self._version = version = self._version + 1
        if entry is None:
            entry = _Entry(value, 0, version, -1, self.lru_clock)
            self._data[key] = entry
            keys = self._keys
            keys.append(key)
            if len(keys) > self._compact_at:
                self._compact_keys()
            self.used_bytes += len(key) + len(value) + ENTRY_OVERHEAD
        else:
            self.used_bytes += len(value) - len(entry.value)
            entry.value = value
            entry.version = version
            self._use(entry)
        if ttl_ms is not None:
            self._track(key, entry, self._clock() + ttl_ms)
        elif entry.ttl_index >= 0:
            self._untrack(entry)
        self.sets += 1

    def _track(self, key: bytes, entry: _Entry, expires_at_ms: int) -> None:
        if entry.ttl_index < 0:
            entry.ttl_index = len(self._ttl_keys)
            self._ttl_keys.append(key)
        entry.expires_at_ms = expires_at_ms

    def _untrack(self, entry: _Entry) -> None:
        """Drop the entry's TTL: swap-remove its key from _ttl_keys (Rule 2)."""
        keys = self._ttl_keys
        index = entry.ttl_index
        last = keys.pop()
        if index < len(keys):
            keys[index] = last
            self._data[last].ttl_index = index
        entry.ttl_index = -1
        entry.expires_at_ms = 0

    def _remove(self, key: bytes, entry: _Entry) -> None:
        if entry.ttl_index >= 0:
            self._untrack(entry)
        del self._data[key]
        self.used_bytes -= len(key) + len(entry.value) + ENTRY_OVERHEAD

    def _reclaim(self, key: bytes, entry: _Entry) -> None:
        """Remove an entry whose TTL has passed."""
        self._remove(key, entry)
        self.expired += 1

    # --- memory bound (Rule 7) --------------------------------------------------------

    def _use(self, entry: _Entry) -> None:
        """Record an access: refresh ``atime`` and count it (after decaying an idle count)."""
        now = self.lru_clock
        if now - entry.atime >= LFU_HALF_LIFE_MS:
            entry.hits >>= (now - entry.atime) // LFU_HALF_LIFE_MS
        entry.atime = now
        entry.hits += 1

    def _reserve(self, key: bytes, entry: _Entry | None, value: bytes) -> None:
        """Make room for writing ``value`` at ``key`` (``entry``: its live entry or None)."""
        size = len(key) + len(value) + ENTRY_OVERHEAD
        grow = size if entry is None else len(value) - len(entry.value)
        if grow > 0 and self.used_bytes + grow > self._limit:
            self._make_room(size, grow, (key,))

    def _reserve_many(self, items: list[tuple[bytes, bytes]]) -> bool:
        """Make room for a whole set_many before any of it is written (all or nothing).

        Returns False, having reserved nothing, for a batch that is bigger than the whole
        share under an evicting policy: then each item must make its own room as it is
        written, evicting older items of the same batch (Redis would store it all and
        evict afterwards). Raises OutOfMemory, writing nothing, if any single item is
        bigger than the share or, under noeviction, if the batch does not fit.
        """
        final = dict(items)  # a later duplicate wins, as in the write loop
        live = self._live
        grow = 0
        largest = 0
        for key, value in final.items():
            size = len(key) + len(value) + ENTRY_OVERHEAD
            largest = max(largest, size)
            entry = live(key)
            grow += size if entry is None else len(value) - len(entry.value)
        if grow > self._limit and self.policy != "noeviction":
            if largest > self._limit:
                self._make_room(largest, grow, final)  # raises: one item alone cannot fit
            return False
        if grow > 0 and self.used_bytes + grow > self._limit:
            self._make_room(largest, grow, final)
        return True

    def _make_room(self, size: int, grow: int, keep: Container[bytes]) -> None:
        """Evict until ``grow`` more bytes fit, or raise OutOfMemory having written nothing.

        ``size`` is the largest single entry being written; ``keep`` the keys being written,
        which are never evicted to make room for themselves.
        """
        limit = self._limit
        if size > limit:
            # Not an eviction storm: nothing could make this fit.
            self.oom_rejected += 1
            raise OutOfMemory(
                f"an entry of {size} bytes (key + value + {ENTRY_OVERHEAD} bytes overhead) is larger than "
                f"this shard's share of max_memory ({limit} bytes); raise max_memory or store smaller values")
        if self.policy == "noeviction":
            self.oom_rejected += 1
            raise OutOfMemory(
                f"max_memory reached: {self.used_bytes} of {limit} bytes used on this shard and "
                f"eviction_policy is noeviction; delete keys or raise max_memory")
        if self._ttl_keys:
            self._reclaim_sample(keep)
        while self.used_bytes + grow > limit:
            if not self._evict_one(keep):
                self.oom_rejected += 1
                why = "no key has a TTL (volatile-ttl)" if self.policy == "volatile-ttl" else "nothing to evict"
                raise OutOfMemory(
                    f"max_memory reached: {self.used_bytes} of {limit} bytes used on this shard and {why}")

    def _evict_one(self, keep: Container[bytes]) -> bool:
        """Evict the worst of ``EVICTION_SAMPLES`` random keys by policy; False if none qualifies.

        A sampled key that has expired is reclaimed instead (counted as expired, not
        evicted) and that is enough for one round: it freed memory.
        """
        policy = self.policy
        volatile = policy == "volatile-ttl"
        pool = self._ttl_keys if volatile else self._keys
        data = self._data
        randrange = self._rng.randrange
        wanted = 1 if policy == "allkeys-random" else EVICTION_SAMPLES
        now = self._clock()
        best_key: bytes | None = None
        best_entry: _Entry | None = None
        best_score: Any = None
        found = 0
        for _ in range(wanted * 8):
            if found >= wanted or not pool:
                break
            i = randrange(len(pool))
            key = pool[i]
            entry = data.get(key)
            if entry is None:  # a stale slot (only _keys has them, Rule 8): drop it
                last = pool.pop()
                if i < len(pool):
                    pool[i] = last
                continue
            if key in keep:
                continue
            expires = entry.expires_at_ms
            if expires and expires <= now:
                self._reclaim(key, entry)
                return True
            found += 1
            score = self._score(entry, volatile)
            if best_key is None or score < best_score:
                best_key, best_entry, best_score = key, entry, score
        if best_key is None:
            # Unlucky samples (stale slots, kept keys): fall back to the first key that qualifies.
            for key in pool:
                entry = data.get(key)
                if entry is not None and key not in keep:
                    best_key, best_entry = key, entry
                    break
            else:
                return False
        assert best_entry is not None
        self._remove(best_key, best_entry)
        self.evictions[policy] = self.evictions.get(policy, 0) + 1
        return True

    def _reclaim_sample(self, keep: Container[bytes]) -> None:
        """Expired keys are free to drop: reclaim those among EXPIRE_SAMPLE keys with a TTL.

        Not active_expire: a key in ``keep`` may expire between its caller's check and now,
        and its caller still holds its entry, so it must not be reclaimed here.
        """
        keys = self._ttl_keys
        data = self._data
        randrange = self._rng.randrange
        now = self._clock()
        for _ in range(EXPIRE_SAMPLE):
            if not keys:
                return
            key = keys[randrange(len(keys))]
            entry = data[key]
            if entry.expires_at_ms <= now and key not in keep:
                self._reclaim(key, entry)

    def _score(self, entry: _Entry, volatile: bool) -> Any:
        """Lower is evicted first."""
        if volatile:
            return entry.expires_at_ms
        policy = self.policy
        if policy == "allkeys-lfu":
            idle = self.lru_clock - entry.atime
            return (entry.hits >> max(0, idle // LFU_HALF_LIFE_MS), entry.atime)
        return entry.atime  # allkeys-lru (allkeys-random takes the first sample)

    def _compact_keys(self) -> None:
        """Rebuild ``_keys`` without stale slots (Rule 8); O(keys), amortised over as many removals."""
        self._keys = list(self._data)
        self._compact_at = 2 * len(self._keys) + 64
