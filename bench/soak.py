"""Soak: hold a running daemon at ~70% of its measured capacity and watch RSS and p99 over time.

    python bench/soak.py --endpoint tcp://127.0.0.1:7400 --duration 600 --interval 30 [--json]

Theory of operation
-------------------
1. Preload every key (``key:0`` … ``key:K-1``, ``--value-size`` bytes), so the data set is at
   its final size before the first RSS sample: from then on any growth is the daemon's, not
   the data's.
2. Capacity: ``bench/loadgen.py`` with the same processes and mix, closed loop, for
   ``--capacity-seconds``; its ops/s is the capacity of this client setup.
3. Soak: ``--soak-procs`` processes (2 x ``--procs``) each send ops on a fixed schedule adding up to
   ``--load-fraction`` times capacity (open loop: a late op is sent at once, and its latency is
   measured from when it was *due*, so a stall shows up in p99 instead of hiding as fewer
   requests). Every ``--interval`` seconds the parent prints ops/s, errors, p50/p99, and the
   RSS of the router and the workers (pids from ``stats``).
4. Verdict: RSS is flagged when the last interval is above the first by more than
   ``--rss-tolerance`` MiB (default 8) and 5%; p99 is flagged when the last interval's is
   over twice the median interval's. Exit 0 when nothing is flagged and no op failed, 1
   otherwise, 2 when the daemon cannot be reached.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_UNREACHABLE = 0, 1, 2
HERE = os.path.dirname(os.path.abspath(__file__))


def _pace(index: int, opts: dict[str, Any], start_at: Any, go: Any, results: Any) -> None:
    """One load process: ops due every 1/rate s from the common start; one report per interval."""
    from shardd import Client, SharddError

    results.put(("ready", index, None, 0))
    if not go.wait(60):
        return
    start = start_at.value
    rng = random.Random(index)
    period = opts["soak_procs"] / opts["rate"]
    value = b"x" * opts["value_size"]
    interval, intervals = opts["interval"], opts["intervals"]
    latencies: list[int] = []
    errors = 0
    current = 0
    due = start + rng.random() * period  # processes out of phase
    with Client(opts["endpoint"], timeout=2.0) as c:
        while True:
            now = time.monotonic()
            slot = int((due - start) // interval)
            if slot != current:
                results.put((index, current, latencies, errors))
                latencies, errors, current = [], 0, slot
                if slot >= intervals:
                    return
            if now < due:
                time.sleep(due - now)
            key = b"key:%d" % rng.randrange(opts["keys"])
            try:
                if rng.random() < opts["get_ratio"]:
                    c.get(key)
                else:
                    c.set(key, value)
                latencies.append(int((time.monotonic() - due) * 1e9))
            except SharddError:
                errors += 1
            due += period


def _rss(endpoint: str) -> tuple[int, int]:
    """(RSS of the router and the workers, keys stored), from the pids ``stats`` reports."""
    import psutil

    from shardd import Client

    with Client(endpoint, timeout=2.0) as c:
        stats = c.stats()
    pids = [stats["router"]["pid"], *(row["pid"] for row in stats["shards"] if row.get("pid"))]
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += psutil.Process(pid).memory_info().rss
    return total, stats["total"]["keys"]


def _quantile(values: list[int], q: float) -> float:
    return values[min(len(values) - 1, int(len(values) * q))] / 1e6 if values else float("nan")


def measure_capacity(opts: dict[str, Any]) -> float:
    cmd = [sys.executable, os.path.join(HERE, "loadgen.py"), "--endpoint", opts["endpoint"],
           "--procs", str(opts["procs"]), "--duration", str(opts["capacity_seconds"]), "--warmup", "1",
           "--keys", str(opts["keys"]), "--value-size", str(opts["value_size"]),
           "--get-ratio", str(opts["get_ratio"]), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=opts["capacity_seconds"] + 60)
    report = json.loads(out.stdout)
    return float(report["ops_per_s"])


def run_soak(opts: dict[str, Any], say: Any = print) -> dict[str, Any]:
    from shardd import Client

    with Client(opts["endpoint"], timeout=5.0) as c:
        value = b"x" * opts["value_size"]
        for first in range(0, opts["keys"], 1000):
            c.set_many({b"key:%d" % i: value for i in range(first, min(first + 1000, opts["keys"]))})
    capacity = opts.get("capacity") or measure_capacity(opts)
    rate = capacity * opts["load_fraction"]
    opts = {**opts, "rate": rate, "intervals": max(1, round(opts["duration"] / opts["interval"]))}
    say(f"capacity {capacity:,.0f} ops/s ({opts['procs']} processes, closed loop); soaking at "
        f"{rate:,.0f} ops/s from {opts['soak_procs']} processes for {opts['intervals']} x {opts['interval']:g} s")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    start_at, go = ctx.Value("d", 0.0), ctx.Event()
    procs = [ctx.Process(target=_pace, args=(i, opts, start_at, go, results)) for i in range(opts["soak_procs"])]
    for p in procs:
        p.start()
    for _ in procs:  # every process imported and connected: start together (monotonic is one clock)
        assert results.get(timeout=60)[0] == "ready"
    start_at.value = time.monotonic() + 0.2
    go.set()
    rows = []
    pending: dict[int, list[tuple[list[int], int]]] = {}
    try:
        for slot in range(opts["intervals"]):
            while len(pending.get(slot, [])) < len(procs):
                _, got_slot, lat, errs = results.get(timeout=opts["interval"] + 30)
                pending.setdefault(got_slot, []).append((lat, errs))
            parts = pending.pop(slot)
            lat = sorted(x for part, _ in parts for x in part)
            rss, keys = _rss(opts["endpoint"])
            row = {"t_s": round((slot + 1) * opts["interval"], 1), "ops_per_s": round(len(lat) / opts["interval"]),
                   "errors": sum(e for _, e in parts), "p50_ms": round(_quantile(lat, 0.5), 3),
                   "p99_ms": round(_quantile(lat, 0.99), 3), "rss_mib": round(rss / 2**20, 1), "keys": keys}
            rows.append(row)
            say("  ".join(f"{k} {v}" for k, v in row.items()))
    finally:
        for p in procs:
            p.join(opts["interval"] + 10)
            if p.is_alive():
                p.kill()
                p.join()
    first, last = rows[0], rows[-1]
    growth = last["rss_mib"] - first["rss_mib"]
    flags = []
    if growth > opts["rss_tolerance"] and growth > 0.05 * first["rss_mib"]:
        flags.append(f"RSS grew {growth:.1f} MiB ({first['rss_mib']} -> {last['rss_mib']})")
    median_p99 = statistics.median(r["p99_ms"] for r in rows)
    if last["p99_ms"] > 2 * median_p99:
        flags.append(f"p99 rose to {last['p99_ms']} ms (median interval {median_p99} ms)")
    errors = sum(r["errors"] for r in rows)
    if errors:
        flags.append(f"{errors} ops failed")
    return {"capacity_ops_per_s": round(capacity), "rate_ops_per_s": round(rate), "intervals": rows,
            "rss_mib": {"start": first["rss_mib"], "end": last["rss_mib"], "growth": round(growth, 1)},
            "p99_ms": {"first": first["p99_ms"], "last": last["p99_ms"], "median": median_p99},
            "flags": flags, "ok": not flags}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", default=os.environ.get("SHARDD_ENDPOINT", "tcp://127.0.0.1:7400"))
    ap.add_argument("--duration", type=float, default=600.0, help="soak seconds (default 600)")
    ap.add_argument("--interval", type=float, default=30.0, help="seconds per report line (default 30)")
    ap.add_argument("--procs", type=int, default=2, help="processes measuring capacity (default 2)")
    ap.add_argument("--soak-procs", type=int, default=0,
                    help="processes sharing the soak rate (default 2 x --procs: each one waits for each reply, "
                         "so each needs slack to catch up after a stall)")
    ap.add_argument("--load-fraction", type=float, default=0.7, help="fraction of capacity (default 0.7)")
    ap.add_argument("--capacity-seconds", type=float, default=5.0, help="seconds to measure capacity (default 5)")
    ap.add_argument("--capacity", type=float, default=0.0, help="skip the measurement: capacity in ops/s")
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--get-ratio", type=float, default=0.9)
    ap.add_argument("--rss-tolerance", type=float, default=8.0, help="MiB of RSS growth tolerated (default 8)")
    ap.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = ap.parse_args(argv)
    from shardd import Client, SharddError

    try:
        with Client(args.endpoint, timeout=2.0) as c:
            c.ping()
    except SharddError as exc:
        print(f"soak: cannot reach {args.endpoint}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    args.soak_procs = args.soak_procs or 2 * args.procs
    report = run_soak(vars(args), say=(lambda m: None) if args.json else print)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"RSS {report['rss_mib']['start']} -> {report['rss_mib']['end']} MiB; p99 first "
              f"{report['p99_ms']['first']} ms, last {report['p99_ms']['last']} ms; "
              + ("; ".join(report["flags"]) if report["flags"] else "flat: nothing flagged"))
    return EXIT_OK if report["ok"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
