"""Unit tests for Space-Saving hot-key tracking and the latency histogram (pure code)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from shardd import histogram
from shardd.hotkeys import HotKeys, SpaceSaving


def zipf_stream(n: int, keys: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    weights = [1 / (i + 1) for i in range(keys)]
    return [b"key:%d" % i for i in rng.choices(range(keys), weights, k=n)]


def test_counts_are_exact_while_the_table_is_not_full() -> None:
    ss = SpaceSaving(10)
    for key in [b"a"] * 5 + [b"b"] * 3 + [b"c"]:
        ss.add(key)
    assert ss.top(2) == [(b"a", 5, 0), (b"b", 3, 0)]


def test_space_saving_guarantees_on_a_zipf_stream() -> None:
    stream = zipf_stream(50_000, 5_000)
    ss = SpaceSaving(100)
    for key in stream:
        ss.add(key)
    true = Counter(stream)
    assert len(ss.counts) <= 200  # Rule 3
    for key, count, error in ss.top(100):
        assert count - error <= true[key] <= count  # Rule 1
    for key, count in true.items():
        if count > ss.floor:
            assert key in ss.counts  # Rule 2
    top10 = [key for key, _, _ in ss.top(10)]
    assert top10[:5] == [key for key, _ in true.most_common(5)]


def test_heavy_hitter_among_uniform_noise_is_found() -> None:
    rng = random.Random(2)
    ss = SpaceSaving(16)
    for i in range(20_000):
        ss.add(b"hot" if i % 10 == 0 else b"k%d" % rng.randrange(100_000))
    (key, count, error), *_ = ss.top(1)
    assert key == b"hot" and count - error <= 2000 <= count


def test_hotkeys_rates_cover_two_windows() -> None:
    hk = HotKeys(8, window_s=10.0, now=0.0)
    for _ in range(100):
        hk.add(b"a")
    span, rows = hk.top(5, now=5.0)
    assert span == 5.0 and rows[0][:3] == (b"a", 20.0, 100)
    hk.rotate(10.0)
    for _ in range(50):
        hk.add(b"a")
    span, rows = hk.top(5, now=15.0)
    assert span == 15.0 and rows[0][2] == 150 and rows[0][1] == pytest.approx(10.0)
    hk.rotate(20.0)
    hk.rotate(30.0)
    assert hk.top(5, now=31.0)[1] == []


def test_histogram_buckets_and_quantiles() -> None:
    counts = histogram.new_counts()
    for ns in range(1000, 11000):
        counts[histogram.bucket_of(ns)] += 1
    p50, p99 = histogram.quantile(counts, 0.5), histogram.quantile(counts, 0.99)
    assert 6000 <= p50 <= 6000 * 1.25
    assert 10900 <= p99 <= 10900 * 1.25
    assert histogram.quantile(histogram.new_counts(), 0.5) is None
    for ns in (0, 1, 7, 8, 100, 1 << 40):
        slot = histogram.bucket_of(ns)
        assert 0 <= slot < histogram.SLOTS and ns < histogram.bucket_upper(slot)
    cumulative = histogram.cumulative(counts)
    assert len(cumulative) == len(histogram.PROM_BOUNDS_NS)
    assert cumulative[0] == 24  # 1000..1023 are below 1024 ns
    assert cumulative[-1] == 10_000 and cumulative == sorted(cumulative)
