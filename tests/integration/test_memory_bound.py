"""max_memory against a real daemon: RSS stays bounded, policies evict, noeviction refuses."""

from __future__ import annotations

import contextlib
import random
import time

import psutil
import pytest

import shardd
from shardd.errors import OutOfMemory

MiB = 1024 * 1024

# The documented fixed overhead on top of max_memory (README "Memory"): the daemon's own
# RSS when idle (Python, ZeroMQ, modules: ~25-40 MiB per process) plus 48 MiB for
# messages in flight and allocator slack.
SLACK = 48 * MiB


def write_config(tmp_path, **values) -> str:
    path = tmp_path / "shardd.toml"
    path.write_text("".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in values.items()))
    return str(path)


def tree_rss(daemon) -> int:
    procs = [psutil.Process(daemon.proc.pid), *daemon.children()]
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


def test_rss_stays_under_max_memory_plus_overhead_with_skewed_values(make_daemon, tmp_path):
    max_memory = 64 * MiB
    # Compression off: the big values here are b"v" * size, which zstd would shrink to nothing.
    d = make_daemon(config=write_config(tmp_path, max_memory="64MiB", compression="off"))
    idle = tree_rss(d)
    rng = random.Random(42)
    written, peak, i = 0, 0, 0
    with shardd.Client(d.endpoint, timeout=10) as client:
        while written < 6 * max_memory:  # 384 MiB through a 64 MiB cache
            with client.pipeline() as pipe:
                for _ in range(8):
                    size = int(2 ** rng.uniform(0, 20))  # log-uniform, 1 B to 1 MiB
                    pipe.set(f"k{i}", rng.randbytes(size) if size < 4096 else b"v" * size)
                    written += size
                    i += 1
                pipe.execute()
            if i % 64 == 0:
                peak = max(peak, tree_rss(d))
        stats = client.stats()
        for _ in range(3):  # the last values are readable
            assert client.get(f"k{i - 1}") is not None
    peak = max(peak, tree_rss(d))
    total = stats["total"]
    assert total["max_bytes"] == max_memory
    assert total["used_bytes"] <= max_memory
    assert total["evicted"] > 0 and total["evictions"] == {"allkeys-lru": total["evicted"]}
    assert total["oom_rejected"] == 0
    assert peak <= max_memory + idle + SLACK, (peak / MiB, idle / MiB)


def test_noeviction_refuses_with_out_of_memory_and_recovers(make_daemon, tmp_path):
    # Compression off here and below: these values are runs of one byte, which zstd erases.
    d = make_daemon(config=write_config(tmp_path, max_memory="4MiB", eviction_policy="noeviction", compression="off"))
    value = b"x" * 100_000
    stored = []
    with shardd.Client(d.endpoint, timeout=5) as client:
        with pytest.raises(OutOfMemory, match="noeviction"):
            for i in range(100):
                client.set(f"k{i}", value)
                stored.append(f"k{i}")
        refused = f"k{len(stored)}"
        assert client.get(refused) is None  # nothing half-written
        assert all(client.get(k) == value for k in stored)  # nothing evicted
        stats = client.stats()["total"]
        assert stats["evicted"] == 0 and stats["oom_rejected"] >= 1
        assert stats["used_bytes"] <= 4 * MiB
        client.delete_many(stored)
        assert client.set(refused, value)


def test_a_value_larger_than_a_shard_share_is_refused_without_evicting(make_daemon, tmp_path):
    d = make_daemon(config=write_config(tmp_path, max_memory="4MiB", max_value_bytes="4MiB",
                                        max_message_bytes="8MiB", compression="off"))
    with shardd.Client(d.endpoint, timeout=5) as client:
        client.set_many({f"small{i}": b"s" * 1000 for i in range(100)})
        with pytest.raises(OutOfMemory, match="larger than this shard's share"):
            client.set("big", b"b" * (3 * MiB))
        stats = client.stats()["total"]
        assert stats["evicted"] == 0 and stats["keys"] == 100


def test_lru_keeps_the_keys_being_read(make_daemon, tmp_path):
    d = make_daemon(config=write_config(tmp_path, max_memory="2MiB"))
    value = b"v" * 1000
    with shardd.Client(d.endpoint, timeout=5) as client:
        hot = [f"hot{i}" for i in range(100)]
        client.set_many({k: value for k in hot})
        for batch in range(30):  # 3000 x ~1.2 KiB through a 2 MiB cache, reading the hot keys as we go
            time.sleep(0.002)  # let the coarse LRU clock (ms) tell batches apart
            client.get_many(hot)
            client.set_many({f"cold{batch}-{j}": value for j in range(100)})
        found = client.get_many(hot)
        assert len(found) >= 95, len(found)
        assert client.stats()["total"]["evicted"] > 1000


def test_large_values_are_stored_compressed_and_read_back_exactly(make_daemon, tmp_path):
    d = make_daemon(config=write_config(tmp_path, max_memory="64MiB", compression_min_bytes=1024))
    doc = b'{"user": "ada", "items": [' + b", ".join(b'{"sku": %d, "qty": 1}' % i for i in range(200)) + b"]}"
    noise = random.Random(7).randbytes(4096)  # does not compress: stored as it is
    with shardd.Client(d.endpoint, timeout=10) as client:
        client.set("doc", doc)
        client.set("noise", noise)
        client.set("small", doc[:1000])  # under compression_min_bytes
        assert client.get("doc") == doc and client.get("noise") == noise and client.get("small") == doc[:1000]
        assert client.getdel("doc") == doc
        client.set("doc", doc)
        client.append("doc", b" ")
        assert client.get("doc") == doc + b" "
        shards = client.stats()["shards"]
    packed = sum(s["compressed_keys"] for s in shards)
    raw = sum(s["compressed_raw_bytes"] for s in shards)
    stored = sum(s["compressed_bytes"] for s in shards)
    assert packed == 1 and raw == len(doc) + 1 and 0 < stored < raw // 3
    # max_memory counts what is stored: the document's entry costs its compressed size.
    used = sum(s["used_bytes"] for s in shards)
    assert used < len(noise) + 1000 + len(doc) // 2
