"""Small helpers shared by tests."""

from __future__ import annotations

from shardd.hashing import shard_for


def keys_on_shard(shard: int, shards: int, n: int, prefix: str = "k") -> list[bytes]:
    """The first ``n`` keys ``{prefix}{i}`` that ``shard_for`` places on ``shard``."""
    out, i = [], 0
    while len(out) < n:
        key = f"{prefix}{i}".encode()
        if shard_for(key, shards) == shard:
            out.append(key)
        i += 1
    return out
