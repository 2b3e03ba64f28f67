"""Closed-loop load generator for a running shardd daemon.

    python bench/loadgen.py --endpoint tcp://127.0.0.1:7400 --procs 4 --duration 10 \\
        --warmup 2 --keys 10000 --value-size 100 --get-ratio 0.9 [--pipeline 16] [--preload] [--json]

Theory of operation
-------------------
The parent checks that the daemon answers a ping (exit 2 with a clear message if not),
optionally preloads every key, then starts ``--procs`` processes with the ``spawn`` method.
Each process opens its own ``shardd.Client`` and, once all are connected, runs the same
closed loop: pick a uniform random key ``key:<n>``, send a GET (probability
``--get-ratio``) or a SET, wait for the reply, repeat. With ``--pipeline D`` each iteration
sends D such ops in one pipeline and waits for all D replies.

The clock is ``time.perf_counter_ns`` (monotonic). Requests that *start* during the warm-up
are not measured; requests that start in the measured window are, even if they finish
after it, and each process's throughput is divided by its own measured time. Latency is
per request (``--pipeline 1``) or per pipeline (``--pipeline D``: the time for all D replies)
and goes into a :class:`Histogram`; the processes' histograms are merged at the end.
Failed ops are counted by exception type. A failed single request never enters the
histogram; a pipeline does as long as at least one of its ops succeeded.

Nothing here imports daemon modules: only the public client. ``Histogram`` has no
dependencies at all, so it can be unit-tested by loading this file with importlib.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import queue
import random
import sys
import time
from collections import Counter
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1  # the run happened but went wrong (a process died, or nothing succeeded)
EXIT_UNREACHABLE = 2  # the daemon could not be reached, or the arguments are invalid

# --- histogram --------------------------------------------------------------------------


class Histogram:
    """A log-bucketed histogram of non-negative integers (here: nanoseconds), HdrHistogram-like.

    Values below 256 have a bucket each. Above, every power-of-two range [2^k, 2^(k+1)) is
    split into 128 equal buckets, so a bucket is at most 1/128 of its lower bound wide:
    reported values (bucket midpoints, clamped to the exact min and max) are within 0.4%
    of the truth, and any percentile within one bucket of it. A bucket's index is
    ``(e << 7) + (v >> e)`` with ``e = v.bit_length() - 8``: cheap enough for a hot loop,
    monotonic in ``v``, and contiguous with the exact range below 256.

    Counts live in a dict keyed by bucket index (a few hundred entries for a latency
    distribution), so histograms are small to ship between processes and merge by adding
    counts.
    """

    __slots__ = ("count", "counts", "max", "min", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total = 0  # sum of recorded values, for the mean
        self.min = 0
        self.max = 0

    @staticmethod
    def index_of(value: int) -> int:
        if value < 256:
            return value
        e = value.bit_length() - 8
        return (e << 7) + (value >> e)

    @staticmethod
    def bucket_range(index: int) -> tuple[int, int]:
        """The lowest and highest value that fall into bucket ``index``."""
        if index < 256:
            return index, index
        e = (index >> 7) - 1
        m = index - (e << 7)
        return m << e, ((m + 1) << e) - 1

    def record(self, value: int, n: int = 1) -> None:
        """Count ``value`` (a non-negative int) ``n`` times."""
        if value < 0:
            raise ValueError(f"a histogram records non-negative values, got {value}")
        if value < 256:
            index = value
        else:
            e = value.bit_length() - 8
            index = (e << 7) + (value >> e)
        counts = self.counts
        counts[index] = counts.get(index, 0) + n
        if not self.count or value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self.count += n
        self.total += value * n

    def merge(self, other: Histogram) -> Histogram:
        """Add ``other``'s counts into this histogram; returns self."""
        if not other.count:
            return self
        counts = self.counts
        for index, n in other.counts.items():
            counts[index] = counts.get(index, 0) + n
        self.min = other.min if not self.count else min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count
        self.total += other.total
        return self

    def percentile(self, q: float) -> int:
        """The value below or at which ``q`` percent of the recorded values lie (0 if empty)."""
        if not 0 <= q <= 100:
            raise ValueError(f"percentile must be in [0, 100], got {q}")
        if not self.count:
            return 0
        if q == 0:
            return self.min
        if q == 100:
            return self.max
        rank = max(1, math.ceil(q / 100 * self.count))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                lo, hi = self.bucket_range(index)
                return min(max((lo + hi) // 2, self.min), self.max)
        return self.max

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON- and pickle-friendly form (see from_dict)."""
        return {"counts": sorted(self.counts.items()), "count": self.count, "total": self.total,
                "min": self.min, "max": self.max}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Histogram:
        h = cls()
        h.counts = {int(i): int(n) for i, n in data["counts"]}
        h.count, h.total, h.min, h.max = data["count"], data["total"], data["min"], data["max"]
        return h


# --- worker process ---------------------------------------------------------------------


def _worker(index: int, opts: dict[str, Any], start_at: Any, go: Any, results: Any) -> None:
    """One load process: connect, report ready, wait for the common start, run, report."""
    try:
        from shardd import Client

        client = Client(opts["endpoint"], timeout=opts["timeout"], direct=opts["direct"])
        client.ping()
    except Exception as exc:  # reported to the parent, which exits non-zero
        results.put(("error", index, f"{type(exc).__name__}: {exc}"))
        return
    results.put(("ready", index, None))
    if not go.wait(60):
        return
    try:
        report = _load(client, index, opts, start_at.value)
    except Exception as exc:  # a bug or a broken client: tell the parent instead of vanishing
        results.put(("error", index, f"{type(exc).__name__}: {exc}"))
    else:
        results.put(("done", index, report))
    finally:
        client.close()


def _load(client: Any, index: int, opts: dict[str, Any], start_at: float) -> dict[str, Any]:
    """The closed loop of one process; returns its counts and histogram."""
    from shardd import SharddError

    rng = random.Random(opts["seed"] * 1_000_003 + index)
    keys, get_ratio, depth = opts["keys"], opts["get_ratio"], opts["pipeline"]
    value = b"x" * opts["value_size"]
    hist = Histogram()
    errors: Counter[str] = Counter()
    ops = 0
    clock = time.perf_counter_ns
    # perf_counter is CLOCK_MONOTONIC on Linux: one clock for every process, so the parent's
    # start time is meaningful here.
    measure_from = int((start_at + opts["warmup"]) * 1e9)
    stop_at = measure_from + int(opts["duration"] * 1e9)
    randrange, rand = rng.randrange, rng.random
    if depth <= 1:
        get, put = client.get, client.set
        while True:
            t0 = clock()
            if t0 >= stop_at:
                break
            key = b"key:%d" % randrange(keys)
            try:
                if rand() < get_ratio:
                    get(key)
                else:
                    put(key, value)
            except SharddError as exc:
                if t0 >= measure_from:
                    errors[type(exc).__name__] += 1
                continue
            t1 = clock()
            if t0 >= measure_from:
                hist.record(t1 - t0)
                ops += 1
    else:
        pipe = client.pipeline()
        while True:
            t0 = clock()
            if t0 >= stop_at:
                break
            for _ in range(depth):
                key = b"key:%d" % randrange(keys)
                if rand() < get_ratio:
                    pipe.get(key)
                else:
                    pipe.set(key, value)
            try:
                replies = pipe.execute(raise_on_error=False)
            except SharddError as exc:  # the whole pipeline failed
                if t0 >= measure_from:
                    errors[type(exc).__name__] += depth
                continue
            t1 = clock()
            if t0 >= measure_from:
                failed = [r for r in replies if isinstance(r, SharddError)]
                for r in failed:
                    errors[type(r).__name__] += 1
                ops += depth - len(failed)
                if len(failed) < depth:  # the round trip served something: it counts
                    hist.record(t1 - t0)
    # The window ends when the last request started in it has finished (or failed).
    elapsed = max(clock() - measure_from, 1) / 1e9
    return {"ops": ops, "elapsed_s": elapsed, "errors": dict(errors), "histogram": hist.to_dict()}


# --- parent -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Closed-loop load generator for a running shardd daemon (see bench/README.md).")
    ap.add_argument("--endpoint", default=os.environ.get("SHARDD_ENDPOINT", "tcp://127.0.0.1:7400"),
                    help="daemon endpoint (default: $SHARDD_ENDPOINT or tcp://127.0.0.1:7400)")
    ap.add_argument("--procs", type=int, default=os.cpu_count() or 1,
                    help="client processes, each with its own connection (default: CPU count)")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (default 2)")
    ap.add_argument("--keys", type=int, default=10_000, help="key space: key:0 .. key:K-1 (default 10000)")
    ap.add_argument("--value-size", type=int, default=100, help="bytes per SET value (default 100)")
    ap.add_argument("--get-ratio", type=float, default=0.9, help="fraction of ops that are GET (default 0.9)")
    ap.add_argument("--pipeline", type=int, default=1, metavar="D",
                    help="ops per round trip; latency is then per pipeline (default 1)")
    ap.add_argument("--preload", action="store_true", help="SET every key once before the run")
    ap.add_argument("--direct", action="store_true",
                    help="direct mode: single-key ops go straight to the owning worker, not the router")
    ap.add_argument("--timeout", type=float, default=2.0, help="client timeout in seconds (default 2)")
    ap.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args(argv)
    problems = [
        (args.procs >= 1, "--procs must be at least 1"),
        (args.duration > 0, "--duration must be > 0"),
        (args.warmup >= 0, "--warmup must be >= 0"),
        (args.keys >= 1, "--keys must be at least 1"),
        (args.value_size >= 0, "--value-size must be >= 0"),
        (0 <= args.get_ratio <= 1, "--get-ratio must be in [0, 1]"),
        (args.pipeline >= 1, "--pipeline must be at least 1"),
        (args.timeout > 0, "--timeout must be > 0"),
    ]
    for ok, message in problems:
        if not ok:
            ap.error(message)
    return args


def check_daemon(endpoint: str, timeout: float) -> int:
    """The daemon's shard count; exits EXIT_UNREACHABLE with a clear message if it does not answer."""
    from shardd import Client

    try:
        with Client(endpoint, timeout=timeout) as client:
            return client.ping()
    except Exception as exc:  # Timeout, Unavailable, or zmq.ZMQError for a malformed endpoint
        fail(f"cannot reach shardd at {endpoint}: {exc} (is `shardd serve` running there?)")
    raise AssertionError("unreachable")


def preload(endpoint: str, timeout: float, keys: int, value_size: int) -> None:
    from shardd import Client

    value = b"x" * value_size
    chunk = 1000
    with Client(endpoint, timeout=max(timeout, 10.0)) as client:
        for start in range(0, keys, chunk):
            client.set_many([(b"key:%d" % i, value) for i in range(start, min(start + chunk, keys))])


def fail(message: str, code: int = EXIT_UNREACHABLE) -> None:
    print(f"loadgen: {message}", file=sys.stderr)
    raise SystemExit(code)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark and return the report (see the README for its fields)."""
    shards = check_daemon(args.endpoint, args.timeout)
    if args.preload:
        preload(args.endpoint, args.timeout, args.keys, args.value_size)
    ctx = mp.get_context("spawn")
    start_at = ctx.Value("d", 0.0)
    go = ctx.Event()
    results = ctx.Queue()
    opts = {k: getattr(args, k) for k in ("endpoint", "timeout", "keys", "value_size", "get_ratio",
                                          "pipeline", "warmup", "duration", "seed", "direct")}
    procs = [ctx.Process(target=_worker, args=(i, opts, start_at, go, results), daemon=True)
             for i in range(args.procs)]
    for proc in procs:
        proc.start()
    try:
        ready = 0
        while ready < len(procs):
            kind, index, detail = _next(results, 60.0, procs)
            if kind == "error":
                fail(f"process {index} could not start: {detail}")
            ready += kind == "ready"
        start_at.value = time.perf_counter() + 0.05
        go.set()
        reports: list[dict[str, Any]] = []
        deadline = args.warmup + args.duration + args.timeout * max(args.pipeline, 1) + 60
        while len(reports) < len(procs):
            kind, index, detail = _next(results, deadline, procs)
            if kind == "error":
                fail(f"load process {index} failed: {detail}", EXIT_FAILED)
            reports.append(detail)
    finally:
        go.set()
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
    return summarize(args, shards, reports)


def _next(results: Any, timeout: float, procs: list[Any]) -> tuple[str, int, Any]:
    """The next message from a load process; fails if none comes, or every process died."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return results.get(timeout=0.5)
        except queue.Empty:
            if time.monotonic() > deadline:
                fail("load processes stopped answering", EXIT_FAILED)
            crashed = [i for i, proc in enumerate(procs) if proc.exitcode not in (None, 0)]
            if crashed:
                fail(f"load process {crashed[0]} died (exit code {procs[crashed[0]].exitcode})", EXIT_FAILED)


def summarize(args: argparse.Namespace, shards: int, reports: list[dict[str, Any]]) -> dict[str, Any]:
    hist = Histogram()
    errors: Counter[str] = Counter()
    ops = 0
    ops_per_s = 0.0
    for r in reports:
        hist.merge(Histogram.from_dict(r["histogram"]))
        errors.update(r["errors"])
        ops += r["ops"]
        ops_per_s += r["ops"] / r["elapsed_s"]

    def us(ns: float) -> float:
        return round(ns / 1000, 1)

    return {
        "endpoint": args.endpoint,
        "shards": shards,
        "procs": args.procs,
        "pipeline": args.pipeline,
        "direct": args.direct,
        "keys": args.keys,
        "value_size": args.value_size,
        "get_ratio": args.get_ratio,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "ops": ops,
        "ops_per_s": round(ops_per_s, 1),
        "latency_per": "request" if args.pipeline == 1 else f"pipeline of {args.pipeline}",
        "latency_us": {
            "p50": us(hist.percentile(50)),
            "p95": us(hist.percentile(95)),
            "p99": us(hist.percentile(99)),
            "max": us(hist.max),
            "mean": us(hist.mean),
            "samples": hist.count,
        },
        "errors": dict(sorted(errors.items())),
    }


def format_report(report: dict[str, Any]) -> str:
    lat = report["latency_us"]
    errors = ", ".join(f"{name} {n}" for name, n in report["errors"].items()) or "none"
    latency = (
        f"p50 {lat['p50']}  p95 {lat['p95']}  p99 {lat['p99']}  max {lat['max']}  "
        f"(per {report['latency_per']}, mean {lat['mean']}, {lat['samples']} samples)"
        if lat["samples"] else "n/a (nothing succeeded)"
    )
    return "\n".join([
        f"endpoint     {report['endpoint']} ({report['shards']} shards)",
        f"load         {report['procs']} procs, {'direct' if report['direct'] else 'router'} mode, "
        f"pipeline {report['pipeline']}, "
        f"get ratio {report['get_ratio']}, {report['keys']} keys, {report['value_size']} B values",
        f"time         {report['warmup_s']:g} s warm-up, {report['duration_s']:g} s measured",
        f"ops          {report['ops']}",
        f"ops/s        {report['ops_per_s']:.0f}",
        f"latency µs   {latency}",
        f"errors       {errors}",
    ])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except KeyboardInterrupt:
        print("loadgen: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(report) if args.json else format_report(report))
    return EXIT_OK if report["ops"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
