"""bench/cluster.py: its pure parts (no daemon), and one tiny end-to-end run (needs etcd)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
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


cluster = _load("shardd_bench_cluster", BENCH / "cluster.py")


def test_values_have_the_size_asked_and_name_their_key():
    assert cluster.value_for(7, 100) == b"7:" + b"v" * 98
    assert len(cluster.value_for(123456, 100)) == 100
    assert cluster.value_for(123456, 3) == b"123456:"  # never shorter than its index


def test_moved_keys_counts_what_left_the_old_nodes():
    before = {"a": 600, "b": 400}
    after = {"a": 400, "b": 266, "c": 334}
    assert cluster.moved_keys(before, after) == (334, pytest.approx(0.334))
    assert cluster.moved_keys({}, {"c": 5}) == (0, 0.0)


def test_analyse_kill_classes_errors_slow_ops_and_misses_by_owner():
    kill, changed = 100.0, 103.0
    dead = {1, 2}.__contains__
    ops = [
        (99.0, 99.001, 1, True, "hit"),      # before the kill: fine
        (99.5, 99.6, 3, True, "hit"),        # before, 100 ms
        (99.9, 102.0, 1, True, "Timeout"),   # in flight at the kill, failed
        (100.5, 101.0, 2, False, "NotSent"),
        (100.6, 100.601, 3, True, "hit"),
        (101.0, 103.2, 2, True, "miss"),     # slow, then served by the new owner
        (103.5, 103.501, 1, True, "miss"),   # after the map changed
        (103.6, 103.601, 2, False, "ok"),
        (103.7, 103.701, 3, True, "hit"),
        (104.0, 104.001, 2, True, "hit"),
    ]
    r = cluster.analyse_kill(ops, kill, changed, dead, slow_s=0.1)
    d, o = r["dead"], r["other"]
    assert d["errors"] == 2 and d["error_types"] == {"Timeout": 1, "NotSent": 1}
    assert d["errors_after_map"] == 0
    assert (d["ops_in_window"], d["ok_in_window"]) == (2, 1) and (o["ops_in_window"], o["ok_in_window"]) == (1, 1)
    assert d["slow"] == 3  # the two errors took long too
    assert d["max_latency_s"] == pytest.approx(2.2)
    assert d["max_latency_before_s"] == pytest.approx(0.001)
    assert d["first_trouble_s"] == pytest.approx(-0.1) and d["last_trouble_s"] == pytest.approx(3.2)
    assert d["gets_after"] == 2 and d["miss_rate_after"] == pytest.approx(0.5)
    assert d["first_served_s"] == pytest.approx(3.2)
    assert o["errors"] == 0 and o["slow"] == 0 and o["miss_rate_after"] == 0.0
    assert o["max_latency_before_s"] == pytest.approx(0.1)
    assert r["window_s"] == pytest.approx(3.2)


def test_analyse_kill_with_nothing_wrong():
    r = cluster.analyse_kill([(1.0, 1.001, 0, True, "hit")], 0.5, 0.6, lambda i: False, 0.1)
    assert r["window_s"] is None and r["dead"]["ops"] == 0 and r["dead"]["miss_rate_after"] is None


def test_histogram_summary_and_median_round():
    hist = cluster.Histogram()
    for us in range(1, 101):
        hist.record(us * 1000)
    s = cluster.summarise_hist(hist)
    assert s["count"] == 100 and s["p50_us"] == pytest.approx(50, rel=0.01) and s["max_us"] == 100
    runs = [{"ops_per_s": 3.0, "n": "c"}, {"ops_per_s": 1.0, "n": "a"}, {"ops_per_s": 2.0, "n": "b"}]
    assert cluster.median_round(runs)["n"] == "b"
    assert cluster.median_round(runs[:2])["n"] == "a"  # the lower middle


def test_table_and_formats():
    assert cluster.table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"
    assert cluster.ms(None) == "—" and cluster.ms(0.0125) == "12.5" and cluster.secs(2.345) == "2.35"
    assert cluster.pct(0.5) == "50.0%"


def test_arguments_are_checked():
    args = cluster.parse_args(["--only", "sim,join"])
    assert args.only == ["join", "sim"]  # in the script's order
    for bad in (["--only", "nope"], ["--ttl", "1"], ["--join-nodes", "1"], ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            cluster.parse_args(bad)


def test_a_tiny_run_end_to_end():
    """The script itself, on a real etcd and 3 real nodes: a graceful leave, and the simulation."""
    from tests.etcd_server import require_etcd

    require_etcd()
    out = subprocess.run([sys.executable, str(BENCH / "cluster.py"), "--only", "leave,sim", "--data-keys", "300",
                          "--before", "0.2", "--after", "0.2"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Graceful leave" in out.stdout and "N=100" in out.stdout
    row = next(line for line in out.stdout.splitlines() if line.startswith("| ") and "of 300" in line)
    assert "| 0 of 300 |" in row  # no loaded key lost on a planned leave
