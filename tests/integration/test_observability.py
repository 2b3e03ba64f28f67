"""Stats, hot keys, imbalance warnings, `shardd top` and Prometheus /metrics on a real daemon."""

from __future__ import annotations

import json
import random

from prometheus_client.parser import text_string_to_metric_families

import shardd
from shardd.hashing import shard_for
from tests.conftest import free_port
from tests.helpers import keys_on_shard, run_cli, scrape_metrics
from tests.integration.test_memory_bound import write_config


def test_stats_per_shard_and_total(daemon):
    with shardd.Client(daemon.endpoint, timeout=30) as client:
        client.flush()
        client.set_many({f"s{i}": b"x" * 10 for i in range(200)})
        client.get_many([f"s{i}" for i in range(300)])
        stats = client.stats()
    rows, total, imbalance = stats["shards"], stats["total"], stats["imbalance"]
    for row in rows:
        assert row["status"] == "up"
        for field in ("keys", "used_bytes", "max_bytes", "rss_bytes", "hits", "misses", "sets", "deletes",
                      "evicted", "evictions", "expired", "oom_rejected", "mailbox", "mailbox_high",
                      "ops_per_s", "service_p50_us", "service_p99_us", "cpu", "uptime_s", "policy"):
            assert field in row, field
        assert 0 < row["service_p50_us"] <= row["service_p99_us"]  # no upper bound: load stretches it
    assert total["keys"] == 200 == sum(row["keys"] for row in rows)
    assert total["hits"] >= 200 and total["misses"] >= 100
    assert total["max_bytes"] == 1024**3  # the default max_memory, split over the shards
    assert total["shards_up"] == daemon.shards
    assert 1.0 <= imbalance["keys"] < 1.5 and imbalance["threshold"] == 1.5


def test_stats_table_has_totals_and_fits_80_columns(daemon):
    r = run_cli(daemon.endpoint, "stats")
    assert r.returncode == 0, r.stderr
    assert max(len(line) for line in r.stdout.splitlines()) <= 80
    assert any(line.split()[:1] == ["total"] for line in r.stdout.splitlines() if line.strip())
    assert "imbalance max/mean" in r.stdout and "memory" in r.stdout


def test_hotkeys_lists_the_hammered_key_with_its_shard(daemon):
    with shardd.Client(daemon.endpoint, timeout=30) as client:
        client.set("hammered", b"1")
        with client.pipeline() as pipe:
            for _ in range(500):
                pipe.get("hammered")
            pipe.execute()
        for i in range(100):
            client.get(f"cold{i}")
        top = client.hotkeys(3)
    key, shard, rate, count, error = top["keys"][0]
    assert (key, shard) == (b"hammered", shard_for(b"hammered", daemon.shards))
    assert count - error <= 501 <= count and rate > 0
    r = run_cli(daemon.endpoint, "hotkeys", "--top", "3")
    assert r.returncode == 0, r.stderr
    first = next(line.split() for line in r.stdout.splitlines() if line.strip().startswith("1 "))
    assert first[1:3] == ["hammered", str(shard)]
    data = json.loads(run_cli(daemon.endpoint, "hotkeys", "--json", "-n", "2").stdout)
    assert data["keys"][0]["key"] == "hammered" and len(data["keys"]) == 2


def test_top_refreshes_and_stops(daemon):
    r = run_cli(daemon.endpoint, "top", "--iterations", "2", "--interval", "0.2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert sum(1 for line in lines if line.split()[:2] == ["0", "up"]) >= 1


def test_imbalance_is_logged_naming_the_hot_shard(make_daemon, tmp_path):
    d = make_daemon(config=write_config(tmp_path, imbalance_check_s=0.2))
    with shardd.Client(d.endpoint, timeout=5) as client:
        client.set_many({k: b"v" for k in keys_on_shard(1, d.shards, 2500)})
        imbalance = client.stats()["imbalance"]
    assert imbalance["keys"] == 2.0 and imbalance["hot_shard_keys"] == 1
    d.wait_for_log("shard 1 is hot: 2.00x the mean keys")


def test_prometheus_metrics_scrape(make_daemon, tmp_path):
    port = free_port()
    d = make_daemon(config=write_config(tmp_path, metrics_bind=f"127.0.0.1:{port}", max_memory="8MiB"))
    with shardd.Client(d.endpoint, timeout=5) as client:
        noise = random.Random(1).randbytes(2000)  # incompressible: zstd would shrink b"x" * 2000 to nothing
        client.set_many({f"m{i}": noise for i in range(5000)})  # ~11 MiB: evicts
        client.get("m1")
    text = scrape_metrics(port)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("shardd_up", ())] == 1
    keys = [samples[("shardd_keys", (("shard", str(i)),))] for i in range(d.shards)]
    assert sum(keys) > 0
    assert families["shardd_ops"].type == "counter"
    assert samples[("shardd_ops_total", (("shard", "0"),))] > 0
    assert samples[("shardd_memory_max_bytes", (("shard", "0"),))] == 4 * 1024 * 1024
    assert samples[("shardd_memory_arena_bytes", (("shard", "0"),))] > 0
    assert sum(v for (name, _), v in samples.items() if name == "shardd_evicted_keys_total") > 0
    assert families["shardd_service_seconds"].type == "histogram"
    inf = samples[("shardd_service_seconds_bucket", (("le", "+Inf"), ("shard", "0")))]
    assert inf == samples[("shardd_service_seconds_count", (("shard", "0"),))] > 0
    assert ("shardd_imbalance_ratio", (("dimension", "keys"),)) in samples
    assert d.stop() == 0
