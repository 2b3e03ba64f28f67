"""Unit tests for Space-Saving hot-key tracking and the latency histogram (pure code)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# --- hot keys through rotations (issue 10, defect 2) -----------------------------------


def test_an_add_bound_once_keeps_counting_across_rotations() -> None:
    hk = HotKeys(8, window_s=10.0, now=0.0)
    track = hk.add  # callers (the worker) bind it once
    for window in range(5):
        now = window * 10.0
        hk.rotate(now)
        for _ in range(10 + window):
            track(b"k%d" % window)
        _, rows = hk.top(1, now=now + 5.0)
        assert rows and rows[0][0] == b"k%d" % window, (window, rows)
        assert rows[0][2] == 10 + window


class _FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _shard(clock: _FakeClock, **settings: object):
    from shardd.config import build_config
    from shardd.store import Store
    from shardd.worker import Shard

    config = build_config({"shards": 1, "pin_cpus": False, **settings})
    return Shard(Store(lambda: int(clock.now * 1000)), config, 0, None, clock=clock)


def _hotkeys(shard, top: int = 5) -> list:
    from shardd import protocol as p

    reply = p.decode_reply(shard.apply(p.encode_request(1, p.Hotkeys(top))))
    assert reply.status == p.OK, reply
    return reply.value["keys"]


def _get(shard, key: bytes, times: int) -> None:
    from shardd import protocol as p

    for i in range(times):
        assert p.decode_reply(shard.apply(p.encode_request(i + 2, p.Get(key)))).status == p.OK


def test_a_worker_reports_hot_keys_after_several_rotations() -> None:
    from shardd.worker import WINDOW_S

    clock = _FakeClock()
    shard = _shard(clock)
    for window in range(5):
        key = b"hot:%d" % window
        _get(shard, key, 50)
        rows = _hotkeys(shard)
        assert rows and rows[0][0] == key and rows[0][2] >= 50, (window, rows)
        clock.now += WINDOW_S  # the window is over: the worker's timer rotates
        shard.tick()
    # Two windows after the last access, the key has aged out; nothing stale stays on top.
    clock.now += WINDOW_S
    shard.tick()
    clock.now += WINDOW_S
    shard.tick()
    assert _hotkeys(shard) == []


def test_hotkeys_capacity_applies_live_on_a_worker() -> None:
    from shardd import protocol as p

    clock = _FakeClock()
    shard = _shard(clock, hotkeys_capacity=4)

    def configure(**settings: object) -> list[str]:
        reply = p.decode_reply(shard.apply(p.encode_request(9, p.Configure(settings))))
        assert reply.status == p.OK, reply
        return reply.value

    for i in range(20):
        _get(shard, b"k%d" % i, 1)
    assert len(shard.hot.current.counts) <= 2 * 4
    assert configure(hotkeys_capacity=0) == ["hotkeys_capacity"]
    _get(shard, b"off", 3)
    assert _hotkeys(shard) == []  # off: nothing tracked
    assert configure(hotkeys_capacity=64) == ["hotkeys_capacity"]
    for i in range(100):
        _get(shard, b"k%d" % i, 1 + (i == 7) * 30)
    assert len(shard.hot.current.counts) == 100  # room for 2 x 64 now: nothing pruned
    assert _hotkeys(shard, 1)[0][:1] == [b"k7"]
    assert configure(hotkeys_capacity=8) == ["hotkeys_capacity"]
    assert len(shard.hot.current.counts) <= 2 * 8  # shrunk at once (Rule 3), the hot key kept
    assert _hotkeys(shard, 1)[0][:1] == [b"k7"]
    assert shard.config.hotkeys_capacity == 8


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=600), st.integers(1, 8))
def test_space_saving_rules_hold_on_any_stream_with_ties(stream: list[int], capacity: int) -> None:
    # Small key spaces make many equal counts: the prune's cut must keep exactly `capacity` keys
    # and raise the floor to the highest count it dropped, whichever of the tied keys it keeps.
    ss = SpaceSaving(capacity)
    true: dict[bytes, int] = {}
    for i in stream:
        key = b"k%d" % i
        ss.add(key)
        true[key] = true.get(key, 0) + 1
        assert len(ss.counts) <= 2 * capacity  # Rule 3
    for key, count in ss.counts.items():
        assert true[key] <= count <= true[key] + ss.errors.get(key, 0)  # Rule 1
    for key, count in true.items():
        if count > ss.floor:
            assert key in ss.counts, (key, count, ss.floor)  # Rule 2
