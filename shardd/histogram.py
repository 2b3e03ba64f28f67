"""A fixed-size latency histogram cheap enough to update once per op.

Buckets are log-linear: four per power of two of nanoseconds, so a quantile is read to
within 25% (like HdrHistogram with 2 significant bits). Recording is a ``bit_length``, two
shifts and one list increment; the list never grows (260 slots cover 0 ns to 2^64 ns).
The worker inlines :func:`bucket_of` in its loop; this module is pure and does no I/O.
"""

from __future__ import annotations

SLOTS = 65 * 4


def bucket_of(ns: int) -> int:
    """The slot for a duration in ns. ``| 8`` makes every value >= 8, so the shift is >= 0."""
    v = ns | 8
    b = v.bit_length()
    return (b << 2) | ((v >> (b - 3)) & 3)


def bucket_upper(slot: int) -> int:
    """The smallest duration in ns that is *above* the slot (its exclusive upper bound)."""
    b, sub = slot >> 2, slot & 3
    return (5 + sub) << (b - 3)


def new_counts() -> list[int]:
    return [0] * SLOTS


def quantile(counts: list[int], q: float) -> int | None:
    """The ``q`` quantile (0..1) in ns, as the upper bound of its bucket; None if empty."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for slot, count in enumerate(counts):
        seen += count
        if count and seen >= rank:
            return bucket_upper(slot)
    return None


def delta(now: list[int], before: list[int]) -> list[int]:
    return [a - b for a, b in zip(now, before, strict=True)]


# Prometheus bucket bounds: powers of two from 1.024 µs to ~1.07 s, exact slot boundaries.
PROM_BOUNDS_NS = [1 << k for k in range(10, 31)]


def cumulative(counts: list[int]) -> list[int]:
    """Counts of durations below each of PROM_BOUNDS_NS (2^k ns is slot (k + 1) * 4)."""
    out = []
    running = sum(counts[: 11 * 4])
    out.append(running)
    for k in range(11, 31):
        running += sum(counts[k * 4:(k + 1) * 4])
        out.append(running)
    return out
