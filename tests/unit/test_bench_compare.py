"""bench/compare.py's pure parts: Zipf sampler, plans, timed loop, ratios, tables, targets.

No server and no client library: compare.py imports redis, pymemcache and shardd's client
only inside the functions that talk to servers, so this runs with the test extras alone.
"""

from __future__ import annotations

import importlib.util
import itertools
import random
import sys
from collections import Counter
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str, path: Path):
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return module


compare = _load("shardd_bench_compare", BENCH / "compare.py")


# --- Zipf sampler ------------------------------------------------------------------------


def test_zipf_probabilities_sum_to_one_and_fall_with_rank():
    z = compare.ZipfSampler(1000, 0.99, random.Random(1))
    probs = [z.probability(k) for k in range(1000)]
    assert sum(probs) == pytest.approx(1.0)
    assert all(a > b for a, b in itertools.pairwise(probs))
    assert probs[0] / probs[1] == pytest.approx(2**0.99)


def test_zipf_samples_stay_in_range_and_follow_the_distribution():
    n, draws = 100, 200_000
    z = compare.ZipfSampler(n, 0.99, random.Random(7))
    counts = Counter(z.sample() for _ in range(draws))
    assert min(counts) >= 0 and max(counts) <= n - 1
    for rank in (0, 1, 2, 9, 49):  # each within 5 standard deviations of its expectation
        p = z.probability(rank)
        sd = (draws * p * (1 - p)) ** 0.5
        assert abs(counts[rank] - draws * p) < 5 * sd, rank
    # The head is heavy: the top 10% of ranks draw well over half of the samples.
    assert sum(counts[k] for k in range(10)) / draws == pytest.approx(sum(map(z.probability, range(10))), abs=0.01)
    assert sum(counts[k] for k in range(10)) / draws > 0.5


def test_zipf_with_exponent_zero_is_uniform():
    z = compare.ZipfSampler(4, 0.0, random.Random(3))
    counts = Counter(z.sample() for _ in range(40_000))
    assert set(counts) == {0, 1, 2, 3}
    assert all(abs(c - 10_000) < 500 for c in counts.values())


def test_zipf_is_deterministic_per_seed_and_a_single_rank_always_draws_zero():
    a = compare.ZipfSampler(1000, 1.1, random.Random(42))
    b = compare.ZipfSampler(1000, 1.1, random.Random(42))
    assert [a.sample() for _ in range(100)] == [b.sample() for _ in range(100)]
    one = compare.ZipfSampler(1, 0.99, random.Random(0))
    assert {one.sample() for _ in range(100)} == {0}


@pytest.mark.parametrize(("n", "s"), [(0, 0.99), (10, -0.5)])
def test_zipf_rejects_bad_parameters(n, s):
    with pytest.raises(ValueError):
        compare.ZipfSampler(n, s)


# --- plans ---------------------------------------------------------------------------------


def test_plans_are_the_same_for_every_system_and_differ_between_processes():
    a = compare.zipf_keys(compare.process_rng(1, 0), 1000, 0.99, size=500)
    b = compare.zipf_keys(compare.process_rng(1, 0), 1000, 0.99, size=500)
    c = compare.zipf_keys(compare.process_rng(1, 1), 1000, 0.99, size=500)
    assert a == b and a != c
    assert all(k.startswith(b"key:") and 0 <= int(k[4:]) < 1000 for k in a)


def test_op_mix_has_the_requested_get_ratio():
    mix = compare.op_mix(random.Random(5), 0.9, size=50_000)
    assert sum(mix) / len(mix) == pytest.approx(0.9, abs=0.01)


def test_key_batches_hold_distinct_keys_and_never_more_than_the_key_space():
    batches = compare.key_batches(random.Random(2), 1000, 100, count=20)
    assert len(batches) == 20
    assert all(len(b) == 100 == len(set(b)) for b in batches)
    assert all(len(b) == 10 for b in compare.key_batches(random.Random(2), 10, 100, count=3))


# --- the timed loop --------------------------------------------------------------------------


class FakeClock:
    """Advances 10 ns per reading, so each step takes 10 ns between its two readings."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        self.now += 10
        return self.now


def test_timed_loop_measures_only_after_the_warmup_and_counts_failures():
    def step(i: int) -> int:
        if i % 10 == 9:
            raise ConnectionError("boom")
        return i % 2  # a miss every other step

    report = compare.timed_loop(step, 100, measure_from=1_000, stop_at=3_000, clock=FakeClock())
    hist = compare.Histogram.from_dict(report["histogram"])
    assert hist.count == report["ops"] // 100 > 0
    assert hist.min == hist.max == 10  # one clock tick per timed step
    assert report["errors"]["ConnectionError"] > 0
    assert 0 < report["misses"] < hist.count
    assert report["elapsed_s"] > 0


def test_compare_uses_loadgens_histogram():
    loadgen = _load("shardd_bench_loadgen", BENCH / "loadgen.py")
    assert compare.Histogram is loadgen.Histogram


# --- ratios, tables and targets ---------------------------------------------------------------


def test_ratio_and_median_run():
    assert compare.ratio(3.0, 2.0) == 1.5
    assert compare.ratio(None, 2.0) is None and compare.ratio(1.0, None) is None and compare.ratio(1.0, 0) is None
    runs = [{"ops_per_s": v} for v in (5.0, 1.0, 3.0, 4.0)]
    assert compare.median_run(runs)["ops_per_s"] == 3.0
    assert compare.median_run(runs[:3])["ops_per_s"] == 3.0


def _rows():
    Row = compare.Row
    return [
        Row("get", "sync GET", "shardd", "shardd.Client, router", 1, 6_000.0, 150.0, 200.0, 300.0),
        Row("get", "sync GET", "shardd-direct", "shardd.Client, direct", 1, 13_000.0, 80.0, 95.0, 120.0),
        Row("get", "sync GET", "redis", "redis-py", 1, 12_000.0, 70.0, 90.0, 100.0),
        Row("get", "sync GET", "memcached", "pymemcache", 1, 18_000.0, 50.0, 60.0, 80.0, misses=3,
            errors={"Timeout": 2}),
        Row("batch", "batched GET x100", "shardd", "shardd.Client, router", 1, 300_000.0, 300.0, 400.0, 500.0),
        Row("batch", "batched GET x100", "shardd-direct", "shardd.Client, direct", 1, 420_000.0, 200.0, 300.0, 400.0),
        Row("batch", "batched GET x100", "redis", "redis-py", 1, 200_000.0, 500.0, 600.0, 700.0),
        Row("batch", "batched GET x100", "memcached", "pymemcache", 1, 400_000.0, 250.0, 300.0, 350.0),
        Row("mixed", "mixed", "shardd", "shardd.Client, router", 8, 20_000.0, 400.0, 900.0, 1_900.0),
        Row("mixed", "mixed", "shardd-direct", "shardd.Client, direct", 8, 18_000.0, 300.0, 900.0, 2_500.0),
        Row("mixed", "mixed", "redis", "redis-py", 8, 20_000.0, 300.0, 700.0, 1_000.0),
    ]


def test_format_table_is_markdown_with_ratios_to_redis():
    lines = compare.format_table(_rows()).splitlines()
    assert lines[0].startswith("| workload |") and set(lines[1]) <= {"|", "-"}
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    cells = {(c[1].strip(), c[2].strip()): c for c in (line.split("|") for line in lines[2:])}
    shardd = cells[("sync GET", "shardd (shardd.Client, router)")]
    assert shardd[4].strip() == "6,000" and shardd[7].strip() == "300.0"
    assert shardd[8].strip() == f"0.50{compare.X}" and shardd[9].strip() == f"3.00{compare.X}"
    direct = cells[("sync GET", "shardd-direct (shardd.Client, direct)")]
    assert direct[4].strip() == "13,000" and direct[8].strip() == f"1.08{compare.X}"
    assert direct[9].strip() == f"1.20{compare.X}"
    assert cells[("sync GET", "redis (redis-py)")][8].strip() == f"1.00{compare.X}"
    assert "3 misses; errors: Timeout 2" in cells[("sync GET", "memcached (pymemcache)")][10]


def test_memory_table_ratio_is_rss_to_redis_rss():
    M = compare.MemoryRow
    rows = [M("shardd", 1000, 100 << 20, 300 << 20, 50 << 20, "Σ used_bytes", 1.0),
            M("redis", 1000, 10 << 20, 200 << 20, 150 << 20, "used_memory", 0.5)]
    text = compare.format_memory_table(rows)
    shardd_line = next(line for line in text.splitlines() if line.startswith("| shardd"))
    assert f"1.50{compare.X}" in shardd_line and "300.0" in shardd_line
    assert f"{(200 << 20) // 1000:,}" in shardd_line  # Δ RSS per key, in bytes


def _memory():
    return [compare.MemoryRow("shardd", 10, 0, 160, None, "", 0.0),
            compare.MemoryRow("redis", 10, 0, 100, None, "", 0.0)]


def test_targets_compare_with_the_right_peer():
    targets = {t.name.split(":")[0]: t for t in compare.evaluate_targets(_rows(), _memory())}
    direct = targets["sync GET, direct mode"]  # 13k vs 12k ops/s, goal 1.0x
    assert direct.measured == pytest.approx(13 / 12) and direct.met is True and "1.00" in direct.goal
    router = targets["sync GET, router"]
    assert router.measured == 0.5 and router.met is False and "0.60" in router.goal
    batch = targets["batched GET, router"]  # against memcached, the faster peer
    assert batch.measured == 0.75 and batch.met is False and "memcached" in batch.detail
    batch = targets["batched GET, direct mode"]
    assert batch.measured == pytest.approx(1.05) and batch.met is True and "memcached" in batch.detail
    mixed = {t.name: t for t in compare.evaluate_targets(_rows(), _memory()) if t.name.startswith("mixed")}
    assert len(mixed) == 4
    assert mixed["mixed, router, all client processes: aggregate ops/s vs Redis"].met is True  # 1.0x
    assert mixed["mixed, router, all client processes: p99 vs Redis's p99"].met is True  # 1.9x
    assert mixed["mixed, direct mode, all client processes: aggregate ops/s vs Redis"].measured == pytest.approx(0.9)
    assert mixed["mixed, direct mode, all client processes: p99 vs Redis's p99"].measured == pytest.approx(2.5)
    assert not any(t.met for name, t in mixed.items() if "direct" in name)
    assert targets["memory"].measured == 1.6 and targets["memory"].met is False
    text = compare.format_targets(compare.evaluate_targets(_rows(), _memory()))
    assert "**no**" in text and "| yes |" in text and "not measured" not in text


def test_targets_without_a_direct_row_are_not_measured_and_router_targets_stay():
    rows = [r for r in _rows() if r.system != "shardd-direct"]
    targets = compare.evaluate_targets(rows, _memory())
    direct = [t for t in targets if "direct mode" in t.name]
    assert [t.name.split(":")[0] for t in direct] == ["sync GET, direct mode", "batched GET, direct mode",
                                                       "mixed, direct mode, all client processes",
                                                       "mixed, direct mode, all client processes"]
    assert all(t.measured is None and t.met is None for t in direct)
    assert next(t for t in targets if t.name.startswith("sync GET, router")).measured == 0.5
    text = compare.format_targets(targets)
    assert text.count("| not measured |") == 4
    assert all(line.count("|") == 5 for line in text.splitlines())


def test_shardd_direct_reuses_the_shardd_server():
    assert "shardd-direct" in compare.SYSTEMS and compare.CLIENTS["shardd-direct"] == "shardd.Client, direct"
    assert compare.server_of("shardd-direct") == "shardd" and compare.server_of("redis") == "redis"
    assert compare.servers_for(["shardd", "shardd-direct", "redis"]) == ["shardd", "redis"]
    assert compare.servers_for(["shardd-direct", "memcached"]) == ["shardd", "memcached"]
    assert compare.ADAPTERS["shardd-direct"].direct is True and compare.ADAPTERS["shardd"].direct is False
    assert issubclass(compare.ADAPTERS["shardd-direct"], compare.ADAPTERS["shardd"])


def test_quick_sets_short_defaults_and_explicit_options_win():
    args = compare.parse_args(["--quick", "--duration", "2"])
    assert (args.duration, args.warmup, args.memory_keys) == (2.0, 0.3, 100_000)
    full = compare.parse_args([])
    assert (full.duration, full.warmup, full.memory_keys, full.procs, full.keys) == (10.0, 2.0, 1_000_000, 8, 100_000)
    assert full.systems == ["shardd", "shardd-direct", "redis", "memcached"]
    assert compare.parse_args(["--systems", "shardd-direct,redis"]).systems == ["shardd-direct", "redis"]
    with pytest.raises(SystemExit):
        compare.parse_args(["--systems", "mongodb"])
