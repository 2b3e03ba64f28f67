"""Memory report: what N keys cost in shardd (accounted and RSS) and in Redis; and the bound.

    python bench/memory.py                         # 1M keys x 100 B: shardd vs Redis
    python bench/memory.py --keys 200000 --no-redis
    python bench/memory.py --bound --max-memory 256MiB --write-factor 8   # RSS under skewed writes

Theory of operation
-------------------
*Footprint* (default): starts ``shardd serve`` on a free loopback port (``--shards``, a
max_memory large enough that nothing is evicted), loads ``key:0`` … ``key:N-1`` with
``--value-size``-byte values through ``set_many`` batches, and reports ``used_bytes`` (what
shardd accounts, which max_memory limits), bytes per key, and the growth of the workers'
RSS and of the whole process tree. Then starts ``redis-server`` (no persistence) on another
free port, loads the same keys and values with redis-py pipelines, and reports
``used_memory`` growth per key (Redis's own accounting, including its allocator's rounding)
and RSS.

*Bound* (``--bound``): a daemon with ``--max-memory`` and the default allkeys-lru policy
receives ``--write-factor`` times max_memory of values whose sizes are log-uniform between
1 B and 1 MiB (the skew behind dragonfly#224-style reports); the process tree's RSS is
sampled throughout and the peak is reported against max_memory + the idle RSS.

Processes are started and stopped here (SIGTERM, waited for); nothing is left running.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

import shardd
from shardd.config import parse_size

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss(pid: int, worker_pids: set[int] = frozenset()) -> tuple[int, list[int]]:
    """RSS of a process and its descendants; and that of each of ``worker_pids`` (from ``stats``)."""
    root = psutil.Process(pid)
    total, workers = 0, []
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            rss = proc.memory_info().rss
            total += rss
            if proc.pid in worker_pids:
                workers.append(rss)
    return total, workers


def worker_pids(client: Any) -> set[int]:
    return {row["pid"] for row in client.stats()["shards"] if row.get("pid")}


@contextlib.contextmanager
def shardd_daemon(shards: int, settings: dict[str, Any]):
    tmp = Path(tempfile.mkdtemp(prefix="shardd-bench-"))
    config = tmp / "shardd.toml"
    config.write_text("".join(f'{k} = "{v}"\n' if isinstance(v, str) else f"{k} = {v}\n"
                              for k, v in settings.items()))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    log = open(tmp / "shardd.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "shardd", "serve", "--bind", endpoint, "--shards", str(shards),
                             "--runtime-dir", str(tmp / "run"), "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        with shardd.Client(endpoint, timeout=30) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    client.ping()
                    break
                except shardd.SharddError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"shardd did not start:\n{(tmp / 'shardd.log').read_text()}") from None
                    time.sleep(0.1)
            yield proc, client
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def footprint_shardd(n: int, size: int, shards: int, batch: int) -> dict[str, Any]:
    with shardd_daemon(shards, {"max_memory": "64GiB"}) as (proc, client):
        pids = worker_pids(client)
        idle_total, idle_workers = tree_rss(proc.pid, pids)
        value = b"v" * size
        t = time.perf_counter()
        for start in range(0, n, batch):
            client.set_many([(b"key:%d" % i, value) for i in range(start, min(n, start + batch))])
        load_s = time.perf_counter() - t
        total = client.stats()["total"]
        rss_total, workers = tree_rss(proc.pid, pids)
    assert total["keys"] == n and total["evicted"] == 0
    return {
        "keys": n, "value_bytes": size, "shards": shards, "load_s": round(load_s, 1),
        "used_bytes": total["used_bytes"], "used_bytes_per_key": round(total["used_bytes"] / n, 1),
        "workers_rss_growth_per_key": round((sum(workers) - sum(idle_workers)) / n, 1),
        "daemon_rss_bytes": rss_total, "daemon_idle_rss_bytes": idle_total,
    }


def footprint_redis(n: int, size: int, batch: int) -> dict[str, Any]:
    import redis

    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server not found (apt-get install -y redis-server), or pass --no-redis")
    port = free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        r = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                r.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        before = r.info("memory")
        value = b"v" * size
        t = time.perf_counter()
        for start in range(0, n, batch):
            r.mset({b"key:%d" % i: value for i in range(start, min(n, start + batch))})
        load_s = time.perf_counter() - t
        after = r.info("memory")
        version = r.info("server")["redis_version"]
        assert r.dbsize() == n
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return {
        "redis_version": version, "load_s": round(load_s, 1),
        "used_memory": after["used_memory"],
        "used_memory_per_key": round((after["used_memory"] - before["used_memory"]) / n, 1),
        "used_memory_rss": after["used_memory_rss"],
        "allocator": after.get("mem_allocator"),
    }


def bound(max_memory: int, factor: float, shards: int, seed: int) -> dict[str, Any]:
    with shardd_daemon(shards, {"max_memory": max_memory}) as (proc, client):
        idle, _ = tree_rss(proc.pid)
        rng = random.Random(seed)
        written, peak, i = 0, idle, 0
        t = time.perf_counter()
        while written < factor * max_memory:
            with client.pipeline() as pipe:
                for _ in range(8):
                    size = int(2 ** rng.uniform(0, 20))
                    pipe.set(b"k%d" % i, b"v" * size)
                    written += size
                    i += 1
                pipe.execute()
            if i % 64 == 0:
                peak = max(peak, tree_rss(proc.pid)[0])
        total = client.stats()["total"]
        peak = max(peak, tree_rss(proc.pid)[0])
    return {
        "max_memory": max_memory, "written_bytes": written, "writes": i, "seconds": round(time.perf_counter() - t, 1),
        "idle_rss_bytes": idle, "peak_rss_bytes": peak,
        "peak_over_max_memory_plus_idle_bytes": peak - max_memory - idle,
        "used_bytes": total["used_bytes"], "keys": total["keys"], "evicted": total["evicted"],
        "oom_rejected": total["oom_rejected"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--shards", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch", type=int, default=1000, help="keys per set_many / MSET")
    ap.add_argument("--no-redis", action="store_true")
    ap.add_argument("--bound", action="store_true", help="run the RSS bound experiment instead")
    ap.add_argument("--max-memory", default="256MiB")
    ap.add_argument("--write-factor", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.bound:
        result: dict[str, Any] = {"bound": bound(parse_size(args.max_memory, "--max-memory"), args.write_factor,
                                                 args.shards, args.seed)}
    else:
        result = {"shardd": footprint_shardd(args.keys, args.value_size, args.shards, args.batch)}
        if not args.no_redis:
            result["redis"] = footprint_redis(args.keys, args.value_size, args.batch)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for system, numbers in result.items():
        print(f"{system}:")
        for k, v in numbers.items():
            shown = f"{v / MiB:.1f} MiB" if isinstance(v, int) and k.endswith(("bytes", "memory", "rss")) \
                and v > 10 * MiB else v
            print(f"  {k:40} {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
