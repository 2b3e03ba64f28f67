"""Chaos, the short CI version of bench/chaos.py: kill -9 random workers under load for ~8 s."""

from __future__ import annotations

import importlib.util
import os

from tests.conftest import REPO


def _chaos_module():
    spec = importlib.util.spec_from_file_location("shardd_bench_chaos", REPO / "bench" / "chaos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_killing_workers_under_load_disturbs_only_their_own_clients(make_daemon, capsys):
    d = make_daemon(shards=4)
    chaos = _chaos_module()
    # At most 2 kills of one shard per minute: the supervisor restarts the first death at once
    # and the second after 0.1 s, so every restart can be held to < 1 s; 5 would stop the daemon.
    report = chaos.run_chaos(d.endpoint, duration=float(os.environ.get("SHARDD_CHAOS_SECONDS", "8")), procs=2,
                             seed=int(os.environ.get("SHARDD_CHAOS_SEED", "7")), kills_per_minute=2)
    with capsys.disabled():
        print(f"\nchaos: {report}")
    assert report["ok"], report["problems"]
    assert report["kills"] >= 5 and report["errors_on_healthy_shards"] == 0
    assert report["ops_ok"] > 1000
    assert "crash loop" not in d.log()
    assert d.stop() == 0, d.log()
    assert d.leftover == []
