"""Latency impact and duration of online resizes with a loaded cache.

    python bench/resize.py --keys 1000000 [--procs 2] [--direct]

Starts `shardd serve --shards 2`, loads the keys, runs closed-loop GET/SET load from client
processes, resizes 2 → 3 and then 3 → 2 while the load runs, and prints each resize's
moved/total and duration, and p50/p99 latency before, during and after each resize.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

from shardd.client import Client
from shardd.errors import SharddError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(endpoint: str, keys: int, direct: bool, seed: int, stop, out) -> None:
    """Closed loop of 90% GET / 10% SET; sends back (start time, latency) of every request."""
    rng = random.Random(seed)
    samples: list[tuple[float, float]] = []
    errors: dict[str, int] = {}
    with Client(endpoint, timeout=10, direct=direct) as c:
        while not stop.is_set():
            key = f"key:{rng.randrange(keys)}"
            started = time.time()
            t = time.perf_counter()
            try:
                if rng.random() < 0.9:
                    c.get(key)
                else:
                    c.set(key, b"w" * 100)
            except SharddError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            samples.append((started, time.perf_counter() - t))
    out.put((samples, errors))


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--direct", action="store_true", help="load clients in direct mode")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds of load before, between and after")
    args = ap.parse_args()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory(prefix="shardd-resize-") as tmp:
        log = open(os.path.join(tmp, "shardd.log"), "wb")  # noqa: SIM115 - closed with the process
        daemon = subprocess.Popen([sys.executable, "-m", "shardd", "serve", "--bind", endpoint, "--shards", "2"],
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            with Client(endpoint, timeout=0.5) as c:
                while True:
                    try:
                        c.ping()
                        break
                    except SharddError:
                        time.sleep(0.05)
            t = time.monotonic()
            with Client(endpoint, timeout=30) as c:
                for lo in range(0, args.keys, 2000):
                    c.set_many({f"key:{i}": b"v" * 100 for i in range(lo, min(args.keys, lo + 2000))})
            print(f"loaded {args.keys} keys in {time.monotonic() - t:.1f} s")
            mp = multiprocessing.get_context("spawn")
            stop, out = mp.Event(), mp.Queue()
            procs = [mp.Process(target=_load, args=(endpoint, args.keys, args.direct, i, stop, out))
                     for i in range(args.procs)]
            for p in procs:
                p.start()
            marks = []
            with Client(endpoint, timeout=600) as admin:
                time.sleep(args.settle)
                for size in (3, 2):
                    begin = time.time()
                    result = admin.resize(size)
                    marks.append((begin, time.time(), result))
                    time.sleep(args.settle)
            stop.set()
            samples, errors = [], {}
            for _ in procs:
                s, e = out.get(timeout=120)
                samples += s
                for k, v in e.items():
                    errors[k] = errors.get(k, 0) + v
            for p in procs:
                p.join(30)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
    mode = "direct" if args.direct else "router"
    print(f"load: {args.procs} processes, {mode} mode, 90% GET / 10% SET over {args.keys} keys; "
          f"errors: {errors or 'none'}")
    (g0, g1, grow), (s0, s1, shrink) = marks
    phases = [("before", float("-inf"), g0), ("during 2→3", g0, g1), ("between", g1, s0),
              ("during 3→2", s0, s1), ("after", s1, float("inf"))]
    print("| phase | requests | p50 µs | p99 µs | max µs |")
    print("|---|---|---|---|---|")
    for name, lo, hi in phases:
        lat = [d for st, d in samples if lo <= st < hi]
        top = max(lat, default=0) * 1e6
        print(f"| {name} | {len(lat)} | {_pct(lat, 0.5):.0f} | {_pct(lat, 0.99):.0f} | {top:.0f} |")
    for r in (grow, shrink):
        print(f"resize {r['from']} → {r['to']}: moved {r['moved']}/{r['total']} "
              f"({r['moved'] / max(1, r['total']):.1%}) in {r['seconds']:.2f} s, lost {r['lost']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
