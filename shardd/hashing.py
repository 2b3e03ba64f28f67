"""Key placement: xxh3_64 (seed 0) of the key's bytes, then jump consistent hash.

This function is part of the wire protocol (docs/protocol.md, "Placement"): every client,
the router and every worker must compute exactly the same shard for a key. Python's
``hash()`` is salted per process and must never be used for placement.
"""

from __future__ import annotations

import xxhash

# The most shards a daemon may have: one worker process per shard, and beyond a thousand
# processes on one machine the per-process memory (~25 MiB each) dominates any cache.
# Every check of a shard count (config, resize, the wire, the client, the CLI) uses this.
MAX_SHARDS = 1024

_MASK64 = 0xFFFFFFFFFFFFFFFF
_JUMP_MULTIPLIER = 2862933555777941757
_xxh3_64 = xxhash.xxh3_64_intdigest


def jump_hash(key: int, buckets: int) -> int:
    """Lamping & Veach jump consistent hash (arXiv:1406.2294), unsigned 64-bit arithmetic.

    Maps a 64-bit key to a bucket in ``[0, buckets)`` such that growing from N to N+1
    buckets moves only the keys that land in the new bucket (about 1/(N+1) of them).
    """
    if buckets <= 0:
        raise ValueError(f"buckets must be positive, got {buckets}")
    key &= _MASK64
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * _JUMP_MULTIPLIER + 1) & _MASK64
        j = int((b + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return b


def key_hash(key: bytes) -> int:
    """The 64-bit placement hash of a key: xxh3_64 with seed 0."""
    return _xxh3_64(key)


def shard_for(key: bytes, shards: int) -> int:
    """The shard that owns ``key`` when the daemon runs ``shards`` shards."""
    if shards == 1:
        return 0
    return jump_hash(_xxh3_64(key), shards)
