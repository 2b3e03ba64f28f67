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
    if shards == 2:  # the closed form (see shards_for): the common case of a 2-core machine
        return ((_xxh3_64(key) * _JUMP_MULTIPLIER + 1) & _MASK64) >> 63
    if shards == 1:
        return 0
    return jump_hash(_xxh3_64(key), shards)


def shards_for(keys: list[bytes], shards: int) -> list[int]:
    """``[shard_for(key, shards) for key in keys]``, without a Python call per key.

    Multi-key ops place every key (client, router and worker alike), so this is their hot
    path. The hashes come from one C-level ``map``; for 2 shards jump_hash has a closed form:
    its first step gives bucket 1 only if ``2**31 / ((k >> 33) + 1) < 2``, i.e. the stepped
    key ``k`` is at least 2**63, and the step after that always ends the loop (the division
    is exact enough at that boundary: tests/unit/test_hashing.py compares against shard_for).
    """
    if shards == 1:
        return [0] * len(keys)
    if shards == 2:
        return [((h * _JUMP_MULTIPLIER + 1) & _MASK64) >> 63 for h in map(_xxh3_64, keys)]
    if shards <= 0:
        raise ValueError(f"buckets must be positive, got {shards}")
    out = []
    append = out.append
    for key in map(_xxh3_64, keys):
        b, j = -1, 0
        while j < shards:
            b = j
            key = (key * _JUMP_MULTIPLIER + 1) & _MASK64
            j = int((b + 1) * (2147483648.0 / ((key >> 33) + 1)))
        append(b)
    return out


def group_positions(shards: list[int]) -> dict[int, list[int]]:
    """Shard → the positions holding it in ``shards`` (a ``shards_for`` result), in order.

    One pass whatever the shard count (a comprehension per shard would be one pass each).
    """
    groups: dict[int, list[int]] = {}
    get = groups.get
    for position, shard in enumerate(shards):
        group = get(shard)
        if group is None:
            groups[shard] = [position]
        else:
            group.append(position)
    return groups
