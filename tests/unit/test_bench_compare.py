"""bench/compare.py's pure parts: Zipf sampler, plans, timed and paced loops, CPU arithmetic, JSON values,
ratios, tables, targets.

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
    assert full.systems == ["shardd", "shardd-direct", "redis", "memcached", "echo", "echo-2hop"]
    assert compare.SYSTEMS == ("shardd", "shardd-direct", "redis", "memcached")  # bench/profile_get.py's choices
    assert (full.cpu_rate, full.cpu_duration, full.cpu_procs, full.json_keys, full.json_value_size, full.rounds) == (
        5000.0, 10.0, 4, 100_000, 4096, 1)
    assert (args.cpu_duration, args.json_keys) == (1.0, 20_000)
    assert compare.parse_args(["--systems", "shardd-direct,redis"]).systems == ["shardd-direct", "redis"]
    with pytest.raises(SystemExit):
        compare.parse_args(["--systems", "mongodb"])


def test_rounds_and_its_old_name_repeat_are_one_option():
    assert compare.parse_args(["--rounds", "3"]).rounds == 3
    assert compare.parse_args(["--repeat", "5"]).rounds == 5
    with pytest.raises(SystemExit):
        compare.parse_args(["--rounds", "0"])
    with pytest.raises(SystemExit):
        compare.parse_args(["--cpu-rate", "0"])


def test_median_run_by_another_figure_puts_missing_figures_first():
    runs = [{"ops_per_s": 1.0, "cpu_per_m": 30.0}, {"ops_per_s": 2.0, "cpu_per_m": None},
            {"ops_per_s": 3.0, "cpu_per_m": 10.0}]
    assert compare.median_run(runs, "cpu_per_m")["cpu_per_m"] == 10.0
    assert compare.median_run(runs[:2], "cpu_per_m")["cpu_per_m"] is None  # lower middle of (None, 30)
    assert compare.spread_note(runs, "cpu_per_m", "CPU s per 1M", 1) == "median of 3 rounds, CPU s per 1M 10.0 to 30.0"
    assert compare.spread_note(runs[:1]) == ""


# --- the echo floors ------------------------------------------------------------------------


def test_echo_systems_run_only_get_shaped_workloads_each_on_its_own_server():
    assert compare.applies("echo", "get") and compare.applies("echo-2hop", "cpu")
    assert not any(compare.applies(e, w) for e in ("echo", "echo-2hop") for w in ("set", "batch", "mixed", "memory"))
    assert all(compare.applies("shardd", w) for w in compare.WORKLOADS)
    assert compare.servers_for(["shardd-direct", "echo", "echo-2hop"]) == ["shardd", "echo", "echo-2hop"]
    assert compare.ADAPTERS["echo"] is compare.ADAPTERS["echo-2hop"] is compare.EchoAdapter


def test_echo_payload_is_a_get_sized_frame():
    payload = compare.echo_payload()
    assert isinstance(payload, bytes) and 10 < len(payload) < 64


# --- the paced loop and CPU per op ------------------------------------------------------------


class SleepyClock:
    """A clock that a fake sleep moves forward; each reading costs 1 ns, each step 100 ns."""

    def __init__(self) -> None:
        self.now = 0
        self.slept: list[float] = []

    def __call__(self) -> int:
        self.now += 1
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += int(seconds * 1e9)


def test_paced_loop_sends_on_schedule_and_measures_only_the_window():
    clock = SleepyClock()
    sent: list[int] = []

    def step(i: int) -> int:
        sent.append(clock.now)
        clock.now += 100
        return 0

    # one step per 1000 ns from t=0; measured from 5000; nothing sent at or after 15000
    report = compare.paced_loop(step, 1, 0, 1000, 5000, 15_000, clock=clock, sleep=clock.sleep)
    assert len(sent) == 15
    assert all(t >= 1000 * i for i, t in enumerate(sent))  # never early
    assert all(t < 1000 * i + 10 for i, t in enumerate(sent))  # and on time: the server keeps up
    assert report["ops"] == 10 and not report["errors"]
    assert report["elapsed_s"] == pytest.approx(10_000 / 1e9, rel=0.01)
    hist = compare.Histogram.from_dict(report["histogram"])
    assert hist.count == 10 and hist.max < 200  # from when due: the 100 ns step and a few readings


def test_paced_loop_falls_behind_without_skipping_and_latency_shows_the_lag():
    clock = SleepyClock()
    calls = []

    def step(i: int) -> int:
        calls.append(i)
        clock.now += 2500  # slower than the 1000 ns schedule
        if i == 3:
            raise TimeoutError
        return 1

    report = compare.paced_loop(step, 1, 0, 1000, 0, 20_000, clock=clock, sleep=clock.sleep)
    assert calls == list(range(len(calls)))  # none skipped
    assert 7 <= len(calls) <= 9  # ~20000 / 2500: the achieved rate, not the offered 20
    assert report["errors"] == {"TimeoutError": 1} and report["misses"] == report["ops"] == len(calls) - 1
    hist = compare.Histogram.from_dict(report["histogram"])
    assert hist.max > 5 * 2500  # the last ones were due long before they were sent
    assert clock.slept == []  # always late: never slept


class FakeProcess:
    def __init__(self, pid: int, user: float, system: float, gone: bool = False) -> None:
        self.pid, self.user, self.system, self.gone = pid, user, system, gone

    def cpu_times(self):
        if self.gone:
            raise ProcessLookupError(self.pid)
        return type("T", (), {"user": self.user, "system": self.system})()


def test_cpu_used_sums_every_process_and_counts_a_newcomer_whole():
    before = compare.cpu_seconds([FakeProcess(1, 1.0, 0.5), FakeProcess(2, 2.0, 0.0), FakeProcess(3, 0, 0, gone=True)])
    assert before == {1: 1.5, 2: 2.0}
    after = compare.cpu_seconds([FakeProcess(1, 1.5, 0.75), FakeProcess(2, 2.25, 0.0), FakeProcess(4, 0.1, 0.1)])
    assert compare.cpu_used(before, after) == pytest.approx(0.75 + 0.25 + 0.2)
    assert compare.cpu_used(after, after) == 0


def test_cpu_per_million_ops():
    assert compare.per_million(0.5, 10_000) == pytest.approx(50.0)  # 50 µs per op
    assert compare.per_million(1.2, 50_000) == pytest.approx(24.0)
    assert compare.per_million(None, 10) is None and compare.per_million(1.0, 0) is None


def _cpu_rows():
    C = compare.CpuRow
    return [C("shardd", "router", 4, 5000.0, 4990.0, 49_900, 4.99, 100.0, 5),
            C("shardd-direct", "direct", 4, 5000.0, 5000.0, 50_000, 3.0, 60.0, 5),
            C("redis", "redis-py", 4, 5000.0, 5000.0, 50_000, 2.0, 40.0, 1, errors={"TimeoutError": 1})]


def test_cpu_table_ratios_are_to_redis_cpu_per_op():
    text = compare.format_cpu_table(_cpu_rows())
    lines = text.splitlines()
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    router = next(line for line in lines if line.startswith("| shardd (router)"))
    assert "| 100.0 |" in router and f"2.50{compare.X}" in router and "4,990" in router
    assert "TimeoutError 1" in next(line for line in lines if line.startswith("| redis"))


# --- JSON values ------------------------------------------------------------------------------


def test_json_documents_are_valid_json_of_the_exact_size_and_repeatable():
    import json

    docs = compare.json_values.json_documents(1, 20, 4096)
    assert all(len(d) == 4096 for d in docs) and len(set(docs)) == 20
    parsed = [json.loads(d) for d in docs]
    assert all(len(p["items"]) >= 5 and set(p["items"][0]) >= {"id", "user", "status", "orders"} for p in parsed)
    assert docs == compare.json_values.json_documents(1, 20, 4096)
    assert docs != compare.json_values.json_documents(2, 20, 4096)
    assert {len(d) for d in compare.json_values.json_documents(1, 5, 300)} == {300}
    with pytest.raises(ValueError):
        compare.json_values.json_document(random.Random(1), 20)


def test_json_documents_compress_about_three_to_one_with_zstd_level_1():
    pytest.importorskip("zstandard")
    ratio = compare.json_values.zstd_ratio(compare.json_values.json_documents(1, 64, 4096))
    assert 2.5 <= ratio <= 4.0


def test_load_chunks_keep_loading_messages_small_and_one_value_is_a_pool_of_one():
    assert compare.value_pool(b"v" * 100) == [b"v" * 100]
    assert compare.value_pool([b"a", b"b"]) == [b"a", b"b"]
    assert compare.load_chunk([b"v" * 100]) == 1000
    assert compare.load_chunk([b"v" * 4096, b"x"]) == 32
    assert compare.load_chunk([b"v" * 10_000_000]) == 1


def test_toml_config_for_the_compression_settings():
    import tomllib

    text = compare.toml_config({"compression": "off", "compression_min_bytes": 1024,
                                "compression_min_saving": 0.1, "pin_cpus": False})
    assert tomllib.loads(text) == {"compression": "off", "compression_min_bytes": 1024,
                                   "compression_min_saving": 0.1, "pin_cpus": False}


def _json_rows(zstd_direct=3_000.0):
    Row = compare.Row
    return [Row("json-zstd", "sync GET, 4096 B JSON", "shardd-direct", "direct", 1, zstd_direct, 200.0, 300.0, 400.0),
            Row("json-zstd", "sync GET, 4096 B JSON", "shardd", "router", 1, None, note="n/a: the daemon refused"),
            Row("json-off", "sync GET, 4096 B JSON", "shardd-direct", "direct", 1, 4_000.0, 150.0, 250.0, 350.0),
            Row("json-off", "sync GET, 4096 B JSON", "shardd", "router", 1, 2_000.0, 300.0, 400.0, 500.0)]


def test_json_table_ratio_is_to_the_uncompressed_row_of_the_same_client_mode():
    lines = compare.format_json_table(_json_rows()).splitlines()
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    zstd_direct = next(line for line in lines if "zstd-compressed" in line and "shardd-direct" in line)
    assert f"0.75{compare.X}" in zstd_direct and "3,000" in zstd_direct
    refused = next(line for line in lines if "zstd-compressed" in line and "(router)" in line)
    assert "| n/a |" in refused and "refused" in refused


# --- the efficiency targets --------------------------------------------------------------------


def _efficiency(**overrides):
    M = compare.MemoryRow
    Row = compare.Row
    memory = [M("shardd", 1_000_000, 140 * 2**20, 480 * 2**20, None, "", 1.0, pss_empty=90 * 2**20,
                pss_loaded=430 * 2**20),
              M("redis", 1_000_000, 12 * 2**20, 195 * 2**20, None, "", 1.0, pss_empty=5 * 2**20,
                pss_loaded=190 * 2**20)]
    json_memory = [M("redis", 100_000, 12 * 2**20, 512 * 2**20, None, "", 1.0),
                   M(compare.JSON_ZSTD, 100_000, 140 * 2**20, 340 * 2**20, None, "", 1.0),
                   M(compare.JSON_OFF, 100_000, 140 * 2**20, 640 * 2**20, None, "", 1.0)]
    rows = [*_rows(),
            Row("get", "sync GET", "echo", "echo", 1, 13_500.0),
            Row("get", "sync GET", "echo-2hop", "echo", 1, 6_000.0)]
    kwargs = {"rows": rows, "memory": memory, "cpu": _cpu_rows(), "json_memory": json_memory,
              "json_rows": _json_rows(), "shards": 2}
    kwargs.update(overrides)
    return {t.name: t for t in compare.evaluate_efficiency_targets(**kwargs)}


def test_efficiency_targets_every_one_with_its_peer_or_floor():
    t = _efficiency()
    assert len(t) == 12
    per_key = t[f"1M {compare.X} 100 B: shardd memory per key vs Redis's (Δ RSS / key)"]
    assert per_key.measured == pytest.approx(340 / 183) and per_key.met is False and "0.90" in per_key.goal
    assert "not 1M" not in per_key.detail and "B/key" in per_key.detail
    total = t[f"1M {compare.X} 100 B: shardd total memory (PSS of every process, loaded) vs Redis's RSS"]
    assert total.measured == pytest.approx(430 / 195) and total.met is False and "1.20" in total.goal
    empty = t["empty 2-shard daemon: PSS of every process"]
    assert empty.measured == pytest.approx(90.0) and empty.unit == "MiB" and empty.goal == "≤ 60 MiB"
    assert empty.met is False and empty.detail == ""
    json_mem = t["JSON 4 KiB values: shardd memory per key vs Redis's for the same data (Δ RSS / key)"]
    assert json_mem.measured == pytest.approx(200 / 500) and json_mem.met is True
    direct = t["JSON 4 KiB values, direct: sync GET ops/s, compressed vs stored uncompressed"]
    assert direct.measured == 0.75 and direct.met is False and "≥ 0.90" in direct.goal
    router = t["JSON 4 KiB values, router: sync GET ops/s, compressed vs stored uncompressed"]
    assert router.measured is None and router.met is None  # the compressed daemon refused
    gm = t["get_many(100), direct: keys/s vs pymemcache get_many"]  # 420k vs 400k, goal 1.5x
    assert gm.measured == pytest.approx(1.05) and gm.met is False and "1.50" in gm.goal
    gm = t["get_many(100), router: keys/s vs pymemcache get_many"]  # 300k vs 400k, goal 1.0x
    assert gm.measured == 0.75 and gm.met is False and "1.00" in gm.goal
    cpu = t["server CPU per 1M GETs, direct: vs Redis's"]
    assert cpu.measured == 1.5 and cpu.met is True and "≤ 1.50" in cpu.goal
    cpu = t["server CPU per 1M GETs, router: vs Redis's"]
    assert cpu.measured == 2.5 and cpu.met is True and "achieved 4,990 of 5,000" in cpu.detail
    sync = t["sync GET, direct: ops/s vs one raw ZeroMQ hop (echo)"]  # 13k vs 13.5k
    assert sync.measured == pytest.approx(13 / 13.5) and sync.met is True and "0.95" in sync.goal
    sync = t["sync GET, router: ops/s vs two raw ZeroMQ hops (forwarder + echo)"]  # 6k vs 6k
    assert sync.measured == 1.0 and sync.met is True and "0.90" in sync.goal
    text = compare.format_targets(list(t.values()))
    assert "| 90.0 MiB |" in text and all(line.count("|") == 5 for line in text.splitlines())


def test_efficiency_targets_say_when_the_run_differs_from_what_they_name():
    M = compare.MemoryRow
    small = [M("shardd", 100_000, 140 * 2**20, 180 * 2**20, None, "", 1.0, pss_empty=90 * 2**20,
               pss_loaded=130 * 2**20),
             M("redis", 100_000, 12 * 2**20, 30 * 2**20, None, "", 1.0)]
    t = _efficiency(memory=small, shards=4)
    assert "100,000 keys, not 1M" in t[f"1M {compare.X} 100 B: shardd memory per key vs Redis's (Δ RSS / key)"].detail
    assert t["empty 2-shard daemon: PSS of every process"].detail == "measured with 4 shards"


def test_efficiency_targets_with_nothing_measured_are_all_not_measured():
    targets = compare.evaluate_efficiency_targets([], [], [], [], [], 2)
    assert len(targets) == 12 and all(t.measured is None and t.met is None for t in targets)
    text = compare.format_targets(targets)
    assert text.count("| not measured |") == 12


# --- the RESP section: redis-benchmark output, medians, table, targets --------------------------

X = compare.X
BENCH_CSV_70 = (
    '"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms",'
    '"max_latency_ms"\n'
    '"SET","13869.62","3.233","0.584","2.951","6.031","8.159","13.023"\n'
    '"GET","16556.29","2.771","0.440","2.071","7.271","12.711","22.431"\n'
)


def test_parse_benchmark_csv_reads_every_column_of_redis_benchmark_7():
    out = compare.parse_benchmark_csv(BENCH_CSV_70)
    assert set(out) == {"SET", "GET"}
    assert out["SET"]["rps"] == 13869.62
    assert out["SET"]["p50_latency_ms"] == 2.951 and out["SET"]["p99_latency_ms"] == 8.159
    assert out["GET"]["max_latency_ms"] == 22.431


def test_parse_benchmark_csv_skips_warnings_and_leaves_missing_columns_none():
    text = "WARNING: Could not fetch server CONFIG\r\n" + '"test","rps"\n"PING_INLINE","51020.41"\n'
    out = compare.parse_benchmark_csv(text)
    assert out == {"PING_INLINE": {**dict.fromkeys(compare.BENCH_COLUMNS), "rps": 51020.41}}
    assert compare.parse_benchmark_csv("") == {}
    assert compare.parse_benchmark_csv('"SET","1.0"\n') == {}  # no header: nothing to name the columns
    bad = BENCH_CSV_70 + '"INCR","n/a","1","1","1","1","1","1"\n"LPUSH","1"\n'
    assert set(compare.parse_benchmark_csv(bad)) == {"SET", "GET"}


def test_benchmark_argv_is_one_test_in_csv_with_the_keyspace_only_when_asked():
    argv = compare.benchmark_argv("/usr/bin/redis-benchmark", 6380, "get", 200_000, 50, 16)
    assert argv == ["/usr/bin/redis-benchmark", "-h", "127.0.0.1", "-p", "6380", "-t", "get", "-n", "200000",
                    "-c", "50", "-P", "16", "--csv"]
    assert compare.benchmark_argv("rb", 1, "set", 10, 1, 1, keyspace=1000)[-2:] == ["-r", "1000"]


def _resp_run(system, test, pipeline, ops, p99, server_cpu, bench_cpu=1.0, requests=200_000):
    return compare.RespRun(system, test, pipeline, requests, ops, p99 / 2, p99, server_cpu, bench_cpu, 1)


def test_summarize_resp_takes_each_figures_median_and_range_in_a_fixed_order():
    runs = [
        _resp_run("shardd-resp", "GET", 1, 10_000, 9.0, 10.0),
        _resp_run("redis", "GET", 1, 40_000, 2.0, 2.0),
        _resp_run("shardd-resp", "GET", 1, 14_000, 7.0, 12.0),
        _resp_run("shardd-resp", "GET", 1, 12_000, 11.0, 8.0),
        _resp_run("redis", "SET", 16, 400_000, 3.0, 0.2),
        _resp_run("redis", "SET", 1, 30_000, 2.0, 2.0),
    ]
    rows = compare.summarize_resp(runs)
    assert [(r.pipeline, r.test, r.system) for r in rows] == [(1, "SET", "redis"), (1, "GET", "redis"),
                                                             (1, "GET", "shardd-resp"), (16, "SET", "redis")]
    s = rows[2]
    assert (s.runs, s.ops_per_s, s.ops_range) == (3, 12_000, (10_000, 14_000))
    assert (s.p99_ms, s.p99_range) == (9.0, (7.0, 11.0))
    # 10, 12, 8 CPU seconds over 200,000 ops: 50, 60, 40 per 1M
    assert s.server_cpu_per_m == pytest.approx(50.0) and s.server_cpu_range == pytest.approx((40.0, 60.0))
    assert s.bench_cpu_per_m == pytest.approx(5.0)


def test_summarize_resp_with_missing_figures():
    rows = compare.summarize_resp([compare.RespRun("redis", "GET", 1, 100, 1.0, None, None, None, None, 1)])
    assert rows[0].p99_ms is None and rows[0].p99_range is None and rows[0].server_cpu_per_m is None


def test_resp_table_ratios_are_to_redis_at_the_same_test_and_depth():
    rows = compare.summarize_resp([
        _resp_run("redis", "GET", 1, 40_000, 2.0, 2.0),
        _resp_run("shardd-resp", "GET", 1, 20_000, 5.0, 10.0),
        _resp_run("redis", "GET", 16, 400_000, 4.0, 0.2),
        _resp_run("shardd-resp", "GET", 16, 100_000, 8.0, 4.0),
    ])
    table = compare.format_resp_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| test | pipeline | system |") and len(lines) == 6
    cells = lines[3].split(" | ")[1:9]
    assert cells == ["1", "shardd-resp", "20,000", "2.500", "5.000", f"0.50{X}", f"2.50{X}", "50.0"]
    assert f"| 0.25{X} | 2.00{X} |" in lines[5] and f"| 20.0 | 20.00{X} |" in lines[5]


def test_resp_targets_per_test_and_depth():
    rows = compare.summarize_resp([
        _resp_run("redis", "SET", 1, 40_000, 2.0, 2.0),
        _resp_run("shardd-resp", "SET", 1, 20_000, 7.0, 10.0),   # 0.5 times: met; p99 3.5 times: not
        _resp_run("redis", "SET", 16, 400_000, 4.0, 0.2),
        _resp_run("shardd-resp", "SET", 16, 90_000, 12.0, 4.0),  # 0.225 times: not; p99 3 times: met
        _resp_run("shardd-resp", "GET", 16, 90_000, 12.0, 4.0),  # no Redis row: not measured
    ])
    targets = compare.evaluate_resp_targets(rows)
    got = {t.name: t.met for t in targets}
    assert got == {
        "shardd-resp, SET -P 1: ops/s vs Redis's": True,
        "shardd-resp, SET -P 1: p99 vs Redis's": False,
        "shardd-resp, SET -P 16: ops/s vs Redis's": False,
        "shardd-resp, SET -P 16: p99 vs Redis's": True,
        "shardd-resp, GET -P 16: ops/s vs Redis's": None,
        "shardd-resp, GET -P 16: p99 vs Redis's": None,
    }
    text = compare.format_resp_verdicts(targets)
    assert text.splitlines()[0].startswith(f"- PASS shardd-resp, SET -P 1: ops/s vs Redis's: 0.50{X} (goal ≥ 0.50{X})")
    assert "- FAIL shardd-resp, SET -P 1: p99" in text and "- n/a  shardd-resp, GET -P 16" in text


def test_resp_options():
    args = compare.parse_args(["--resp"])
    assert args.workloads == ["resp"] and args.resp_rounds == 3 and args.rounds == 1
    assert (args.resp_requests, args.resp_clients, args.resp_pipelines, args.resp_tests) == (
        200_000, 50, [1, 16], ["set", "get"])
    assert args.resp_systems == ["redis", "shardd-resp", "shardd-resp-router"] and args.resp_keyspace == 0
    assert compare.parse_args(["--resp", "--repeat", "5"]).resp_rounds == 5
    assert compare.parse_args(["--quick", "--workloads", "get,resp"]).resp_requests == 20_000
    assert "resp" in compare.parse_args([]).workloads
    for bad in (["--resp-systems", "redis,dragonfly"], ["--resp-pipelines", "0"], ["--resp-pipelines", "x"],
                ["--resp-tests", "incr"]):
        with pytest.raises(SystemExit):
            compare.parse_args(bad)
