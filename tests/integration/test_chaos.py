"""Chaos, the short CI version of bench/chaos.py: kill -9 five random workers under load."""

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
    # and the second after 0.1 s; 5 would stop the daemon (its crash-loop rule).
    # Counted, not timed: 5 kills and restarts, however long a busy machine makes them take
    # (the duration is only a cap). Restart times are reported, not bounded (bench/chaos.py
    # bounds them with --max-restart); client timeouts and the grace after a restart are wide
    # so a slow reply on a healthy shard is not mistaken for an error.
    kills = int(os.environ.get("SHARDD_CHAOS_KILLS", "5"))
    report = chaos.run_chaos(d.endpoint, duration=300.0, procs=2, kills=kills,
                             seed=int(os.environ.get("SHARDD_CHAOS_SEED", "7")), kills_per_minute=2,
                             max_restart=float("inf"), grace=2.0, client_timeout=30.0, wait_back=60.0)
    with capsys.disabled():
        print(f"\nchaos: {report}")
    assert report["ok"], report["problems"]
    assert report["kills"] == kills and report["errors_on_healthy_shards"] == 0
    assert report["ops_ok"] > 0
    assert "crash loop" not in d.log()
    assert d.stop() == 0, d.log()
    assert d.leftover == []
