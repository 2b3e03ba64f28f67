"""The per-shard key/value store: packed records in mmap'd arenas, an open-addressing index, TTLs.

Why this module is over 500 lines: it is one class whose Rules (below) tie every method to the
same structures (the index, the segments, the TTL array, ``used_bytes``, the version counter).
Eviction, expiry and segment cleaning are the code that reads and repairs all of them at once;
moved to another module they would reach into Store's private state by convention, which is
worse than length.

Theory of operation
-------------------
One worker owns one :class:`Store` and applies every op on its shard to it, one at a time
(docs/design.md, decision 2), so nothing here locks. The store does no I/O: time comes from
an injected ``clock`` (monotonic milliseconds, an ``int`` >= 0), randomness from an injected
``random.Random`` and compression from an injected codec (shardd/codec.py), so tests drive it
with a fake clock and a seeded rng.

**No Python object per entry.** A dict of ``bytes`` keys to entry objects cost 356 bytes per
100-byte value (2.47x Redis's memory, issue 12): a bytes object is 33 bytes before its first
byte, a dict slot 30-40, an int 28. Here an entry is a *record* packed into a *segment* (an
anonymous ``mmap`` of ``segment_bytes``, 1 MiB by default), found through an *index* that is one
``array('q')`` of 8-byte slots. Byte budget of one entry (key k bytes, value v bytes)::

    record header        24   kf u32 (key length | flags << 17), vlen u32, version u64,
                              meta u64 (access clock << 24 | LFU count)
    TTL extension        12   only with a TTL: deadline i64, position in the TTL array u32
    key, value          k+v   v is the stored length: compressed if that saved enough
    index slot       ~11-23   8 bytes / load factor (0.35..0.7): 16 counted
    TTL array slot        8   only with a TTL (counted in the 12 above + 8 = TTL_OVERHEAD)

so 40 bytes (``ENTRY_OVERHEAD``) plus 20 with a TTL, against ~244 for the dict of objects.
Records are byte-packed (no alignment: ``struct`` reads unaligned fields fine on x86 and ARM).
Values of ``LARGE_VALUE`` bytes or more (after compression) are kept as ``bytes`` objects in a
side list instead (the record holds their index): a segment then never wastes more than a
small record's worth at its tail, and a 512 MiB value needs no 512 MiB segment.

**The index** is linear probing over a power-of-two table. A slot is ``tag << 39 | handle + 1``
(0: empty): ``tag`` is the top 24 bits of the key's seeded xxh3_64, ``handle`` the record's
address (segment << 20 | offset). A key's home slot is the top ``bits`` of its hash, so up to
2**24 slots a slot's home is computed from its tag alone: growing the table and deleting
(backward shift, no tombstones) never read a record. Past that, homes come from re-hashing
the keys (slower, still correct). Each store hashes with a seed of its own: a shard's keys
all share something about their placement hash, and the index must not care; and keys that
arrive in another store's index order (a snapshot, a resize) would otherwise arrive sorted by
home slot and pile into one run at the front of a growing table, O(n) per insert.
A lookup is a hash, a probe and one key comparison (~1 us in CPython), small against the
~100 us of a round trip; the hot paths (GET, SET) inline it.

**Writes append; cleaning reclaims.** A new record is appended to the head segment; an
overwrite of the same size (INCR of a counter that keeps its width, a same-size SET) is made
in place, any other write appends and marks the old record dead. Dead bytes are *garbage*.
When garbage passes ``GARBAGE_FRACTION`` of the bytes written into live segments (and at
least one segment), writes pay for cleaning as they go (log-structured memory, as in
RAMCloud): the segment with the fewest live bytes is scanned from its start; its live records
are copied to the head (index slot and TTL array updated), and once scanned to its end it is
unmapped, which gives its memory back to the kernel at once. Each write scans
``CLEAN_FACTOR`` times its own size: a victim is at most 1 - GARBAGE_FRACTION live, so
scanning 8x what was written frees at least what was written, and garbage stays bounded.
The worker also cleans when idle (:meth:`Store.maintain`). Cleaning moves records, so a
handle is only valid until the next write: methods look keys up again after anything that
may evict or clean.

Expiry is the Redis model: *lazy* expiry on every read and write path, which treats an expired
key as absent and reclaims it the moment it is touched, plus *active* expiry
(:meth:`Store.active_expire`), which the worker calls between batches to reclaim keys nobody
touches. It samples the TTL array, which holds exactly the handles of records with a TTL; each
such record stores its position there so it can be swap-removed in O(1).

Memory is bounded by ``max_bytes`` (the shard's share of the daemon's ``max_memory``). A write
that would take ``used_bytes`` past it first evicts keys chosen by ``policy``; if it cannot
(``noeviction``, no key with a TTL under ``volatile-ttl``, or the entry alone is bigger than
the share) it raises OutOfMemory before anything changes. Eviction samples
``EVICTION_SAMPLES`` random index slots and drops the worst, as Redis does (maxmemory-samples 5).
``used_bytes`` counts live entries (Rule 4), as Redis's ``used_memory`` does; garbage not yet
cleaned is reported apart (``garbage_bytes``, like Redis's fragmentation) and bounded above.

Recency and frequency use a coarse clock, ``lru_clock`` (milliseconds), that the owner
refreshes with :meth:`Store.touch_clock` once per batch, as Redis refreshes its LRU clock in
serverCron: reading the real clock on every GET would break Rule 6. The LFU count is halved
for every ``LFU_HALF_LIFE_MS`` the key sat idle (Redis's LFU decay, on a linear counter that
saturates at 2**24 - 1).

Every value write (SET, CAS, INCR, APPEND, SET_MANY items) takes the next value of a per-store
counter as the entry's version, like memcached's CAS unique. TTL-only changes (EXPIRE,
PERSIST, TOUCH) keep the version, as memcached's TOUCH keeps the CAS unique: a version names a
value, and CAS compares values.

Rules
-----
Rule 1: a key is live iff it has an entry and (its deadline is 0 or > clock()). A key set
        with ``ttl_ms=100`` at t=0 is gone at t=100. No public method ever returns or acts
        on an expired entry.
Rule 2: a record has the TTL flag iff its deadline != 0 iff it sits in the TTL array at the
        position its header names. The TTL array holds no other handle.
Rule 3: versions are unique and strictly increasing within a store: the first write gets
        version 1, and a key that is deleted and written again gets a new, higher version,
        so a CAS with a version read before the delete can never succeed.
Rule 4: ``used_bytes`` is the sum over all entries (live or not yet reclaimed) of
        :func:`entry_cost` (key + stored value + ENTRY_OVERHEAD, + TTL_OVERHEAD with a TTL,
        + LARGE_OVERHEAD for a value kept aside), kept up to date on every insert, replace
        and removal; it is 0 when the store is empty.
Rule 5: an op that raises (bad argument, INCR on a non-integer or overflow) changes nothing
        visible. Reclaiming an expired entry on the way, and cleaning, are not visible.
Rule 6: the hot paths (GET, SET without TTL on a key without TTL) never read the clock.
Rule 7: after every public method ``used_bytes <= max_bytes`` unless ``max_bytes`` was lowered
        by :meth:`Store.configure` under ``noeviction`` (then writes that grow the store are
        refused until deletes bring it back under). A write refused with OutOfMemory changes
        nothing but the evictions made while trying to fit it.
Rule 8: every index slot points at a live (not dead) record whose key hashes to the slot's
        tag, and every record that is not dead is pointed at by exactly one slot. Garbage
        stays under GARBAGE_FRACTION of the written bytes plus one segment after each write.
:meth:`Store.audit` checks Rules 2, 4 and 8 (tests call it).
"""

from __future__ import annotations

import mmap
import random
import re
import struct
import sys
from array import array
from collections.abc import Callable, Container, Iterable, Iterator
from typing import Any, Protocol

from xxhash import xxh3_64_intdigest

from shardd.errors import NotInteger, OutOfMemory, TooLarge
from shardd.protocol import (
    ALWAYS,
    EXPIRE_ALWAYS,
    EXPIRE_GT,
    EXPIRE_LT,
    EXPIRE_NX,
    EXPIRE_XX,
    EXPIRE_XX_LT,
    IF_ABSENT,
    IF_PRESENT,
)

_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1

# Redis's string2ll is this strict; Python's int() would also take b" 1", b"+1", b"1_0",
# b"01" and non-ASCII digits, which would make INCR disagree with every other client.
_match_int = re.compile(rb"0|-?[1-9][0-9]*").fullmatch  # (not "-0", as string2ll)
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

# --- record layout ------------------------------------------------------------------------
_HEADER = struct.Struct("<IIQQ")  # kf, vlen, version, meta
_TTL_EXT = struct.Struct("<qI")  # deadline, position in the TTL array
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_BASE = _HEADER.size  # 24
_WITH_TTL = _BASE + _TTL_EXT.size  # 36
_KEY_MASK = (1 << 17) - 1  # keys up to 128 KiB; config allows 64 KiB
_DEAD = 1 << 17
_TTL = 2 << 17
_ASIDE = 4 << 17  # the value is in _aside; vlen is its index there
_PACKED = 8 << 17  # the value is compressed by the codec
_HITS_MAX = (1 << 24) - 1

# --- index --------------------------------------------------------------------------------
_TAG_BITS = 24
_HANDLE_BITS = 39
_HANDLE_MASK = (1 << _HANDLE_BITS) - 1
_SEG_BITS = 20  # handle = segment << 20 | offset, so a segment is at most 1 MiB
_OFFSET_MASK = (1 << _SEG_BITS) - 1
_MIN_SLOTS = 64
_MAX_LOAD = 0.7

# --- memory -------------------------------------------------------------------------------
SEGMENT_BYTES = 1 << _SEG_BITS
# Values this long or longer (as stored) live aside as bytes objects: at most 1/64 of a
# segment is lost at its tail, and big values are freed the moment they are deleted.
LARGE_VALUE = 16 * 1024
GARBAGE_FRACTION = 0.125
CLEAN_FACTOR = 8
INDEX_SHARE = 16  # bytes of index per entry: 8 bytes at the middle load factor (0.5)

ENTRY_OVERHEAD: int = _BASE + INDEX_SHARE
TTL_OVERHEAD: int = _TTL_EXT.size + 8  # the header extension and the TTL array slot
# A value kept aside: its bytes object's header and allocator rounding, and its list slot.
LARGE_OVERHEAD: int = sys.getsizeof(b"") + 16 + 8


class Codec(Protocol):
    """How the store compresses values (shardd/codec.py has the real one)."""

    min_bytes: int

    def pack(self, value: bytes) -> bytes | None:
        """The value compressed, or None if that does not save enough."""

    def unpack(self, data: bytes) -> bytes: ...

    def raw_size(self, data: bytes) -> int: ...


def entry_cost(key_len: int, stored_len: int, ttl: bool = False, aside: bool = False) -> int:
    """What one entry counts against max_bytes (Rule 4)."""
    return (ENTRY_OVERHEAD + key_len + (0 if aside else stored_len)
            + (TTL_OVERHEAD if ttl else 0) + (stored_len + LARGE_OVERHEAD if aside else 0))


class Store:
    """One shard's keys. Not thread-safe: exactly one worker loop may call it.

    Counters (plain ints, read them for stats): ``hits`` and ``misses`` count key lookups
    by get/gets/get_many/getdel/getex/setget; ``sets`` counts values written (set, setget, set_many
    and set_many_nx items, a CAS that stored, INCR, APPEND); ``deletes`` counts live keys removed by
    delete/delete_many/getdel; ``expired`` counts keys reclaimed because their TTL had passed (lazily,
    actively or by flush) or was set in the past (expire_if, getex);
    ``used_bytes`` is the accounted size (Rule 4); ``evictions`` counts keys evicted, by the
    policy that chose them; ``oom_rejected`` counts writes refused with OutOfMemory.
    Memory figures: ``arena_bytes`` (segments mapped), ``garbage_bytes`` (dead records not yet
    cleaned), ``aside_bytes`` (large values kept aside), ``index_bytes``; compression:
    ``packed_keys``, ``packed_raw_bytes`` and ``packed_bytes`` (values stored compressed now:
    their original and stored sizes).

    ``max_bytes`` (0: unlimited) and ``policy`` may be changed at any time with
    :meth:`configure`.
    """

    def __init__(self, clock: Callable[[], int], rng: random.Random | None = None,
                 max_bytes: int = 0, policy: str = "allkeys-lru", codec: Codec | None = None,
                 segment_bytes: int = SEGMENT_BYTES) -> None:
        if not 4096 <= segment_bytes <= SEGMENT_BYTES:
            raise ValueError(f"segment_bytes must be between 4096 and {SEGMENT_BYTES}, got {segment_bytes}")
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        # A seed of its own per store (see "The index" above); from the rng, so a seeded store
        # is reproducible.
        self._seed = self._rng.getrandbits(64)
        self._codec = codec
        self._seg_size = segment_bytes
        self._large = min(LARGE_VALUE, segment_bytes // 16)
        self._version = 0
        self.lru_clock = clock()
        self.hits = 0
        self.misses = 0
        self.sets = 0
        self.deletes = 0
        self.expired = 0
        self.evictions: dict[str, int] = {}
        self.oom_rejected = 0
        # Called with each key removed without an op naming it (active expiry, eviction), before it
        # goes: the worker tells near-cache clients that hold it (shardd.hot_marks, Rule 2).
        self.vanishing: Callable[[bytes], None] | None = None
        self.max_bytes = 0
        self.policy = "allkeys-lru"
        self._limit = sys.maxsize
        self._reset()
        self.configure(max_bytes, policy)

    def _hash(self, key: bytes) -> int:
        return xxh3_64_intdigest(key, self._seed)

    def _reset(self) -> None:
        self._table = array("q", bytes(8 * _MIN_SLOTS))
        self._bits = _MIN_SLOTS.bit_length() - 1
        self._shift = 64 - self._bits
        self._mask = _MIN_SLOTS - 1
        self._grow_at = int(_MIN_SLOTS * _MAX_LOAD)
        self._count = 0
        self._segs: list[mmap.mmap | None] = []
        self._seg_used: list[int] = []  # bytes appended (dead or alive)
        self._seg_live: list[int] = []  # bytes of records not dead
        self._free_segs: list[int] = []
        self._head = -1
        self._head_pos = 0
        self._written = 0  # sum of _seg_used over mapped segments
        self._garbage = 0
        self._victim = -1
        self._victim_pos = 0
        self._ttl = array("q")
        self._aside: list[bytes | None] = []
        self._aside_free: list[int] = []
        self.aside_bytes = 0
        self.used_bytes = 0
        self.packed_keys = 0
        self.packed_bytes = 0
        self.packed_raw_bytes = 0

    def configure(self, max_bytes: int | None = None, policy: str | None = None,
                  codec: Codec | bool | None = False) -> int:
        """Change the memory limit, eviction policy and/or codec (None: no compression; the
        default False leaves it); returns how many keys were evicted.

        Lowering ``max_bytes`` below ``used_bytes`` evicts down to it at once (by the new
        policy); under ``noeviction`` nothing is evicted and writes that grow the store are
        refused until it is back under the limit. A new codec applies to values written from
        now on; values already stored stay as they are (both kinds are read alike).
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
        if codec is not False:
            self._codec = codec  # type: ignore[assignment]
        evicted = 0
        if self.policy != "noeviction":
            while self.used_bytes > self._limit and self._evict_one(()):
                evicted += 1
        self._clean(0)
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
        return self._count

    @property
    def expiring(self) -> int:
        """Number of entries with a TTL (Redis INFO's ``expires``), including unreclaimed ones."""
        return len(self._ttl)

    @property
    def arena_bytes(self) -> int:
        """Bytes written into mapped segments (dead or alive): what the records really occupy."""
        return self._written

    @property
    def garbage_bytes(self) -> int:
        return self._garbage

    @property
    def index_bytes(self) -> int:
        return 8 * (len(self._table) + len(self._ttl))

    # --- lookups ----------------------------------------------------------------------

    def _find(self, key: bytes, h: int) -> tuple[int, int]:
        """(slot, handle) of ``key``; handle -1 and the empty slot where it would go if absent."""
        table, mask, segs = self._table, self._mask, self._segs
        tag = h >> 40
        klen = len(key)
        i = h >> self._shift
        while True:
            s = table[i]
            if not s:
                return i, -1
            if s >> _HANDLE_BITS == tag:
                hd = (s & _HANDLE_MASK) - 1
                seg = segs[hd >> _SEG_BITS]
                p = hd & _OFFSET_MASK
                kf = _U32.unpack_from(seg, p)[0]  # type: ignore[arg-type]
                if kf & _KEY_MASK == klen:
                    k = p + (_WITH_TTL if kf & _TTL else _BASE)
                    if seg[k:k + klen] == key:  # type: ignore[index]
                        return i, hd
            i = (i + 1) & mask

    def _live(self, key: bytes) -> tuple[int, int]:
        """(slot, handle) of ``key`` if live; an expired entry is reclaimed and reads as missing."""
        h = self._hash(key)
        i, hd = self._find(key, h)
        if hd >= 0 and self._expires(hd) and self._expires(hd) <= self._clock():
            self._delete_at(i, hd)
            self.expired += 1
            return self._find(key, h)[0], -1
        return i, hd

    def _expires(self, hd: int) -> int:
        seg = self._segs[hd >> _SEG_BITS]
        p = hd & _OFFSET_MASK
        if _U32.unpack_from(seg, p)[0] & _TTL:  # type: ignore[arg-type]
            return _I64.unpack_from(seg, p + _BASE)[0]  # type: ignore[arg-type]
        return 0

    def _version_of(self, hd: int) -> int:
        return _U64.unpack_from(self._segs[hd >> _SEG_BITS], (hd & _OFFSET_MASK) + 8)[0]  # type: ignore[arg-type]

    def _value(self, hd: int) -> bytes:
        """The value the client wrote (decompressed, fetched from aside)."""
        seg = self._segs[hd >> _SEG_BITS]
        p = hd & _OFFSET_MASK
        kf, vlen = _U32.unpack_from(seg, p)[0], _U32.unpack_from(seg, p + 4)[0]  # type: ignore[arg-type]
        if kf & _ASIDE:
            data = self._aside[vlen]
        else:
            v = p + (_WITH_TTL if kf & _TTL else _BASE) + (kf & _KEY_MASK)
            data = seg[v:v + vlen]  # type: ignore[index]
        if kf & _PACKED:
            return self._unpack(data)  # type: ignore[arg-type]
        return data  # type: ignore[return-value]

    def _unpack(self, data: bytes) -> bytes:
        return self._reading_codec().unpack(data)

    def _key_at(self, hd: int) -> bytes:
        seg = self._segs[hd >> _SEG_BITS]
        p = hd & _OFFSET_MASK
        kf = _U32.unpack_from(seg, p)[0]  # type: ignore[arg-type]
        k = p + (_WITH_TTL if kf & _TTL else _BASE)
        return seg[k:k + (kf & _KEY_MASK)]  # type: ignore[index,return-value]

    def _touch(self, hd: int) -> None:
        """Record an access: refresh the access clock and count it (after decaying an idle count)."""
        seg = self._segs[hd >> _SEG_BITS]
        p = (hd & _OFFSET_MASK) + 16
        meta = _U64.unpack_from(seg, p)[0]  # type: ignore[arg-type]
        now = self.lru_clock
        hits = meta & _HITS_MAX
        idle = now - (meta >> 24)
        if idle >= LFU_HALF_LIFE_MS:
            hits >>= idle // LFU_HALF_LIFE_MS
        _U64.pack_into(seg, p, now << 24 | (hits + 1 if hits < _HITS_MAX else hits))  # type: ignore[arg-type]

    # --- reads ----------------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        # _find, _expires, _touch and _value inlined: this is the hot path (Rule 6).
        h = xxh3_64_intdigest(key, self._seed)
        table, mask, segs = self._table, self._mask, self._segs
        tag = h >> 40
        klen = len(key)
        i = h >> self._shift
        while True:
            s = table[i]
            if not s:
                self.misses += 1
                return None
            if s >> _HANDLE_BITS == tag:
                hd = (s & _HANDLE_MASK) - 1
                seg = segs[hd >> _SEG_BITS]
                p = hd & _OFFSET_MASK
                kf, vlen, _, meta = _HEADER.unpack_from(seg, p)  # type: ignore[arg-type]
                if kf & _KEY_MASK == klen:
                    if kf & _TTL:
                        k = p + _WITH_TTL
                        if seg[k:k + klen] == key:  # type: ignore[index]
                            expires = _I64.unpack_from(seg, p + _BASE)[0]  # type: ignore[arg-type]
                            if expires <= self._clock():
                                self._delete_at(i, hd)
                                self.expired += 1
                                self.misses += 1
                                return None
                            break
                    else:
                        k = p + _BASE
                        if seg[k:k + klen] == key:  # type: ignore[index]
                            break
            i = (i + 1) & mask
        now = self.lru_clock
        hits = meta & _HITS_MAX
        idle = now - (meta >> 24)
        if idle >= LFU_HALF_LIFE_MS:
            hits >>= idle // LFU_HALF_LIFE_MS
        _U64.pack_into(seg, p + 16, now << 24 | (hits + 1 if hits < _HITS_MAX else hits))  # type: ignore[arg-type]
        self.hits += 1
        if kf & (_ASIDE | _PACKED):
            return self._value(hd)
        v = k + klen
        return seg[v:v + vlen]  # type: ignore[index,no-any-return]

    def gets(self, key: bytes) -> tuple[bytes, int] | None:
        """The value and its version (the CAS token), or None if the key is missing."""
        _, hd = self._live(key)
        if hd < 0:
            self.misses += 1
            return None
        self._touch(hd)
        self.hits += 1
        return self._value(hd), self._version_of(hd)

    def get_many(self, keys: Iterable[bytes]) -> list[bytes | None]:
        """Values in the order of ``keys``; None for each missing key."""
        # get() inlined with its lookups hoisted out of the loop: a batch is where a GET's
        # fixed costs add up (~0.5 us a key saved against calling get()).
        hash_, seed = xxh3_64_intdigest, self._seed
        table, mask, segs, shift = self._table, self._mask, self._segs, self._shift
        unpack_header, pack_meta = _HEADER.unpack_from, _U64.pack_into
        now = self.lru_clock
        out: list[bytes | None] = []
        append = out.append
        hits = 0
        for key in keys:
            h = hash_(key, seed)
            tag = h >> 40
            klen = len(key)
            i = h >> shift
            while True:
                s = table[i]
                if not s:
                    hd = -1
                    break
                if s >> _HANDLE_BITS == tag:
                    hd = (s & _HANDLE_MASK) - 1
                    seg = segs[hd >> _SEG_BITS]
                    p = hd & _OFFSET_MASK
                    kf, vlen, _, meta = unpack_header(seg, p)  # type: ignore[arg-type]
                    if kf & _KEY_MASK == klen:
                        k = p + (_WITH_TTL if kf & _TTL else _BASE)
                        if seg[k:k + klen] == key:  # type: ignore[index]
                            break
                i = (i + 1) & mask
            if hd < 0:
                append(None)
                continue
            if kf & (_TTL | _ASIDE | _PACKED):  # the rare kinds: get() knows them all
                counted = self.hits, self.misses  # get() counts its lookup; the batch counts its own
                value = self.get(key)
                self.hits, self.misses = counted
                table, segs = self._table, self._segs  # an expired key was reclaimed: may have moved
                mask, shift = self._mask, self._shift
            else:
                count = meta & _HITS_MAX
                idle = now - (meta >> 24)
                if idle >= LFU_HALF_LIFE_MS:
                    count >>= idle // LFU_HALF_LIFE_MS
                pack_meta(seg, p + 16, now << 24 | (count + 1 if count < _HITS_MAX else count))  # type: ignore[arg-type]
                v = k + klen
                value = seg[v:v + vlen]  # type: ignore[index]
            if value is None:
                append(None)
            else:
                hits += 1
                append(value)
        self.hits += hits
        self.misses += len(out) - hits
        return out

    def exists(self, key: bytes) -> bool:
        return self._live(key)[1] >= 0

    def ttl(self, key: bytes) -> int:
        """Milliseconds left (>= 1) for a live key with a TTL; -1 if it has none; -2 if missing.

        The clock is integral and a live key has a deadline > now (Rule 1), so the
        difference is already the ceiling and never 0 (Redis PTTL convention).
        """
        _, hd = self._live(key)
        if hd < 0:
            return -2
        expires = self._expires(hd)
        if not expires:
            return -1
        return expires - self._clock()

    # --- writes ---------------------------------------------------------------------

    def set(self, key: bytes, value: bytes, ttl_ms: int | None = None, cond: int = ALWAYS) -> bool:
        """Store ``value``; returns whether it stored (cond IF_ABSENT/IF_PRESENT may refuse).

        Without ``ttl_ms`` any previous TTL is cleared (Redis SET semantics).
        """
        if ttl_ms is not None and ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be a positive number of milliseconds, got {ttl_ms}")
        if cond and cond not in (IF_ABSENT, IF_PRESENT):
            raise ValueError(f"cond must be ALWAYS, IF_ABSENT or IF_PRESENT (0, 1, 2), got {cond!r}")
        h = self._hash(key)
        i, hd = self._find(key, h)
        if hd >= 0:
            expires = self._expires(hd)
            if expires and expires <= self._clock():
                self._delete_at(i, hd)
                self.expired += 1
                i, hd = self._find(key, h)
        if cond:
            if cond == IF_ABSENT:
                if hd >= 0:
                    return False
            elif hd < 0:
                return False
        expires = self._clock() + ttl_ms if ttl_ms is not None else 0
        codec = self._codec
        plain = len(value) < (self._large if codec is None else min(self._large, codec.min_bytes))
        if hd >= 0 and plain and not expires and self._overwrite_plain(i, hd, value):
            self._clean(len(value) + len(key) + _BASE)
            return True
        if hd < 0 and plain:
            # A new key whose value is stored as it is: _write's common case, without its branches.
            cost = entry_cost(len(key), len(value), expires != 0)
            if self.used_bytes + cost > self._limit and self._make_room(cost, cost, (key,)):
                i = self._find(key, h)[0]
            if self._count >= self._grow_at:
                self._grow()
                i = self._find(key, h)[0]
            self._version += 1
            self._append_plain(key, h, i, value, expires, self._version, cost)
            self.sets += 1
            return True
        self._write(key, h, i, hd, value, expires)
        self._clean(len(value) + len(key) + _BASE)
        return True

    def set_many(self, items: Iterable[tuple[bytes, bytes]], ttl_ms: int | None = None) -> int:
        """SET each (key, value) in order (later duplicates win); returns how many were stored."""
        if ttl_ms is not None and ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be a positive number of milliseconds, got {ttl_ms}")
        items = list(items)
        self._set_items(items, ttl_ms, each=not self._reserve_many(items, ttl_ms is not None))
        return len(items)

    def set_many_nx(self, items: Iterable[tuple[bytes, bytes]], ttl_ms: int | None = None) -> bool:
        """SET every (key, value) only if none of the keys is live: all or nothing (Redis MSETNX).

        Returns whether it stored. A later duplicate wins, as in set_many. Raises OutOfMemory,
        writing nothing, if the items do not fit: unlike set_many, a batch larger than the whole
        share is refused rather than stored while evicting its own first items, so that a True
        answer always means every item was written.
        """
        if ttl_ms is not None and ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be a positive number of milliseconds, got {ttl_ms}")
        items = list(items)
        live = self._live
        if any(live(key)[1] >= 0 for key, _ in items):  # (reclaims expired ones on the way: Rule 5)
            return False
        self._reserve_many(items, ttl_ms is not None, whole=True)
        self._set_items(items, ttl_ms, each=False)
        return True

    def _set_items(self, items: list[tuple[bytes, bytes]], ttl_ms: int | None, each: bool) -> None:
        """set_many's write loop; ``each``: the batch was not reserved whole, every item makes its own room."""
        ttl = ttl_ms is not None
        clock = self._clock
        find, hash_ = self._find, self._hash
        write = self._write
        codec = self._codec
        plain_below = min(self._large, codec.min_bytes if codec is not None else self._large)
        extra = TTL_OVERHEAD if ttl else 0
        written = 0
        for key, value in items:
            h = hash_(key)
            i, hd = find(key, h)
            if hd >= 0:
                expires = self._expires(hd)
                if expires and expires <= clock():
                    self._delete_at(i, hd)
                    self.expired += 1
                    i, hd = find(key, h)
            if each and self._reserve(key, hd, value, ttl):
                i, hd = find(key, h)
            deadline = clock() + ttl_ms if ttl_ms is not None else 0
            if hd >= 0 and not deadline and len(value) < plain_below and self._overwrite_plain(i, hd, value):
                pass
            elif hd < 0 and len(value) < plain_below:
                if self._count >= self._grow_at:
                    self._grow()
                    i = find(key, h)[0]
                self._version += 1
                self._append_plain(key, h, i, value, deadline, self._version,
                                   ENTRY_OVERHEAD + len(key) + len(value) + extra)
                self.sets += 1
            else:
                write(key, h, i, hd, value, deadline, reserved=True)
            written += len(key) + len(value) + _BASE
        self._clean(written)

    def cas(self, key: bytes, value: bytes, version: int, ttl_ms: int | None = None) -> bool | None:
        """Store ``value`` only if the key's version is still ``version``.

        Returns None if the key is missing, False if the version is stale (nothing
        changes), True if stored. Like SET, no ``ttl_ms`` clears the TTL.
        """
        if ttl_ms is not None and ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be a positive number of milliseconds, got {ttl_ms}")
        h = self._hash(key)
        i, hd = self._live(key)
        if hd < 0:
            return None
        if self._version_of(hd) != version:
            return False
        self._write(key, h, i, hd, value, self._clock() + ttl_ms if ttl_ms is not None else 0)
        self._clean(len(value) + len(key) + _BASE)
        return True

    def incr(self, key: bytes, delta: int) -> int:
        """Add ``delta`` to the decimal integer at ``key`` (missing: 0) and return the result.

        The key keeps its TTL (Redis INCR). Raises NotInteger, changing nothing, if the
        value is not a canonical signed 64-bit decimal or the result would overflow.
        """
        if not _I64_MIN <= delta <= _I64_MAX:
            raise ValueError(f"delta must fit in a signed 64-bit integer, got {delta}")
        i, hd = self._live(key)
        if hd < 0:
            result = delta
        else:
            raw = self._value(hd)
            if len(raw) > _MAX_INT_LEN or _match_int(raw) is None:
                raise NotInteger("value is not an integer or out of range")
            current = int(raw)
            if not _I64_MIN <= current <= _I64_MAX:
                raise NotInteger("value is not an integer or out of range")
            result = current + delta
        if not _I64_MIN <= result <= _I64_MAX:
            raise NotInteger("increment would overflow")
        self._update(key, i, hd, b"%d" % result)
        return result

    def append(self, key: bytes, value: bytes, max_len: int | None = None) -> int:
        """Append ``value`` to the value at ``key`` (missing: created without TTL); returns the new length.

        The key keeps its TTL and gets a new version (Redis APPEND). Raises TooLarge, changing
        nothing, if the result would be longer than ``max_len`` (the daemon's max_value_bytes:
        no append can grow a value past what one SET may store), and OutOfMemory as SET does.
        The value is copied whole: appending is O(length), not amortised O(appended).
        """
        i, hd = self._live(key)
        old = b"" if hd < 0 else self._value(hd)
        length = len(old) + len(value)
        if max_len is not None and length > max_len:
            raise TooLarge(f"append would make the value {length} bytes; the limit is {max_len} (max_value_bytes)")
        self._update(key, i, hd, old + value)
        return length

    def _update(self, key: bytes, i: int, hd: int, value: bytes) -> None:
        """Write a new value that keeps the key's TTL (INCR, APPEND): a missing key is created without one."""
        expires = self._expires(hd) if hd >= 0 else 0
        self._write(key, self._hash(key), i, hd, value, expires)
        self._clean(len(value) + len(key) + _BASE)

    def getdel(self, key: bytes) -> bytes | None:
        """The value at ``key``, removing the key in the same step; None if it was missing."""
        i, hd = self._live(key)
        if hd < 0:
            self.misses += 1
            return None
        value = self._value(hd)
        self._delete_at(i, hd)
        self.hits += 1
        self.deletes += 1
        return value

    def touch(self, key: bytes, ttl_ms: int | None = None) -> bool:
        """Whether ``key`` is live. A live key counts as accessed (LRU/LFU) and, with ``ttl_ms``, gets
        that TTL from now, as EXPIRE gives it (the version is kept). Nothing is created."""
        if ttl_ms is not None and ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be a positive number of milliseconds, got {ttl_ms}")
        i, hd = self._live(key)
        if hd < 0:
            return False
        self._touch(hd)
        if ttl_ms is not None:
            self._set_deadline(key, i, hd, self._clock() + ttl_ms)
        return True

    def expire(self, key: bytes, ttl_ms: int) -> bool:
        """Give a live key a TTL of ``ttl_ms`` from now (replacing any); False if missing."""
        if ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be a positive number of milliseconds, got {ttl_ms}")
        i, hd = self._live(key)
        if hd < 0:
            return False
        self._set_deadline(key, i, hd, self._clock() + ttl_ms)
        return True

    def persist(self, key: bytes) -> bool:
        """Remove a live key's TTL; True if it had one."""
        i, hd = self._live(key)
        if hd < 0 or not self._expires(hd):
            return False
        self._set_deadline(key, i, hd, 0)
        return True

    # --- Redis-exact variants (SET … GET / KEEPTTL, EXPIRE NX|XX|GT|LT, GETEX, STRLEN) ----------

    def setget(self, key: bytes, value: bytes, ttl_ms: int | None = None, cond: int = ALWAYS,
               keep_ttl: bool = False) -> bytes | None:
        """Store ``value`` as :meth:`set` does under ``cond`` and return the value it replaced (None if missing).

        The old value is returned whether or not ``cond`` let the write happen (Redis ``SET … NX|XX GET``,
        ``GETSET``). ``keep_ttl``: the key keeps its TTL (``KEEPTTL``; a missing key is created
        without one), only without ``ttl_ms``; otherwise no ``ttl_ms`` clears the TTL. Counts a
        lookup (hit or miss) as GET does, and OutOfMemory changes nothing, as in SET.
        """
        if ttl_ms is not None and ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be a positive number of milliseconds, got {ttl_ms}")
        if keep_ttl and ttl_ms is not None:
            raise ValueError("keep_ttl keeps the key's TTL: it cannot go with a new ttl_ms")
        if cond and cond not in (IF_ABSENT, IF_PRESENT):
            raise ValueError(f"cond must be ALWAYS, IF_ABSENT or IF_PRESENT (0, 1, 2), got {cond!r}")
        i, hd = self._live(key)
        old = None if hd < 0 else self._value(hd)
        if not ((cond == IF_ABSENT and hd >= 0) or (cond == IF_PRESENT and hd < 0)):
            if keep_ttl:
                expires = self._expires(hd) if hd >= 0 else 0
            else:
                expires = self._clock() + ttl_ms if ttl_ms is not None else 0
            self._write(key, self._hash(key), i, hd, value, expires)  # OutOfMemory: nothing counted either
            self._clean(len(value) + len(key) + _BASE)
        if old is None:
            self.misses += 1
        else:
            self.hits += 1
        return old

    def expire_if(self, key: bytes, ttl_ms: int, when: int = EXPIRE_ALWAYS) -> bool:
        """Give a live key a deadline ``ttl_ms`` from now if ``when`` allows it; whether it did (Redis EXPIRE's flags).

        ``when``: EXPIRE_ALWAYS; EXPIRE_NX only if the key has no TTL; EXPIRE_XX only if it has
        one; EXPIRE_GT / EXPIRE_LT only if the new deadline is later / earlier than the current
        one, where no TTL counts as an infinite deadline (so GT never applies to such a key and LT
        always does); EXPIRE_XX_LT only if it has a TTL and the new deadline is earlier (XX with GT
        is GT already). ``ttl_ms`` may be <= 0: if the condition holds the key is deleted at once
        (counted as expired, as Redis counts it) and the answer is True. False if missing.
        The version is kept, as EXPIRE keeps it.
        """
        if not EXPIRE_ALWAYS <= when <= EXPIRE_XX_LT:
            raise ValueError(f"when must be 0 (always), 1 (NX), 2 (XX), 3 (GT), 4 (LT) or 5 (XX LT), got {when!r}")
        i, hd = self._live(key)
        if hd < 0:
            return False
        current = self._expires(hd)  # 0: no TTL, an infinite deadline
        deadline = self._clock() + ttl_ms
        if when == EXPIRE_NX:
            applies = not current
        elif when == EXPIRE_XX:
            applies = bool(current)
        elif when == EXPIRE_GT:
            applies = bool(current) and deadline > current
        elif when == EXPIRE_LT:
            applies = not current or deadline < current
        elif when == EXPIRE_XX_LT:
            applies = bool(current) and deadline < current
        else:
            applies = True
        if not applies:
            return False
        if ttl_ms <= 0:
            self._delete_at(i, hd)
            self.expired += 1
        else:
            self._set_deadline(key, i, hd, deadline)
        return True

    def getex(self, key: bytes, ttl_ms: int | None = None, persist: bool = False) -> bytes | None:
        """The value at ``key`` (None if missing), changing its TTL in the same step (Redis GETEX).

        ``ttl_ms`` > 0: the TTL becomes ``ttl_ms`` from now; ``ttl_ms`` <= 0: the key is deleted
        after it is read (counted as expired: GETEX with a deadline in the past); ``persist``: the
        TTL is removed; neither: the TTL is left as it is. Counts as a lookup and an access, as GET.
        """
        if ttl_ms is not None and persist:
            raise ValueError("getex: ttl_ms and persist exclude each other")
        i, hd = self._live(key)
        if hd < 0:
            self.misses += 1
            return None
        self._touch(hd)
        self.hits += 1
        value = self._value(hd)
        if ttl_ms is not None:
            if ttl_ms <= 0:
                self._delete_at(i, hd)
                self.expired += 1
            else:
                self._set_deadline(key, i, hd, self._clock() + ttl_ms)
        elif persist:
            self._set_deadline(key, i, hd, 0)
        return value

    def strlen(self, key: bytes) -> int:
        """The length of the value at ``key`` as the client wrote it; 0 if missing (Redis STRLEN).

        Not a lookup for the counters and not an access, like ``exists``. A compressed value is
        measured from its frame header (the codec's ``raw_size``); only a frame that does not
        record its size is decompressed.
        """
        _, hd = self._live(key)
        if hd < 0:
            return 0
        seg = self._segs[hd >> _SEG_BITS]
        p = hd & _OFFSET_MASK
        kf, vlen = _U32.unpack_from(seg, p)[0], _U32.unpack_from(seg, p + 4)[0]  # type: ignore[arg-type]
        if not kf & _PACKED:
            return len(self._aside[vlen]) if kf & _ASIDE else vlen  # type: ignore[arg-type]
        data = self._stored(kf, vlen, seg, p)
        codec = self._reading_codec()
        size = codec.raw_size(data)
        return size if size >= 0 else len(codec.unpack(data))

    def delete(self, key: bytes) -> bool:
        """Remove a key; True if it was live."""
        i, hd = self._live(key)
        if hd < 0:
            return False
        self._delete_at(i, hd)
        self.deletes += 1
        return True

    def delete_many(self, keys: Iterable[bytes]) -> int:
        """Remove each key; returns how many were live (a duplicate key counts once)."""
        delete = self.delete
        return sum(1 for key in keys if delete(key))

    def flush(self) -> int:
        """Remove every key; returns how many were live. Versions keep counting up (Rule 3)."""
        now = self._clock()
        stale = sum(1 for hd in self._ttl if self._expires(hd) <= now)
        live = self._count - stale
        self.expired += stale
        for seg in self._segs:
            if seg is not None:
                seg.close()
        self._reset()
        return live

    # --- active expiry and cleaning --------------------------------------------------

    def active_expire(self, budget_ms: int) -> int:
        """Reclaim expired keys nobody touches; returns how many were removed.

        Redis's activeExpireCycle: each round checks ``EXPIRE_SAMPLE`` random keys with a
        TTL (all of them, if there are no more than that) and reclaims the expired ones.
        Rounds repeat while more than 25% of a round's sample was expired, keys with a TTL
        remain and less than ``budget_ms`` has passed on the clock. The first round always
        runs, so a budget of 0 means one round. The clock is read once per round.
        """
        handles = self._ttl
        if not handles:
            return 0
        randrange = self._rng.randrange
        start = now = self._clock()
        removed = 0
        while True:
            n = len(handles)
            expired = 0
            if n <= EXPIRE_SAMPLE:
                # Backwards, so a swap-remove only moves handles already checked.
                sampled = n
                for j in range(n - 1, -1, -1):
                    if self._reclaim_if_expired(handles[j], now):
                        expired += 1
            else:
                # With replacement: removals reshuffle the array, and a repeat is harmless.
                sampled = EXPIRE_SAMPLE
                for _ in range(EXPIRE_SAMPLE):
                    if self._reclaim_if_expired(handles[randrange(len(handles))], now):
                        expired += 1
            removed += expired
            if not handles or expired * 4 <= sampled:
                return removed
            now = self._clock()
            if now - start >= budget_ms:
                return removed

    def maintain(self, budget_bytes: int = 64 * 1024) -> None:
        """Cleaning between batches: scan up to ``budget_bytes`` of victim segments while garbage is over its bound."""
        self._clean(budget_bytes // CLEAN_FACTOR)

    def _reclaim_if_expired(self, hd: int, now: int) -> bool:
        if self._expires(hd) > now:
            return False
        self._vanish(hd)
        self.expired += 1
        return True

    # --- snapshots and resize ----------------------------------------------------------

    def _handles(self) -> Iterator[int]:
        for s in self._table:
            if s:
                yield (s & _HANDLE_MASK) - 1

    def export(self) -> Iterator[tuple[bytes, bytes, int, int]]:
        """(key, value, deadline, version) of every live entry, for a snapshot (do not write meanwhile).

        Walks the segments in address order rather than the index in hash order: sequential
        reads, ~4x faster on 250k entries in a loaded worker than hopping across memory.
        """
        now = self._clock()
        aside = self._aside
        unpack_header, unpack_ttl = _HEADER.unpack_from, _TTL_EXT.unpack_from
        for index, seg in enumerate(self._segs):
            if seg is None:
                continue
            p, end = 0, self._seg_used[index]
            while p < end:
                kf, vlen, version, _ = unpack_header(seg, p)
                if kf & _TTL:
                    expires = unpack_ttl(seg, p + _BASE)[0]
                    k = p + _WITH_TTL
                else:
                    expires, k = 0, p + _BASE
                v = k + (kf & _KEY_MASK)
                p = v if kf & _ASIDE else v + vlen
                if kf & _DEAD or (expires and expires <= now):
                    continue
                value = aside[vlen] if kf & _ASIDE else seg[v:p]
                if kf & _PACKED:
                    value = self._unpack(value)  # type: ignore[arg-type]
                yield seg[k:v], value, expires, version  # type: ignore[misc]

    def keys(self) -> list[bytes]:
        """Every key (live or not yet reclaimed), as a new list."""
        key_at = self._key_at
        return [key_at(hd) for hd in self._handles()]

    def peek(self, key: bytes) -> tuple[bytes, int, int] | None:
        """A live entry's (value, deadline, version), without touching it (replication reads it)."""
        _, hd = self._live(key)
        if hd < 0:
            return None
        return self._value(hd), self._expires(hd), self._version_of(hd)

    def take(self, key: bytes) -> tuple[bytes, int, int] | None:
        """Remove a live entry and return (value, deadline, version); it moves to another shard."""
        i, hd = self._live(key)
        if hd < 0:
            return None
        taken = self._value(hd), self._expires(hd), self._version_of(hd)
        self._delete_at(i, hd)
        return taken

    def restore(self, key: bytes, value: bytes, expires_at_ms: int, version: int) -> bool:
        """Insert an entry from a snapshot, keeping its deadline (this clock) and version.

        Returns False if it does not fit the memory bound (then nothing is written). The
        version counter moves past ``version`` so later writes still get new versions.
        """
        h = self._hash(key)
        i, hd = self._live(key)
        try:
            if self._reserve(key, hd, value, expires_at_ms != 0):
                i, hd = self._find(key, h)
        except OutOfMemory:
            return False
        self._write(key, h, i, hd, value, expires_at_ms, version=version, reserved=True)
        self.sets -= 1  # a restore is not a client SET
        if version > self._version:
            self._version = version
        self._clean(len(value) + len(key) + _BASE)
        return True

    def restore_many(self, entries: Iterable[tuple[bytes, bytes, int, int]], expected: int = 0) -> int:
        """:meth:`restore` for each (key, value, deadline, version); returns how many were stored.

        A warm restart or a resize hands over hundreds of thousands of entries at once: the
        index is grown once for ``expected`` more keys up front, and each entry skips the
        checks a client write needs while the store is under its bound.
        """
        if expected:
            while self._count + expected >= self._grow_at:
                self._grow()
        find, hash_ = self._find, self._hash
        codec = self._codec
        plain_below = min(self._large, codec.min_bytes if codec is not None else self._large)
        stored = fast = 0
        top = self._version
        for key, value, expires, version in entries:
            h = hash_(key)
            i, hd = find(key, h)
            klen, vlen = len(key), len(value)
            cost = ENTRY_OVERHEAD + klen + vlen + (TTL_OVERHEAD if expires else 0)
            if hd >= 0 or vlen >= plain_below or self.used_bytes + cost > self._limit:
                stored += self.restore(key, value, expires, version)  # the general path
                continue
            if self._count >= self._grow_at:
                self._grow()
                i = find(key, h)[0]
            # Most of a snapshot: a new key whose value is stored as it is.
            self._append_plain(key, h, i, value, expires, version, cost)
            fast += 1
            if version > top:
                top = version
        if top > self._version:
            self._version = top
        self._clean(0)
        return stored + fast

    # --- the write primitive -------------------------------------------------------------

    def _overwrite_plain(self, i: int, hd: int, value: bytes) -> bool:
        """_write's common case for a live key: a value stored as it is replaces one stored as it is,
        neither with a TTL. Returns False, having done nothing, if that is not the case or the
        write needs room first (then _write does it)."""
        seg = self._segs[hd >> _SEG_BITS]
        p = hd & _OFFSET_MASK
        kf, vlen, _, meta = _HEADER.unpack_from(seg, p)  # type: ignore[arg-type]
        if kf & (_TTL | _PACKED | _ASIDE):
            return False
        grow = len(value) - vlen
        if grow > 0 and self.used_bytes + grow > self._limit:
            return False
        now = self.lru_clock
        hits = meta & _HITS_MAX
        idle = now - (meta >> 24)
        if idle >= LFU_HALF_LIFE_MS:
            hits >>= idle // LFU_HALF_LIFE_MS
        meta = now << 24 | (hits + 1 if hits < _HITS_MAX else hits)
        self._version = version = self._version + 1
        klen = kf & _KEY_MASK
        if grow:
            size = _BASE + klen + len(value)
            new = self._alloc(size)
            nseg = self._segs[new >> _SEG_BITS]
            q = new & _OFFSET_MASK
            nseg[q + _BASE:q + _BASE + klen] = seg[p + _BASE:p + _BASE + klen]  # type: ignore[index]
            _U32.pack_into(seg, p, kf | _DEAD)  # type: ignore[arg-type]
            old_size = _BASE + klen + vlen
            self._seg_live[hd >> _SEG_BITS] -= old_size
            self._garbage += old_size
            self._table[i] = (self._table[i] & ~_HANDLE_MASK) | (new + 1)
            seg, p = nseg, q
        _HEADER.pack_into(seg, p, kf, len(value), version, meta)  # type: ignore[arg-type]
        v = p + _BASE + klen
        seg[v:v + len(value)] = value  # type: ignore[index]
        self.used_bytes += grow
        self.sets += 1
        return True

    def _append_plain(self, key: bytes, h: int, i: int, value: bytes, expires: int, version: int,
                      cost: int) -> None:
        """_write for a new key (``i``: its empty slot, the index not full) whose value is stored
        as it is (not compressed, not aside) and whose room is already made: bulk loads' path."""
        klen, vlen = len(key), len(value)
        new = self._alloc((_WITH_TTL if expires else _BASE) + klen + vlen)
        seg = self._segs[new >> _SEG_BITS]
        p = new & _OFFSET_MASK
        k = p + _BASE
        if expires:
            _HEADER.pack_into(seg, p, klen | _TTL, vlen, version, self.lru_clock << 24 | 1)  # type: ignore[arg-type]
            _TTL_EXT.pack_into(seg, k, expires, len(self._ttl))  # type: ignore[arg-type]
            self._ttl.append(new)
            k += _TTL_EXT.size
        else:
            _HEADER.pack_into(seg, p, klen, vlen, version, self.lru_clock << 24 | 1)  # type: ignore[arg-type]
        seg[k:k + klen] = key  # type: ignore[index]
        seg[k + klen:k + klen + vlen] = value  # type: ignore[index]
        self._table[i] = (h >> 40) << _HANDLE_BITS | (new + 1)
        self._count += 1
        self.used_bytes += cost

    def _write(self, key: bytes, h: int, i: int, hd: int, value: bytes, expires: int,
               version: int = 0, reserved: bool = False) -> None:
        """Store ``value`` at ``key`` with deadline ``expires`` (0: none) and a new version.

        ``i``/``hd``: the key's slot and live handle (-1: absent, ``i`` its empty slot), as
        _find returned them after any reclaiming. Makes room first (for the value as it will
        be stored, compressed or not) unless the caller ``reserved`` it.
        """
        stored, flags = value, 0
        codec = self._codec
        if codec is not None and len(value) >= codec.min_bytes:
            packed = codec.pack(value)
            if packed is not None:
                stored, flags = packed, _PACKED
        if not reserved and self._reserve(key, hd, stored, expires != 0):
            i, hd = self._find(key, h)
        if not version:
            self._version = version = self._version + 1
        klen = len(key)
        aside = len(stored) >= self._large
        if aside:
            flags |= _ASIDE
        if expires:
            flags |= _TTL
        size = (_WITH_TTL if expires else _BASE) + klen + (0 if aside else len(stored))
        now = self.lru_clock
        if hd >= 0:
            seg = self._segs[hd >> _SEG_BITS]
            p = hd & _OFFSET_MASK
            kf, vlen, _, meta = _HEADER.unpack_from(seg, p)  # type: ignore[arg-type]
            old_size = self._record_size(kf, vlen)
            old_cost = self._cost(kf, vlen)
            hits = meta & _HITS_MAX
            idle = now - (meta >> 24)
            if idle >= LFU_HALF_LIFE_MS:
                hits >>= idle // LFU_HALF_LIFE_MS
            meta = now << 24 | (hits + 1 if hits < _HITS_MAX else hits)
            if kf & _PACKED:
                self._unpacked(kf, vlen, seg, p)
            if kf & _ASIDE:
                self._drop_aside(vlen)
            position = _TTL_EXT.unpack_from(seg, p + _BASE)[1] if kf & _TTL else -1  # type: ignore[arg-type]
            if old_size == size and not aside and (kf & _TTL) == (flags & _TTL):
                new = hd  # same shape: overwrite in place, the TTL array keeps its handle
            else:
                _U32.pack_into(seg, p, kf | _DEAD)  # type: ignore[arg-type]
                self._seg_live[hd >> _SEG_BITS] -= old_size
                self._garbage += old_size
                new = self._alloc(size)
                if position >= 0:
                    if expires:
                        self._ttl[position] = new
                    else:
                        self._untrack(position)
                        position = -1
        else:
            old_cost = 0
            meta = now << 24 | 1
            position = -1
            if self._count >= self._grow_at:
                self._grow()
                i = self._find(key, h)[0]
            new = self._alloc(size)
            self._count += 1
        if expires and position < 0:
            position = len(self._ttl)
            self._ttl.append(new)
        seg = self._segs[new >> _SEG_BITS]
        p = new & _OFFSET_MASK
        vfield = self._keep_aside(stored) if aside else len(stored)
        _HEADER.pack_into(seg, p, klen | flags, vfield, version, meta)  # type: ignore[arg-type]
        k = p + _BASE
        if expires:
            _TTL_EXT.pack_into(seg, k, expires, position)  # type: ignore[arg-type]
            k += _TTL_EXT.size
        seg[k:k + klen] = key  # type: ignore[index]
        if not aside:
            seg[k + klen:k + klen + len(stored)] = stored  # type: ignore[index]
        if flags & _PACKED:
            self.packed_keys += 1
            self.packed_bytes += len(stored)
            self.packed_raw_bytes += len(value)
        self._table[i] = (h >> 40) << _HANDLE_BITS | (new + 1)
        self.used_bytes += self._cost(klen | flags, vfield) - old_cost
        self.sets += 1

    def _set_deadline(self, key: bytes, i: int, hd: int, expires: int) -> None:
        """Give a live entry deadline ``expires`` (0: none), keeping its value and version."""
        seg = self._segs[hd >> _SEG_BITS]
        p = hd & _OFFSET_MASK
        kf = _U32.unpack_from(seg, p)[0]  # type: ignore[arg-type]
        if kf & _TTL and expires:
            _I64.pack_into(seg, p + _BASE, expires)  # type: ignore[arg-type]
            return
        if not kf & _TTL and not expires:
            return
        # The header changes size: rewrite the record with the same value bytes and version.
        kf, vlen, version, meta = _HEADER.unpack_from(seg, p)  # type: ignore[arg-type]
        old_size = self._record_size(kf, vlen)
        old_cost = self._cost(kf, vlen)
        k = p + (_WITH_TTL if kf & _TTL else _BASE)
        klen = kf & _KEY_MASK
        body = seg[k:k + klen + (0 if kf & _ASIDE else vlen)]  # type: ignore[index]
        if kf & _TTL:
            self._untrack(_TTL_EXT.unpack_from(seg, p + _BASE)[1])  # type: ignore[arg-type]
        _U32.pack_into(seg, p, kf | _DEAD)  # type: ignore[arg-type]
        self._seg_live[hd >> _SEG_BITS] -= old_size
        self._garbage += old_size
        kf = (kf & ~_TTL) | (_TTL if expires else 0)
        new = self._alloc(self._record_size(kf, vlen))
        seg = self._segs[new >> _SEG_BITS]
        p = new & _OFFSET_MASK
        _HEADER.pack_into(seg, p, kf, vlen, version, meta)  # type: ignore[arg-type]
        k = p + _BASE
        if expires:
            _TTL_EXT.pack_into(seg, k, expires, len(self._ttl))  # type: ignore[arg-type]
            self._ttl.append(new)
            k += _TTL_EXT.size
        seg[k:k + len(body)] = body  # type: ignore[index]
        self._table[i] = (self._table[i] & ~_HANDLE_MASK) | (new + 1)
        self.used_bytes += self._cost(kf, vlen) - old_cost
        self._clean(len(body))

    # --- records and segments -------------------------------------------------------------

    @staticmethod
    def _record_size(kf: int, vlen: int) -> int:
        return ((_WITH_TTL if kf & _TTL else _BASE) + (kf & _KEY_MASK)
                + (0 if kf & _ASIDE else vlen))

    def _cost(self, kf: int, vlen: int) -> int:
        if kf & _ASIDE:
            stored = len(self._aside[vlen])  # type: ignore[arg-type]
            return entry_cost(kf & _KEY_MASK, stored, bool(kf & _TTL), True)
        return entry_cost(kf & _KEY_MASK, vlen, bool(kf & _TTL))

    def _keep_aside(self, stored: bytes) -> int:
        self.aside_bytes += len(stored)
        if self._aside_free:
            index = self._aside_free.pop()
            self._aside[index] = stored
            return index
        self._aside.append(stored)
        return len(self._aside) - 1

    def _drop_aside(self, index: int) -> None:
        self.aside_bytes -= len(self._aside[index])  # type: ignore[arg-type]
        self._aside[index] = None
        self._aside_free.append(index)

    def _stored(self, kf: int, vlen: int, seg: Any, p: int) -> bytes:
        """The value bytes as stored (maybe compressed) of the record at ``p`` with header ``kf``, ``vlen``."""
        if kf & _ASIDE:
            return self._aside[vlen]  # type: ignore[return-value]
        v = p + (_WITH_TTL if kf & _TTL else _BASE) + (kf & _KEY_MASK)
        return seg[v:v + vlen]  # type: ignore[no-any-return]

    def _reading_codec(self) -> Codec:
        """The codec that reads packed values: values packed before compression was turned off stay packed."""
        if self._codec is None:
            from shardd.codec import default_codec
            return default_codec()
        return self._codec

    def _unpacked(self, kf: int, vlen: int, seg: Any, p: int) -> None:
        """A compressed value leaves the store: take it out of the compression figures."""
        data = self._stored(kf, vlen, seg, p)
        self.packed_keys -= 1
        self.packed_bytes -= len(data)
        self.packed_raw_bytes -= self._reading_codec().raw_size(data)

    def _alloc(self, size: int) -> int:
        """A handle for ``size`` new bytes at the head (a new segment when the head is full)."""
        if self._head < 0 or self._head_pos + size > self._seg_size:
            if self._free_segs:
                index = self._free_segs.pop()
            else:
                index = len(self._segs)
                self._segs.append(None)
                self._seg_used.append(0)
                self._seg_live.append(0)
            self._segs[index] = mmap.mmap(-1, self._seg_size)
            self._seg_used[index] = 0
            self._seg_live[index] = 0
            self._head, self._head_pos = index, 0
        hd = self._head << _SEG_BITS | self._head_pos
        self._head_pos += size
        self._seg_used[self._head] += size
        self._seg_live[self._head] += size
        self._written += size
        return hd

    def _clean(self, written: int) -> None:
        """Scan ``CLEAN_FACTOR * written`` bytes of victim segments while garbage is over its bound."""
        budget = CLEAN_FACTOR * written
        segs = self._segs
        while self._garbage > self._seg_size + GARBAGE_FRACTION * self._written:
            if self._victim < 0:
                used, live = self._seg_used, self._seg_live
                candidates = [j for j, seg in enumerate(segs)
                              if seg is not None and j != self._head and live[j] < used[j]]
                if not candidates:
                    return  # the garbage is all in the head segment: it is cleaned once sealed
                self._victim = min(candidates, key=lambda j: live[j] / used[j])
                self._victim_pos = 0
            v = self._victim
            seg = segs[v]
            p, end = self._victim_pos, self._seg_used[v]
            while p < end:
                if budget <= 0:
                    self._victim_pos = p
                    return
                kf, vlen = _U32.unpack_from(seg, p)[0], _U32.unpack_from(seg, p + 4)[0]  # type: ignore[arg-type]
                size = self._record_size(kf, vlen)
                if not kf & _DEAD:
                    self._relocate(v << _SEG_BITS | p, size)
                p += size
                budget -= size
            # Scanned to the end: every record left is dead.
            self._garbage -= self._seg_used[v]
            self._written -= self._seg_used[v]
            seg.close()  # type: ignore[union-attr]
            segs[v] = None
            self._seg_used[v] = self._seg_live[v] = 0
            self._free_segs.append(v)
            self._victim = -1

    def _relocate(self, hd: int, size: int) -> None:
        seg = self._segs[hd >> _SEG_BITS]
        p = hd & _OFFSET_MASK
        record = seg[p:p + size]  # type: ignore[index]
        new = self._alloc(size)
        nseg = self._segs[new >> _SEG_BITS]
        q = new & _OFFSET_MASK
        nseg[q:q + size] = record  # type: ignore[index]
        kf = _U32.unpack_from(record, 0)[0]
        if kf & _TTL:
            self._ttl[_TTL_EXT.unpack_from(record, _BASE)[1]] = new
        key = self._key_at(new)
        i = self._slot_of(key, hd)
        self._table[i] = (self._table[i] & ~_HANDLE_MASK) | (new + 1)
        _U32.pack_into(seg, p, kf | _DEAD)  # type: ignore[arg-type]
        self._seg_live[hd >> _SEG_BITS] -= size
        self._garbage += size

    def _slot_of(self, key: bytes, hd: int) -> int:
        """The index slot that points at handle ``hd`` (whose key is ``key``)."""
        table, mask = self._table, self._mask
        want = hd + 1
        i = self._hash(key) >> self._shift
        while table[i] & _HANDLE_MASK != want:
            i = (i + 1) & mask
        return i

    # --- index maintenance ----------------------------------------------------------------

    def _home(self, s: int) -> int:
        if self._bits <= _TAG_BITS:
            return (s >> _HANDLE_BITS) >> (_TAG_BITS - self._bits)
        return self._hash(self._key_at((s & _HANDLE_MASK) - 1)) >> self._shift

    def _grow(self) -> None:
        # Iterated as the array it is: .tolist() would allocate an int object per slot at once,
        # megabytes the allocator then keeps (RSS) long after the list is gone.
        old = self._table
        size = 2 * len(old)
        self._table = table = array("q", bytes(8 * size))
        self._bits += 1
        self._shift -= 1
        self._mask = mask = size - 1
        self._grow_at = int(size * _MAX_LOAD)
        home = self._home
        for s in old:
            if s:
                i = home(s)
                while table[i]:
                    i = (i + 1) & mask
                table[i] = s

    def _delete_at(self, i: int, hd: int) -> None:
        """Remove the entry at slot ``i`` (handle ``hd``): record dead, TTL untracked, slot freed."""
        seg = self._segs[hd >> _SEG_BITS]
        p = hd & _OFFSET_MASK
        kf, vlen = _U32.unpack_from(seg, p)[0], _U32.unpack_from(seg, p + 4)[0]  # type: ignore[arg-type]
        if kf & _TTL:
            self._untrack(_TTL_EXT.unpack_from(seg, p + _BASE)[1])  # type: ignore[arg-type]
        if kf & _PACKED:
            self._unpacked(kf, vlen, seg, p)
        self.used_bytes -= self._cost(kf, vlen)
        if kf & _ASIDE:
            self._drop_aside(vlen)
        size = self._record_size(kf, vlen)
        _U32.pack_into(seg, p, kf | _DEAD)  # type: ignore[arg-type]
        self._seg_live[hd >> _SEG_BITS] -= size
        self._garbage += size
        self._count -= 1
        # Backward-shift deletion: pull later entries of the run into the hole.
        table, mask, home = self._table, self._mask, self._home
        j = i
        while True:
            j = (j + 1) & mask
            s = table[j]
            if not s:
                break
            if (j - home(s)) & mask >= (j - i) & mask:
                table[i] = s
                i = j
        table[i] = 0
        if not self._count:
            self._release_segments()
        else:
            self._clean(size)  # deleting makes garbage as writing does: it pays for cleaning too

    def _release_segments(self) -> None:
        """The store is empty: every record is dead, so unmap every segment at once."""
        for seg in self._segs:
            if seg is not None:
                seg.close()
        self._segs, self._seg_used, self._seg_live, self._free_segs = [], [], [], []
        self._head, self._head_pos, self._written, self._garbage = -1, 0, 0, 0
        self._victim, self._victim_pos = -1, 0

    def _vanish(self, hd: int) -> None:
        """Remove an entry no op named (expiry, eviction), telling ``vanishing`` first."""
        key = self._key_at(hd)
        if self.vanishing is not None:
            self.vanishing(key)
        self._delete_at(self._slot_of(key, hd), hd)

    def _untrack(self, position: int) -> None:
        """Swap-remove position ``position`` of the TTL array (Rule 2)."""
        handles = self._ttl
        last = handles.pop()
        if position < len(handles):
            handles[position] = last
            seg = self._segs[last >> _SEG_BITS]
            _U32.pack_into(seg, (last & _OFFSET_MASK) + _BASE + 8, position)  # type: ignore[arg-type]

    # --- memory bound (Rule 7) --------------------------------------------------------

    def _reserve(self, key: bytes, hd: int, value: bytes, ttl: bool = False) -> bool:
        """Make room for storing ``value`` (as stored) at ``key`` (``hd``: its live handle or -1).

        Returns whether anything was evicted (then handles and slots may have moved).
        """
        size = entry_cost(len(key), len(value), ttl, len(value) >= self._large)
        if hd >= 0:
            seg = self._segs[hd >> _SEG_BITS]
            kf, vlen = _U32.unpack_from(seg, hd & _OFFSET_MASK)[0], _U32.unpack_from(seg, (hd & _OFFSET_MASK) + 4)[0]  # type: ignore[arg-type]
            grow = size - self._cost(kf, vlen)
        else:
            grow = size
        if grow > 0 and self.used_bytes + grow > self._limit:
            return self._make_room(size, grow, (key,)) > 0
        return False

    def _reserve_many(self, items: list[tuple[bytes, bytes]], ttl: bool, whole: bool = False) -> bool:
        """Make room for a whole set_many before any of it is written (all or nothing).

        Returns False, having reserved nothing, for a batch that is bigger than the whole
        share under an evicting policy: then each item must make its own room as it is
        written, evicting older items of the same batch (Redis would store it all and
        evict afterwards). With ``whole`` (set_many_nx) such a batch raises OutOfMemory
        instead, having evicted nothing: no eviction could make it fit. Raises OutOfMemory,
        writing nothing, if any single item is bigger than the share or, under noeviction,
        if the batch does not fit.
        """
        final = dict(items)  # a later duplicate wins, as in the write loop
        live = self._live
        grow = 0
        largest = 0
        for key, value in final.items():
            size = entry_cost(len(key), len(value), ttl, len(value) >= self._large)
            largest = max(largest, size)
            _, hd = live(key)
            if hd >= 0:
                seg = self._segs[hd >> _SEG_BITS]
                p = hd & _OFFSET_MASK
                kf, vlen = _U32.unpack_from(seg, p)[0], _U32.unpack_from(seg, p + 4)[0]  # type: ignore[arg-type]
                size -= self._cost(kf, vlen)
            grow += size
        if grow > self._limit and self.policy != "noeviction":
            if largest > self._limit:
                self._make_room(largest, grow, final)  # raises: one item alone cannot fit
            if whole:
                self.oom_rejected += 1
                raise OutOfMemory(
                    f"these items need {grow} bytes (keys + values + {ENTRY_OVERHEAD} bytes overhead each), more than "
                    f"this shard's share of max_memory ({self._limit} bytes); raise max_memory or store fewer")
            return False
        if grow > 0 and self.used_bytes + grow > self._limit:
            self._make_room(largest, grow, final)
        return True

    def _make_room(self, size: int, grow: int, keep: Container[bytes]) -> int:
        """Evict until ``grow`` more bytes fit, or raise OutOfMemory having written nothing.

        ``size`` is the largest single entry being written; ``keep`` the keys being written,
        which are never evicted to make room for themselves. Returns how many keys went.
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
        removed = 0
        if self._ttl:
            removed += self._reclaim_sample(keep)
        while self.used_bytes + grow > limit:
            if not self._evict_one(keep):
                self.oom_rejected += 1
                why = "no key has a TTL (volatile-ttl)" if self.policy == "volatile-ttl" else "nothing to evict"
                raise OutOfMemory(
                    f"max_memory reached: {self.used_bytes} of {limit} bytes used on this shard and {why}")
            removed += 1
        return removed

    def _sample(self) -> int:
        """A random occupied index slot (the first at or after a random position); -1 if empty."""
        if not self._count:
            return -1
        table, mask = self._table, self._mask
        i = self._rng.randrange(len(table))
        while not table[i]:
            i = (i + 1) & mask
        return i

    def _evict_one(self, keep: Container[bytes]) -> bool:
        """Evict the worst of ``EVICTION_SAMPLES`` random keys by policy; False if none qualifies.

        A sampled key that has expired is reclaimed instead (counted as expired, not
        evicted) and that is enough for one round: it freed memory.
        """
        policy = self.policy
        volatile = policy == "volatile-ttl"
        if volatile and not self._ttl:
            return False
        randrange = self._rng.randrange
        wanted = 1 if policy == "allkeys-random" else EVICTION_SAMPLES
        now = self._clock()
        best_hd = -1
        best_score: Any = None
        found = 0
        for _ in range(wanted * 8):
            if found >= wanted:
                break
            if volatile:
                hd = self._ttl[randrange(len(self._ttl))]
            else:
                i = self._sample()
                if i < 0:
                    return False
                hd = (self._table[i] & _HANDLE_MASK) - 1
            if self._key_at(hd) in keep:
                continue
            expires = self._expires(hd)
            if expires and expires <= now:
                self._vanish(hd)
                self.expired += 1
                return True
            found += 1
            score = self._score(hd, volatile)
            if best_hd < 0 or score < best_score:
                best_hd, best_score = hd, score
        if best_hd < 0:
            # Unlucky samples (kept keys): fall back to the first key that qualifies.
            pool = self._ttl.tolist() if volatile else list(self._handles())
            for hd in pool:
                if self._key_at(hd) not in keep:
                    best_hd = hd
                    break
            else:
                return False
        self._vanish(best_hd)
        self.evictions[policy] = self.evictions.get(policy, 0) + 1
        return True

    def _reclaim_sample(self, keep: Container[bytes]) -> int:
        """Expired keys are free to drop: reclaim those among EXPIRE_SAMPLE keys with a TTL.

        Not active_expire: a key in ``keep`` may expire between its caller's check and now,
        and its caller still holds its handle, so it must not be reclaimed here.
        """
        handles = self._ttl
        randrange = self._rng.randrange
        now = self._clock()
        removed = 0
        for _ in range(EXPIRE_SAMPLE):
            if not handles:
                break
            hd = handles[randrange(len(handles))]
            if self._expires(hd) <= now and self._key_at(hd) not in keep:
                self._vanish(hd)
                self.expired += 1
                removed += 1
        return removed

    def _score(self, hd: int, volatile: bool) -> Any:
        """Lower is evicted first."""
        if volatile:
            return self._expires(hd)
        meta = _U64.unpack_from(self._segs[hd >> _SEG_BITS], (hd & _OFFSET_MASK) + 16)[0]  # type: ignore[arg-type]
        atime = meta >> 24
        if self.policy == "allkeys-lfu":
            idle = self.lru_clock - atime
            return ((meta & _HITS_MAX) >> max(0, idle // LFU_HALF_LIFE_MS), atime)
        return atime  # allkeys-lru (allkeys-random takes the first sample)

    # --- inspection (tests, debugging) -------------------------------------------------------

    def entry(self, key: bytes) -> dict[str, Any] | None:
        """Everything stored about ``key``, expired or not, without touching it (for tests)."""
        i, hd = self._find(key, self._hash(key))
        if hd < 0:
            return None
        seg = self._segs[hd >> _SEG_BITS]
        p = hd & _OFFSET_MASK
        kf, vlen, version, meta = _HEADER.unpack_from(seg, p)  # type: ignore[arg-type]
        return {"value": self._value(hd), "version": version, "expires_at_ms": self._expires(hd),
                "atime": meta >> 24, "hits": meta & _HITS_MAX, "packed": bool(kf & _PACKED),
                "aside": bool(kf & _ASIDE), "cost": self._cost(kf, vlen), "slot": i}

    def audit(self) -> None:
        """Check Rules 2, 4 and 8 from the structures themselves; raises AssertionError."""
        used = 0
        live_per_seg = [0] * len(self._segs)
        seen = set()
        for i, s in enumerate(self._table):
            if not s:
                continue
            hd = (s & _HANDLE_MASK) - 1
            seg = self._segs[hd >> _SEG_BITS]
            assert seg is not None, f"slot {i} points into an unmapped segment"
            p = hd & _OFFSET_MASK
            kf, vlen, _, _ = _HEADER.unpack_from(seg, p)
            assert not kf & _DEAD, f"slot {i} points at a dead record"
            key = self._key_at(hd)
            assert key not in seen, f"key {key!r} indexed twice"
            seen.add(key)
            assert self._hash(key) >> 40 == s >> _HANDLE_BITS, f"slot {i}: tag does not match key {key!r}"
            assert self._find(key, self._hash(key)) == (i, hd), f"key {key!r} not found where it is"
            if kf & _TTL:
                expires, position = _TTL_EXT.unpack_from(seg, p + _BASE)
                assert expires != 0 and self._ttl[position] == hd, f"key {key!r}: TTL array out of step"
            used += self._cost(kf, vlen)
            live_per_seg[hd >> _SEG_BITS] += self._record_size(kf, vlen)
        assert len(seen) == self._count, (len(seen), self._count)
        assert len(set(self._ttl)) == len(self._ttl), "a handle twice in the TTL array"
        for hd in self._ttl:
            assert _U32.unpack_from(self._segs[hd >> _SEG_BITS], hd & _OFFSET_MASK)[0] & _TTL  # type: ignore[arg-type]
        assert used == self.used_bytes, (used, self.used_bytes)
        assert live_per_seg == [lv if self._segs[j] is not None else 0 for j, lv in enumerate(self._seg_live)]
        assert self._garbage == self._written - sum(self._seg_live), "garbage out of step"
        # Garbage is released a whole victim at a time, so it may stand one segment over its bound.
        assert self._garbage <= 2 * self._seg_size + GARBAGE_FRACTION * self._written, "garbage unbounded"
