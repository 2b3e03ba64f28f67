"""Key placement is part of the wire protocol: these tests pin it to independent references.

Three layers, each checked on its own:
1. ``jump_hash`` against vectors published by other implementations of Lamping & Veach.
2. ``key_hash`` (xxh3_64, seed 0) against xxHash's own known-answer table.
3. ``shard_for`` against golden values computed once with this module and pinned, so any
   accidental change of placement (which would strand every stored key) fails loudly.
Then the properties that make jump hash worth using: minimal movement and balance.
"""

from __future__ import annotations

import collections

import pytest

from shardd.hashing import jump_hash, key_hash, shard_for

_U64 = (1 << 64) - 1

# --- 1. jump_hash: published vectors --------------------------------------------------

# dgryski/go-jump, jump_test.go (TestHash), "Generated from the reference C++ code":
# Hash(key, i + 1) == buckets[i].
GO_JUMP_VECTORS: list[tuple[int, list[int]]] = [
    (0, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
    (1, [0, 0, 0, 0, 0, 0, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 17, 17]),
    (0xDEADBEEF, [0, 1, 2, 3, 3, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 16, 16, 16]),
    (0x0DDC0FFEEBADF00D, [0, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 15, 15, 15, 15]),
]

# google/guava, guava-tests/test/com/google/common/hash/HashingTest.java
# (testConsistentHash_linearCongruentialGeneratorCompatibility): consistentHash(i, 100).
GUAVA_GOLDEN_100 = [0, 55, 62, 8, 45, 59, 86, 97, 82, 59, 73, 37, 17, 56, 86, 21, 90, 37, 38, 83]

# Same Guava test, the explicit (key, buckets, expected) assertions.
GUAVA_GOLDEN: list[tuple[int, int, int]] = [
    (10863919174838991, 11, 6),
    (2016238256797177309, 11, 3),
    (1673758223894951030, 11, 5),
    (2, 100001, 80343),
    (2201, 100001, 22152),
    (2202, 100001, 15018),
]

# lithammer/go-jump-consistent-hash, jump_test.go (TestHashInBucketRange); the same values
# appear in lithammer/python-jump-consistent-hash, tests/test_jump.py.
LITHAMMER_VECTORS: list[tuple[int, int, int]] = [
    (1, 1, 0),
    (42, 57, 43),
    (0xDEAD10CC, 1, 0),
    (0xDEAD10CC, 666, 361),
    (256, 1024, 520),
]


@pytest.mark.parametrize(("key", "expected"), GO_JUMP_VECTORS, ids=[hex(k) for k, _ in GO_JUMP_VECTORS])
def test_jump_hash_matches_go_jump_vectors(key: int, expected: list[int]) -> None:
    assert [jump_hash(key, n) for n in range(1, len(expected) + 1)] == expected


def test_jump_hash_matches_guava_golden_100() -> None:
    assert [jump_hash(key, 100) for key in range(len(GUAVA_GOLDEN_100))] == GUAVA_GOLDEN_100


@pytest.mark.parametrize(("key", "buckets", "expected"), GUAVA_GOLDEN + LITHAMMER_VECTORS)
def test_jump_hash_matches_published_vectors(key: int, buckets: int, expected: int) -> None:
    assert jump_hash(key, buckets) == expected


def test_jump_hash_treats_key_as_unsigned_64_bit() -> None:
    # The reference takes a uint64; bits above 64 are dropped and -1 is 0xFFFF_FFFF_FFFF_FFFF.
    for n in (1, 7, 100, 100001):
        assert jump_hash(-1, n) == jump_hash(_U64, n)
        assert jump_hash(0xDEADBEEF + (1 << 64), n) == jump_hash(0xDEADBEEF, n)


@pytest.mark.parametrize("buckets", [0, -1, -10, -666])
def test_jump_hash_rejects_non_positive_buckets(buckets: int) -> None:
    with pytest.raises(ValueError, match="buckets"):
        jump_hash(0xDEAD10CC, buckets)


@pytest.mark.parametrize("shards", [0, -1, -8])
def test_shard_for_rejects_non_positive_shard_counts(shards: int) -> None:
    with pytest.raises(ValueError):
        shard_for(b"key:1", shards)


# --- 2. key_hash: xxHash's known answers ----------------------------------------------

# Cyan4973/xxHash, cli/xsum_sanity_check.c: XSUM_XXH3_testdata, the seed-0 rows of the
# XXH3_64bits table. The input is the first `len` bytes of XSUM_fillTestBuffer.
XXH3_64_SEED0: list[tuple[int, int]] = [
    (0, 0x2D06800538D394C2),  # empty string
    (1, 0xC44BDFF4074EECDB),  # 1 - 3
    (6, 0x27B56A84CD2D7325),  # 4 - 8
    (12, 0xA713DAF0DFBB77E7),  # 9 - 16
    (24, 0xA3FE70BF9D3510EB),  # 17 - 32
    (48, 0x397DA259ECBA1F11),  # 33 - 64
    (80, 0xBCDEFBBB2C47C90A),  # 65 - 96
    (195, 0xCD94217EE362EC3A),  # 129 - 240
    (403, 0xCDEB804D65C6DEA4),  # one block, last stripe is overlapping
    (512, 0x617E49599013CB6B),  # one block, finishing at stripe boundary
    (2048, 0xDD59E2C3A5F038E0),  # 2 blocks, finishing at block boundary
    (2240, 0x6E73A90539CF2948),  # 3 blocks, finishing at stripe boundary
    (2367, 0xCB37AEB9E5D361ED),  # 3 blocks, last stripe is overlapping
]


def _xsum_test_buffer(length: int) -> bytes:
    """XSUM_fillTestBuffer from xxHash's cli/xsum_sanity_check.c (its values must not change)."""
    prime32, prime64 = 2654435761, 11400714785074694797
    gen = prime32
    out = bytearray()
    for _ in range(length):
        out.append(gen >> 56)
        gen = (gen * prime64) & _U64
    return bytes(out)


_XSUM_BUFFER = _xsum_test_buffer(max(n for n, _ in XXH3_64_SEED0))


@pytest.mark.parametrize(("length", "expected"), XXH3_64_SEED0)
def test_key_hash_is_xxh3_64_seed_0(length: int, expected: int) -> None:
    assert key_hash(_XSUM_BUFFER[:length]) == expected


def test_shard_for_is_jump_of_key_hash() -> None:
    for i in range(500):
        key = b"key:%d" % i
        for n in (1, 2, 3, 8, 64):
            assert shard_for(key, n) == jump_hash(key_hash(key), n)


# --- 3. shard_for: pinned golden values -----------------------------------------------

# Computed once with shardd.hashing and pinned; docs/protocol.md quotes some of them.
# If one of these changes, every deployed client and daemon disagree on placement.
SHARD_GOLDEN: list[tuple[bytes, int, tuple[int, int, int, int, int]]] = [
    # key, key_hash, shard for N = 2, 3, 8, 16, 64
    (b"", 0x2D06800538D394C2, (0, 0, 0, 0, 52)),
    (b"a", 0xE6C632B61E964E1F, (1, 1, 1, 14, 14)),
    (b"foo", 0xAB6E5F64077E7D8A, (1, 2, 2, 15, 37)),
    (b"key:0", 0xB464EE7B63344E80, (0, 0, 0, 15, 15)),
    (b"key:1", 0xBF2D6D6B8270D37A, (1, 1, 1, 1, 1)),
    (b"key:42", 0x62DCD25E1B11DFED, (1, 1, 1, 10, 54)),
    (b"user:1000", 0xFB6841B2068C0C9F, (1, 2, 7, 7, 43)),
    ("ключ".encode(), 0x9A137C08C1E55EDE, (0, 0, 0, 12, 50)),
    ("日本".encode(), 0x2C17FB837F1A1BC0, (1, 1, 1, 1, 36)),
    (b"\x00\xff", 0xA99B043A346C8BF3, (1, 2, 6, 8, 55)),
]


@pytest.mark.parametrize(("key", "hashed", "shards"), SHARD_GOLDEN, ids=lambda v: repr(v)[:20])
def test_shard_for_golden(key: bytes, hashed: int, shards: tuple[int, ...]) -> None:
    assert key_hash(key) == hashed
    assert tuple(shard_for(key, n) for n in (2, 3, 8, 16, 64)) == shards
    assert shard_for(key, 1) == 0


# --- properties -----------------------------------------------------------------------

_KEYS = [b"key:%d" % i for i in range(20_000)]
_HASHES = [key_hash(k) for k in _KEYS]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 11, 15, 16])
def test_growing_by_one_shard_moves_only_keys_to_the_new_shard(n: int) -> None:
    moved = 0
    for h in _HASHES:
        before, after = jump_hash(h, n), jump_hash(h, n + 1)
        if before != after:
            assert after == n, f"key moved from shard {before} to old shard {after}"
            moved += 1
    # Expected fraction 1/(N+1); over 20k keys one standard deviation is at most ~0.0035.
    assert abs(moved / len(_HASHES) - 1 / (n + 1)) < 0.015


@pytest.mark.parametrize("n", [2, 3, 4, 8, 16])
def test_keys_are_balanced_across_shards(n: int) -> None:
    counts = collections.Counter(shard_for(k, n) for k in _KEYS)
    assert sorted(counts) == list(range(n))
    expected = len(_KEYS) / n
    # Binomial sd is sqrt(n_keys * p * (1 - p)) <= ~71 here; 10% of the mean is > 3.5 sd.
    for shard, count in counts.items():
        assert abs(count - expected) < 0.10 * expected, (shard, count, expected)


def test_results_are_always_in_range() -> None:
    for h in _HASHES[:2000]:
        for n in (1, 2, 5, 13, 1000):
            assert 0 <= jump_hash(h, n) < n
