"""Near caches seen from outside (docs/near-cache.md, "Observability"): the marked keys and the
invalidations sent in `stats`, `shardd stats`, `shardd hotkeys` and /metrics, and the client's
own counters, on a real daemon that marks a key hot after a client reads it in a loop."""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

import shardd
from shardd import protocol as p
from shardd.hashing import shard_for
from shardd.metrics import families
from shardd.router_stats import combine_hotkeys, combine_near
from tests.conftest import free_port
from tests.helpers import run_cli, scrape_metrics, wait_until
from tests.integration.test_memory_bound import write_config

KEY = b"celebrity"


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = scrape_metrics(port)
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["shardd_near_hot_keys"].type == "gauge"
    for name in ("shardd_near_invalidation_messages", "shardd_near_keys_invalidated", "shardd_near_resets"):
        assert fams[name].type == "counter", name
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}


def _near(stats: dict, shard: int) -> dict:
    return next(row for row in stats["shards"] if row["shard"] == shard)["near"]


def test_marked_keys_and_invalidations_show_in_stats_hotkeys_metrics_and_the_client(make_daemon, tmp_path):
    port = free_port()
    d = make_daemon(config=write_config(tmp_path, metrics_bind=f"127.0.0.1:{port}", hot_key_min_rate=1.0,
                                        hot_key_share=0.001))
    home = shard_for(KEY, d.shards)
    with shardd.Client(d.endpoint, timeout=5) as reader, \
            shardd.Client(d.endpoint, timeout=5, near_cache=False) as admin:
        admin.set(KEY, b"v1")

        def cached_and_marked() -> dict | None:
            for _ in range(50):
                assert reader.get(KEY) == b"v1"
            if reader.near_cache_stats()["admitted"] < 1:
                return None
            stats = admin.stats()
            return stats if _near(stats, home)["marked"] >= 1 else None

        stats = wait_until(cached_and_marked, timeout=30, interval=0, what="the key marked and cached")
        # stats: the per-shard blocks and their sum
        near = stats["near_cache"]
        assert near["marked"] >= 1 and near["shards"] == d.shards
        assert near["marked"] == sum(row["near"]["marked"] for row in stats["shards"])
        for field, part in (("invalidation_messages", "messages"), ("keys_invalidated", "keys_invalidated"),
                            ("resets", "resets")):
            assert near[field] == sum(row["near"][part] for row in stats["shards"]), field

        # the client: reads of the kept copy are hits, not requests
        before = reader.near_cache_stats()
        assert before["following"] and before["feeds"] >= 1
        def hit() -> bool:  # served locally once the feed has spoken lately (heartbeats every 0.1 s)
            assert reader.get(KEY) == b"v1"
            return reader.near_cache_stats()["hits"] > before["hits"]

        wait_until(hit, timeout=30, interval=0, what="a read served from the near cache")

        # `shardd hotkeys`: the key is marked in the table, the JSON and the per-shard line
        r = run_cli(d.endpoint, "hotkeys", "--top", "5")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert max(len(line) for line in lines) <= 80
        header = next(line.split() for line in lines if line.split()[:2] == ["#", "key"])
        assert header[-1] == "hot"
        row = next(line.split() for line in lines if KEY.decode() in line.split())
        assert row[2] == str(home) and row[-1] == "hot"
        marked_now = {row["shard"]: row["near"]["marked"] for row in admin.stats()["shards"]}
        summary = next(line for line in lines if line.startswith("near cache: keys marked hot:"))
        assert f"shard {home} " in summary
        data = json.loads(run_cli(d.endpoint, "hotkeys", "--json", "-n", "5").stdout)
        assert next(row for row in data["keys"] if row["key"] == KEY.decode())["hot"] is True
        assert [row["shard"] for row in data["marked"]] == list(range(d.shards))
        reply = admin.hotkeys(5)
        assert KEY in reply["hot"] and {row["shard"] for row in reply["marked"]} == set(range(d.shards))
        assert next(row for row in reply["marked"] if row["shard"] == home)["marked"] >= 1
        assert marked_now[home] >= 1

        # `shardd stats`: one line about near caches
        r = run_cli(d.endpoint, "stats")
        assert r.returncode == 0, r.stderr
        assert max(len(line) for line in r.stdout.splitlines()) <= 80
        assert any(line.startswith("near cache: ") and "hot keys marked" in line and "invalidations sent" in line
                   for line in r.stdout.splitlines()), r.stdout

        # a write by another client is invalidated: the shard's counters grow, the reader drops its copy
        sent = admin.stats()["near_cache"]
        dropped = reader.near_cache_stats()["invalidations"]
        admin.set(KEY, b"v2")  # acknowledged only after its invalidation is on its way
        after = admin.stats()["near_cache"]
        assert after["invalidation_messages"] > sent["invalidation_messages"]
        assert after["keys_invalidated"] > sent["keys_invalidated"]
        wait_until(lambda: reader.get(KEY) == b"v2", timeout=30, what="the reader seeing the write")
        assert reader.near_cache_stats()["invalidations"] > dropped

        # /metrics: the same numbers per shard, between two stats taken around the scrape
        first = admin.stats()
        samples = _scrape(port)
        last = admin.stats()
        for shard in range(d.shards):
            label = (("shard", str(shard)),)
            lo, hi = _near(first, shard), _near(last, shard)
            for name, field in (("shardd_near_invalidation_messages_total", "messages"),
                                ("shardd_near_keys_invalidated_total", "keys_invalidated"),
                                ("shardd_near_resets_total", "resets")):
                assert lo[field] <= samples[(name, label)] <= hi[field], (name, shard)
            assert samples[("shardd_near_hot_keys", label)] in (lo["marked"], hi["marked"])
        assert samples[("shardd_near_invalidation_messages_total", (("shard", str(home)),))] >= 1
    assert d.stop() == 0


def test_near_fields_are_absent_or_empty_without_near_caches():
    """Shards that predate near caches (or run without them): the merged replies keep their old
    shape plus empty near fields, and /metrics has no near series."""
    parts = [(0, None, {"top": 2, "window_s": 10.0, "keys": [[b"a", 5.0, 50, 0]]}),
             (1, None, {"top": 2, "window_s": 10.0, "keys": [[b"b", 9.0, 90, 0]]})]
    merged = combine_hotkeys(parts)
    assert merged["keys"] == [[b"b", 1, 9.0, 90, 0], [b"a", 0, 5.0, 50, 0]]
    assert merged["hot"] == [] and merged["marked"] == []
    assert combine_near([None, None]) is None
    rows = [{"shard": 0, "status": "up", "keys": 1}]
    names = {f.name for f in families({"shards": rows, "router": {}})}
    assert not any(name.startswith("shardd_near_") for name in names)


def test_hotkeys_merge_keeps_each_shards_marks_and_counts():
    parts = [(0, None, {"top": 2, "window_s": 10.0, "keys": [[b"a", 5.0, 50, 0], [b"c", 1.0, 10, 0]],
                        "hot": [b"a"], "marked": 3}),
             (1, None, (p.UNAVAILABLE, "timeout")),
             (2, None, {"top": 2, "window_s": 12.0, "keys": [[b"b", 9.0, 90, 0]], "hot": [], "marked": 0})]
    merged = combine_hotkeys(parts)
    assert [row[0] for row in merged["keys"]] == [b"b", b"a"]  # top 2: c is cut, and so is its mark
    assert merged["hot"] == [b"a"]
    assert merged["marked"] == [{"shard": 0, "marked": 3}, {"shard": 2, "marked": 0}]
    assert merged["missing"] == [{"shard": 1, "status": "timeout"}]
    assert combine_near([{"marked": 2, "messages": 5, "keys_invalidated": 7, "resets": 1, "seq": 5}, None,
                         {"marked": 1, "messages": 1, "keys_invalidated": 1, "resets": 0, "seq": 1}]) == {
        "marked": 3, "invalidation_messages": 6, "keys_invalidated": 8, "resets": 1, "shards": 2}
