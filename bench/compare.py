"""shardd side by side with Redis and memcached: same data, same workloads, same client processes.

    python bench/compare.py            # full run: 2 s warm-up + 10 s measured per workload and system
    python bench/compare.py --quick    # smoke run, about a minute and a half
    python bench/compare.py --help     # every option

Theory of operation
-------------------
The parent starts the servers on free loopback ports, each in its own session, logging
into a private temporary directory: ``redis-server`` without persistence (``--save ""
--appendonly no``), ``memcached``, a shardd daemon (``python -m shardd serve``, one
worker per CPU by default), and the two raw ZeroMQ floors of ``bench/zmq_echo.py``: "echo"
(a Python ROUTER that sends every message back) and "echo-2hop" (a Python ROUTER→DEALER
forwarder in front of its own echo). It waits until each answers (PING / version / a shardd
ping answered by every shard / an echoed frame), never on a bare sleep.

Then:

1. **memory**, for every data server (on the fresh server): RSS and PSS of the whole server
   (for shardd: supervisor + router + every worker, summed with psutil) before and after
   loading ``--memory-keys`` keys of ``--value-size`` bytes, plus the server's own figure
   (Redis ``used_memory``, memcached ``bytes``, the sum of shardd's per-shard ``used_bytes``)
   and a check that every key is there. Then every key is removed again.
2. the ``--keys`` key space (``key:0`` … ``key:K-1``, ``--value-size`` bytes each) is loaded,
   so every GET hits.
3. the throughput workloads, each from freshly spawned client processes: sync GET (1 process;
   the echo floors too, a GET-sized frame per round trip), sync SET (1 process), batched GET of
   ``--batch`` keys (1 process: shardd ``get_many``, a redis-py pipeline of GETs, pymemcache
   ``get_many``), and mixed (``--procs`` processes, ``--get-ratio`` GETs, the rest SETs, keys
   drawn from a Zipf distribution).
4. **cpu**: ``--cpu-rate`` GET/s offered by ``--cpu-procs`` processes, each sending on a fixed
   schedule (``paced_loop``), to every system including the echo floors; the parent reads the
   user + system CPU times of every process of the server (``CpuProbe``) at the start and the
   end of the ``--cpu-duration`` window, and reports server CPU seconds per 1M GETs and the
   rate achieved.
5. **json**: fresh servers of its own (a Redis, a shardd with ``compression = "zstd"`` and one
   with ``compression = "off"``, written to a config file), ``--json-keys`` keys of
   ``--json-value-size`` byte JSON documents (``bench/json_values.py``; their zstd level 1
   ratio is printed): memory per key in each, then sync GET of those values from both shardd
   daemons in both client modes. A daemon that refuses the key gives "n/a" rows with its message.

6. **resp** (``--resp``, or ``resp`` in ``--workloads``): fresh servers of its own, a Redis and a
   shardd daemon with ``resp_bind`` on a free port (plus, with ``shardd-resp-gw`` in
   ``--resp-systems``, the measuring prototype ``bench/resp_gateway_proto.py`` in front of it);
   ``redis-benchmark -t TEST -n 200000 -c 50 -P 1|16 --csv`` per test (SET, GET), depth and
   system, systems interleaved, 3 rounds unless ``--rounds``; server CPU (every process of the
   server side) and redis-benchmark's own CPU per 1M requests; each figure's median with its
   range; issue 14's targets as PASS/FAIL lines (``run_resp``, ``parse_benchmark_csv``).

Steps 3 to 5 repeat ``--rounds`` times, systems interleaved within each round; each row shows
the median round (by ops/s, or by CPU per op for step 4). Last come two targets tables:
docs/design.md's, and the efficiency targets (``evaluate_efficiency_targets``: memory,
compression, get_many, server CPU per op, the raw ZeroMQ floors), each against the peer
or floor measured in the same run.

shardd is measured twice: "shardd" is ``shardd.Client`` through the router, "shardd-direct" is
``shardd.Client(direct=True)`` against the same daemon (single-key ops go to the owning worker's
own endpoint; ``get_many`` is split per shard by the client). "shardd-direct" starts no server
of its own and has no memory row: it is the same daemon, already loaded.

Each client process builds its plan first (which keys, which ops: pre-drawn, so drawing costs
nothing in the timed loop and every system gets the same sequence for the same seed), connects,
reports ready, and starts with the others at a common instant on ``time.perf_counter_ns``
(CLOCK_MONOTONIC: one clock for every process). Requests that start during ``--warmup`` are not
measured. Each measured request's latency (just before the client call to its return) goes
into the log-bucketed ``Histogram`` of ``bench/loadgen.py``; the histograms of all processes
are merged, and ops/s is the sum over processes of ops / measured time. For the batched
workload an op is one key (``--batch`` per round trip) and latency is per round trip.

Every server this script started is stopped when it ends, whichever way it ends: a
``try/finally`` around the run, an ``atexit`` hook, SIGTERM/SIGHUP turned into SystemExit,
and each server is asked by the kernel to get SIGTERM if this process dies (PR_SET_PDEATHSIG).

The pure parts (``ZipfSampler``, the plan builders, the timed and paced loops, the CPU
arithmetic, ``ratio``, the targets and the table formatters) import nothing beyond the standard
library, ``loadgen.Histogram`` and ``json_values``: the unit tests load this file without any
server or client library. The module is long because it is one script a user runs end to end;
its sections (pure parts, servers, adapters, client processes, the run) are what to read.
"""

from __future__ import annotations

import argparse
import atexit
import bisect
import contextlib
import ctypes
import importlib.util
import itertools
import json
import multiprocessing as mp
import os
import platform
import queue
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _load_helper(name: str, filename: str) -> Any:
    """Another bench/ file as a module (bench/ is not a package); loadgen.py's Histogram is the one we use."""
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, HERE / filename)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


Histogram = _load_helper("shardd_bench_loadgen", "loadgen.py").Histogram
json_values = _load_helper("shardd_bench_json_values", "json_values.py")

SYSTEMS = ("shardd", "shardd-direct", "redis", "memcached")  # the data systems (bench/profile_get.py's choices)
FLOORS = ("echo", "echo-2hop")  # the raw ZeroMQ floors (bench/zmq_echo.py)
ALL_SYSTEMS = SYSTEMS + FLOORS
WORKLOADS = ("memory", "get", "set", "batch", "mixed", "cpu", "json", "resp")
CLIENTS = {"shardd": "shardd.Client, router", "shardd-direct": "shardd.Client, direct",
           "redis": "redis-py", "memcached": "pymemcache",
           "echo": "pyzmq DEALER → ROUTER echo, 1 hop",
           "echo-2hop": "pyzmq DEALER → Python ROUTER/DEALER forwarder → echo, 2 hops"}
# A system measured with another system's server: the same running daemon, another client mode.
SERVER_OF = {"shardd-direct": "shardd"}
# The raw ZeroMQ floors hold no data: they answer GET-shaped round trips only.
ECHO_SYSTEMS = frozenset(FLOORS)
ECHO_WORKLOADS = frozenset({"get", "cpu"})
JSON_DOCUMENTS = 256  # distinct JSON values, cycled over the keys (each is compressed on its own)
MiB = 2**20
X = "\N{MULTIPLICATION SIGN}"  # ratios print as "0.38" + X
PLAN_SIZE = 1 << 16  # pre-drawn ops per process, cycled (a power of two: index with a mask)
BATCH_PLANS = 256  # pre-drawn batches per process, cycled

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_SETUP = 2  # a server or client library is missing, or a server did not start


# --- pure parts: key distributions and plans ----------------------------------------------


class ZipfSampler:
    """Ranks ``0 .. n-1`` with P(rank k) proportional to 1 / (k+1)**s (YCSB's default s is 0.99).

    Inverse-CDF sampling: one uniform draw and a binary search over the cumulative weights, so
    a draw is exact for any ``s >= 0`` (``s = 0`` is uniform) and costs O(log n). Building it is
    O(n) floats (100k keys: ~10 ms, ~1 MB).
    """

    __slots__ = ("_cum", "_random", "n", "s", "total")

    def __init__(self, n: int, s: float = 0.99, rng: random.Random | None = None) -> None:
        if n < 1:
            raise ValueError(f"a Zipf distribution needs at least one rank, got n={n}")
        if s < 0:
            raise ValueError(f"the Zipf exponent must be >= 0, got s={s}")
        self.n = n
        self.s = s
        self._cum = list(itertools.accumulate((k + 1) ** -s for k in range(n)))
        self.total = self._cum[-1]
        self._random = (rng or random.Random()).random

    def probability(self, rank: int) -> float:
        """The exact probability of ``rank``."""
        return (rank + 1) ** -self.s / self.total

    def sample(self) -> int:
        # random() < 1, so the target is < total == _cum[-1] and the index is at most n-1.
        return bisect.bisect_right(self._cum, self._random() * self.total)


LOAD_MESSAGE_BYTES = 128 * 1024  # values per loading message: ~this many bytes, at most 1000 keys


def value_pool(values: Sequence[bytes] | bytes) -> Sequence[bytes]:
    """The values to cycle over the keys: one bytes value is a pool of one."""
    return [values] if isinstance(values, bytes | bytearray) else values


def load_chunk(values: Sequence[bytes]) -> int:
    """Keys per loading message: 1000 small values, fewer large ones (4 KiB: 32), so a load's
    transient buffers stay small next to the data whose memory is being measured."""
    return max(1, min(1000, LOAD_MESSAGE_BYTES // max(1, max(len(v) for v in values))))


def key_name(index: int) -> bytes:
    return b"key:%d" % index


def process_rng(seed: int, index: int) -> random.Random:
    """Each client process's own stream: the same for every system, different across processes."""
    return random.Random(seed * 1_000_003 + index)


def uniform_keys(rng: random.Random, keys: int, size: int = PLAN_SIZE) -> list[bytes]:
    return [key_name(rng.randrange(keys)) for _ in range(size)]


def zipf_keys(rng: random.Random, keys: int, s: float, size: int = PLAN_SIZE) -> list[bytes]:
    sampler = ZipfSampler(keys, s, rng)
    return [key_name(sampler.sample()) for _ in range(size)]


def op_mix(rng: random.Random, get_ratio: float, size: int = PLAN_SIZE) -> list[bool]:
    """True for a GET, False for a SET."""
    return [rng.random() < get_ratio for _ in range(size)]


def key_batches(rng: random.Random, keys: int, batch: int, count: int = BATCH_PLANS) -> list[list[bytes]]:
    """``count`` batches of ``batch`` distinct keys each (distinct: a get_many returns each key once)."""
    batch = min(batch, keys)
    return [[key_name(i) for i in rng.sample(range(keys), batch)] for _ in range(count)]


def server_of(system: str) -> str:
    """The server a system's clients talk to ("shardd-direct" uses shardd's daemon)."""
    return SERVER_OF.get(system, system)


def servers_for(systems: Sequence[str]) -> list[str]:
    """The servers to start for ``systems``, each once, in order of first use."""
    return list(dict.fromkeys(server_of(s) for s in systems))


def applies(system: str, workload: str) -> bool:
    """Whether ``system`` runs ``workload`` (the echo floors have no data, so no SET or batch)."""
    return system not in ECHO_SYSTEMS or workload in ECHO_WORKLOADS


# --- pure parts: results and tables -----------------------------------------------------------


@dataclass
class Row:
    """One line of the throughput table; None means "not measured" (printed as a dash)."""

    kind: str  # one of WORKLOADS: what the targets look up
    workload: str  # the title printed
    system: str
    client: str
    procs: int
    ops_per_s: float | None = None
    p50_us: float | None = None
    p95_us: float | None = None
    p99_us: float | None = None
    note: str = ""
    misses: int = 0
    errors: dict[str, int] = field(default_factory=dict)


@dataclass
class MemoryRow:
    system: str
    keys_loaded: int
    rss_empty: int  # bytes
    rss_loaded: int
    self_reported: int | None  # the server's own figure for the data, bytes
    self_reported_name: str
    load_s: float
    note: str = ""
    pss_empty: int | None = None  # bytes, summed over the server's processes; None: not readable
    pss_loaded: int | None = None

    def per_key(self) -> float | None:
        """RSS growth per stored key, bytes: what the data costs, without the empty server."""
        return (self.rss_loaded - self.rss_empty) / self.keys_loaded if self.keys_loaded else None


@dataclass
class CpuRow:
    """One system at a fixed offered GET rate: the CPU its server's processes used in the window."""

    system: str
    client: str
    procs: int
    offered: float  # GET/s asked for, all client processes together
    achieved: float | None  # GET/s sent in the measured window
    ops: int  # GETs sent in the measured window
    cpu_s: float | None  # server CPU seconds (user + system, every server process) in the window
    cpu_per_m: float | None  # cpu_s per 1,000,000 ops
    server_procs: int
    p50_us: float | None = None  # from when each GET was due, so falling behind shows
    p99_us: float | None = None
    note: str = ""
    errors: dict[str, int] = field(default_factory=dict)


def cpu_seconds(processes: Iterable[Any]) -> dict[int, float]:
    """pid -> user + system CPU seconds so far, for each process still there (psutil.Process-like)."""
    out = {}
    for p in processes:
        try:
            t = p.cpu_times()
        except Exception:  # psutil.NoSuchProcess / AccessDenied: it went away, or is not ours to read
            continue
        out[p.pid] = t.user + t.system
    return out


def cpu_used(before: Mapping[int, float], after: Mapping[int, float]) -> float:
    """CPU seconds used between two ``cpu_seconds`` snapshots, summed over processes.

    A process only in ``after`` started in between: all its time counts. One only in ``before``
    ended in between: its last stretch is unknown and left out (a server's processes do not
    come and go while it serves, so this is for completeness).
    """
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def per_million(cpu_s: float | None, ops: int) -> float | None:
    """CPU seconds per 1,000,000 ops."""
    if cpu_s is None or ops <= 0:
        return None
    return cpu_s / ops * 1e6


def ratio(value: float | None, base: float | None) -> float | None:
    """value / base, or None when either is missing or base is not positive."""
    if value is None or base is None or base <= 0:
        return None
    return value / base


def fmt_num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}{X}"


def fmt_mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:,.1f}"


WORKLOAD_TITLES = {
    "get": "sync GET",
    "set": "sync SET",
    "batch": "batched GET",
    "mixed": "mixed GET/SET",
}


def workload_title(workload: str, batch: int = 100, get_ratio: float = 0.9) -> str:
    if workload == "batch":
        return f"batched GET {X}{batch}"
    if workload == "mixed":
        return f"{get_ratio:.0%} GET / {1 - get_ratio:.0%} SET, Zipf"
    return WORKLOAD_TITLES.get(workload, workload)


def format_table(rows: Sequence[Row]) -> str:
    """The throughput table in Markdown; ratios are to the Redis row of the same workload."""
    header = ("| workload | system (client) | procs | ops/s | p50 µs | p95 µs | p99 µs "
              f"| ops/s {X} Redis | p99 {X} Redis | notes |")
    lines = [header, "|" + "---|" * 10]
    redis = {r.kind: r for r in rows if r.system == "redis"}
    for r in rows:
        base = redis.get(r.kind)
        if r.ops_per_s is None and r.note:
            ops = r.note
            note = ""
        else:
            ops = fmt_num(r.ops_per_s, 0)
            note = r.note
        extra = []
        if r.misses:
            extra.append(f"{r.misses} misses")
        if r.errors:
            extra.append("errors: " + ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())))
        note = "; ".join(x for x in (note, *extra) if x)
        lines.append(
            f"| {r.workload} | {r.system} ({r.client}) | {r.procs} | {ops} | {fmt_num(r.p50_us)} "
            f"| {fmt_num(r.p95_us)} | {fmt_num(r.p99_us)} "
            f"| {fmt_ratio(ratio(r.ops_per_s, base.ops_per_s if base else None))} "
            f"| {fmt_ratio(ratio(r.p99_us, base.p99_us if base else None))} | {note} |"
        )
    return "\n".join(lines)


def median_run(runs: Sequence[dict[str, Any]], key: str = "ops_per_s") -> dict[str, Any]:
    """The run with the median ``key`` (the lower middle one for an even count), whole: its latencies too.

    Runs without a figure for ``key`` (None) sort first, so they are the median only when most are.
    """
    if not runs:
        raise ValueError("no runs")
    return sorted(runs, key=lambda r: (r.get(key) is not None, r.get(key) or 0.0))[(len(runs) - 1) // 2]


def spread_note(runs: Sequence[dict[str, Any]], key: str = "ops_per_s", unit: str = "ops/s", digits: int = 0) -> str:
    """"median of N rounds, <unit> lo to hi" for more than one round, else ""."""
    values = [r[key] for r in runs if r.get(key) is not None]
    if len(runs) < 2 or not values:
        return ""
    return f"median of {len(runs)} rounds, {unit} {min(values):,.{digits}f} to {max(values):,.{digits}f}"


def format_memory_table(rows: Sequence[MemoryRow]) -> str:
    """RSS and PSS (summed over the server's processes), empty and loaded; ratios to the Redis row's RSS."""
    lines = [
        "| system | keys stored | RSS empty MiB | RSS loaded MiB | PSS empty MiB | PSS loaded MiB | Δ RSS B/key "
        f"| server's own figure MiB | RSS {X} Redis | PSS {X} Redis RSS | load s | notes |",
        "|" + "---|" * 12,
    ]
    redis = next((m for m in rows if m.system == "redis"), None)
    base = redis.rss_loaded if redis else None
    for m in rows:
        own = f"{fmt_mib(m.self_reported)} ({m.self_reported_name})" if m.self_reported is not None else "—"
        lines.append(
            f"| {m.system} | {m.keys_loaded:,} | {fmt_mib(m.rss_empty)} | {fmt_mib(m.rss_loaded)} "
            f"| {fmt_mib(m.pss_empty)} | {fmt_mib(m.pss_loaded)} | {fmt_num(m.per_key(), 0)} | {own} "
            f"| {fmt_ratio(ratio(m.rss_loaded, base))} | {fmt_ratio(ratio(m.pss_loaded, base))} "
            f"| {m.load_s:.1f} | {m.note} |"
        )
    return "\n".join(lines)


def format_cpu_table(rows: Sequence[CpuRow]) -> str:
    """Server CPU per 1M GETs at a fixed offered rate; ratios to the Redis row."""
    lines = [
        "| system (client) | procs | offered GET/s | achieved GET/s | server CPU s | server CPU s per 1M GETs "
        f"| {X} Redis | p50 µs | p99 µs | server processes | notes |",
        "|" + "---|" * 11,
    ]
    redis = next((r for r in rows if r.system == "redis"), None)
    for r in rows:
        note = "; ".join(x for x in (r.note, ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items()))) if x)
        lines.append(
            f"| {r.system} ({r.client}) | {r.procs} | {r.offered:,.0f} | {fmt_num(r.achieved, 0)} "
            f"| {fmt_num(r.cpu_s, 3)} | {fmt_num(r.cpu_per_m, 1)} "
            f"| {fmt_ratio(ratio(r.cpu_per_m, redis.cpu_per_m if redis else None))} "
            f"| {fmt_num(r.p50_us)} | {fmt_num(r.p99_us)} | {r.server_procs} | {note} |"
        )
    return "\n".join(lines)


def format_json_table(rows: Sequence[Row]) -> str:
    """Sync GET of the JSON values per client mode, compressed and not; ratio to the uncompressed row."""
    lines = [f"| system (client) | values stored | ops/s | p50 µs | p95 µs | p99 µs | ops/s {X} uncompressed | notes |",
             "|" + "---|" * 8]
    off = {r.system: r for r in rows if r.kind == "json-off"}
    for r in rows:
        base = off.get(r.system)
        stored = "zstd-compressed" if r.kind == "json-zstd" else "uncompressed"
        if r.ops_per_s is None and r.note:
            ops, note = "n/a", r.note
        else:
            ops, note = fmt_num(r.ops_per_s, 0), r.note
        if r.errors:
            note = "; ".join(x for x in (note, "errors: " + ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())))
                             if x)
        lines.append(
            f"| {r.system} ({r.client}) | {stored} | {ops} | {fmt_num(r.p50_us)} | {fmt_num(r.p95_us)} "
            f"| {fmt_num(r.p99_us)} | {fmt_ratio(ratio(r.ops_per_s, base.ops_per_s if base else None))} | {note} |"
        )
    return "\n".join(lines)


@dataclass
class Target:
    name: str
    measured: float | None  # a ratio, or a quantity in ``unit``
    goal: str  # e.g. ">= 0.60"
    met: bool | None  # None: not measured
    detail: str = ""
    unit: str = X  # X: a ratio; otherwise the unit of an absolute figure ("MiB")


def _check(name: str, value: float | None, goal: float, at_least: bool, detail: str = "", unit: str = X) -> Target:
    met = None if value is None else (value >= goal if at_least else value <= goal)
    shown = f"{goal:.2f}{X}" if unit == X else f"{goal:g} {unit}"
    return Target(name, value, f"{'≥' if at_least else '≤'} {shown}", met, detail, unit)


def evaluate_targets(rows: Sequence[Row], memory: Sequence[MemoryRow]) -> list[Target]:
    """The performance targets (docs/design.md), as ratios to the peer measured in the same run.

    The sync GET target is split by client mode (direct: at least 1.0 times Redis, router: at
    least 0.6 times); the batched and mixed targets name no mode, so each is evaluated for both
    shardd rows.
    """

    def find(workload: str, system: str) -> Row | None:
        return next((r for r in rows if r.kind == workload and r.system == system
                     and r.ops_per_s is not None), None)

    check = _check
    modes = (("shardd-direct", "direct mode"), ("shardd", "router"))
    out = []
    r = find("get", "redis")
    for system, mode in modes:
        s = find("get", system)
        out.append(check(f"sync GET, {mode}: ops/s vs redis-py→Redis",
                         ratio(s.ops_per_s if s else None, r.ops_per_s if r else None),
                         1.0 if system == "shardd-direct" else 0.6, True))
    peers = [p for p in (find("batch", "redis"), find("batch", "memcached")) if p is not None]
    best = max(peers, key=lambda p: p.ops_per_s or 0.0) if peers else None
    detail = f"faster peer: {best.system}" if best else ""
    if len(peers) == 1:
        detail += "; the other peer was not measured"
    for system, mode in modes:
        s = find("batch", system)
        out.append(check(f"batched GET, {mode}: keys/s vs the faster of redis-py pipeline and pymemcache get_many",
                         ratio(s.ops_per_s if s else None, best.ops_per_s if best else None), 1.0, True, detail))
    r = find("mixed", "redis")
    for system, mode in modes:
        s = find("mixed", system)
        out.append(check(f"mixed, {mode}, all client processes: aggregate ops/s vs Redis",
                         ratio(s.ops_per_s if s else None, r.ops_per_s if r else None), 1.0, True))
        out.append(check(f"mixed, {mode}, all client processes: p99 vs Redis's p99",
                         ratio(s.p99_us if s else None, r.p99_us if r else None), 2.0, False))
    ms = next((m for m in memory if m.system == "shardd"), None)
    mr = next((m for m in memory if m.system == "redis"), None)
    out.append(check("memory: RSS vs Redis's RSS for the same data",
                     ratio(ms.rss_loaded if ms else None, mr.rss_loaded if mr else None), 1.5, False))
    return out


JSON_ZSTD = "shardd, compression = zstd"
JSON_OFF = "shardd, compression = off"


def _joined(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def evaluate_efficiency_targets(rows: Sequence[Row], memory: Sequence[MemoryRow], cpu: Sequence[CpuRow],
                             json_memory: Sequence[MemoryRow], json_rows: Sequence[Row], shards: int,
                             batch: int = 100, json_value_size: int = 4096) -> list[Target]:
    """The efficiency targets (memory, compression, get_many, CPU per op, the raw ZeroMQ floors),
    each against the floor or peer measured in the same run.

    Memory "per key" is RSS growth per stored key (the data's cost, without the empty server);
    "total" is the loaded server. Where the run measured something other than what a target names
    (fewer keys, another shard count or batch size), the target is still evaluated and the detail
    says so.
    """

    def find(kind: str, system: str, source: Sequence[Row] = rows) -> Row | None:
        return next((r for r in source if r.kind == kind and r.system == system and r.ops_per_s is not None), None)

    def mem(source: Sequence[MemoryRow], system: str) -> MemoryRow | None:
        return next((m for m in source if m.system == system), None)

    def ops(r: Row | None) -> float | None:
        return r.ops_per_s if r else None

    def figures(a: float | None, b: float | None, unit: str, names: tuple[str, str] = ("shardd", "Redis"),
                digits: int = 0) -> str:
        if a is None or b is None:
            return ""
        return f"{names[0]} {a:,.{digits}f} {unit}, {names[1]} {b:,.{digits}f} {unit}"

    modes = (("shardd-direct", "direct"), ("shardd", "router"))
    out: list[Target] = []
    ms, mr = mem(memory, "shardd"), mem(memory, "redis")
    keys_note = "" if ms is None or ms.keys_loaded >= 1_000_000 else f"{ms.keys_loaded:,} keys, not 1M"
    pk_s, pk_r = (ms.per_key() if ms else None), (mr.per_key() if mr else None)
    out.append(_check(f"1M {X} 100 B: shardd memory per key vs Redis's (Δ RSS / key)", ratio(pk_s, pk_r), 0.9, False,
                      _joined(figures(pk_s, pk_r, "B/key"), keys_note)))
    pss = ms.pss_loaded / MiB if ms and ms.pss_loaded is not None else None
    rss = mr.rss_loaded / MiB if mr else None
    out.append(_check(f"1M {X} 100 B: shardd total memory (PSS of every process, loaded) vs Redis's RSS",
                      ratio(pss, rss), 1.2, False, _joined(figures(pss, rss, "MiB", digits=1), keys_note)))
    empty = ms.pss_empty / MiB if ms and ms.pss_empty is not None else None
    out.append(_check("empty 2-shard daemon: PSS of every process", empty, 60, False,
                      "" if ms is None or shards == 2 else f"measured with {shards} shards", unit="MiB"))
    jz, jr = mem(json_memory, JSON_ZSTD), mem(json_memory, "redis")
    pk_z, pk_jr = (jz.per_key() if jz else None), (jr.per_key() if jr else None)
    size_note = "" if json_value_size == 4096 else f"{json_value_size} B values"
    out.append(_check("JSON 4 KiB values: shardd memory per key vs Redis's for the same data (Δ RSS / key)",
                      ratio(pk_z, pk_jr), 0.5, False, _joined(figures(pk_z, pk_jr, "B/key"), size_note)))
    for system, mode in modes:
        z, o = find("json-zstd", system, json_rows), find("json-off", system, json_rows)
        out.append(_check(f"JSON 4 KiB values, {mode}: sync GET ops/s, compressed vs stored uncompressed",
                          ratio(ops(z), ops(o)), 0.9, True,
                          _joined(figures(ops(z), ops(o), "ops/s", ("compressed", "uncompressed")), size_note)))
    mc = find("batch", "memcached")
    batch_note = "" if batch == 100 else f"get_many({batch})"
    for system, mode in modes:
        s = find("batch", system)
        out.append(_check(f"get_many(100), {mode}: keys/s vs pymemcache get_many", ratio(ops(s), ops(mc)),
                          1.5 if system == "shardd-direct" else 1.0, True,
                          _joined(figures(ops(s), ops(mc), "keys/s", ("shardd", "pymemcache")), batch_note)))
    cr = next((c for c in cpu if c.system == "redis"), None)
    for system, mode in modes:
        c = next((c for c in cpu if c.system == system), None)
        a, b = (c.cpu_per_m if c else None), (cr.cpu_per_m if cr else None)
        achieved = f"shardd achieved {c.achieved:,.0f} of {c.offered:,.0f} GET/s" if c and c.achieved else ""
        out.append(_check(f"server CPU per 1M GETs, {mode}: vs Redis's", ratio(a, b),
                          1.5 if system == "shardd-direct" else 2.5, False,
                          _joined(figures(a, b, "CPU s", digits=1), achieved)))
    for system, mode, floor, goal in (("shardd-direct", "direct", "echo", 0.95),
                                      ("shardd", "router", "echo-2hop", 0.9)):
        name = "one raw ZeroMQ hop (echo)" if floor == "echo" else "two raw ZeroMQ hops (forwarder + echo)"
        s, f = find("get", system), find("get", floor)
        out.append(_check(f"sync GET, {mode}: ops/s vs {name}", ratio(ops(s), ops(f)), goal, True,
                          figures(ops(s), ops(f), "ops/s", ("shardd", floor))))
    return out


def format_targets(targets: Sequence[Target]) -> str:
    lines = ["| target | goal | measured | met? |", "|---|---|---|---|"]
    for t in targets:
        met = "not measured" if t.met is None else ("yes" if t.met else "**no**")
        measured = fmt_ratio(t.measured) if t.unit == X or t.measured is None else f"{t.measured:,.1f} {t.unit}"
        if t.detail:
            measured = f"{measured} ({t.detail})"
        lines.append(f"| {t.name} | {t.goal} | {measured} | {met} |")
    return "\n".join(lines)


# --- pure parts: the RESP section (redis-benchmark against Redis and shardd's RESP endpoint) ----------

RESP_SYSTEMS = ("redis", "shardd-resp", "shardd-resp-router", "shardd-resp-gw")
RESP_SERVERS = {
    "redis": "redis-server",
    "shardd-resp": "shardd RESP endpoint, resp_front = workers (every worker serves connections)",
    "shardd-resp-router": "shardd RESP endpoint, resp_front = router (the default: the router's poll loop serves them)",
    "shardd-resp-gw": "bench/resp_gateway_proto.py: a gateway process per core (SO_REUSEPORT) → workers",
}
RESP_TESTS = ("set", "get")
RESP_TARGETS = {1: 0.5, 16: 0.25}  # pipeline -> least ops/s vs Redis (issue 14)
RESP_P99_GOAL = 3.0  # at most this times Redis's p99
# redis-benchmark --csv (7.0) columns after "test"; older versions print "rps" only.
BENCH_COLUMNS = ("rps", "avg_latency_ms", "min_latency_ms", "p50_latency_ms", "p95_latency_ms", "p99_latency_ms",
                 "max_latency_ms")


def parse_benchmark_csv(text: str) -> dict[str, dict[str, float | None]]:
    """redis-benchmark ``--csv`` output → {test: {column: value}} (test as printed: "SET", "GET", …).

    The header names the columns (7.0: ``"test","rps","avg_latency_ms",…,"max_latency_ms"``); a
    column it lacks is None. Lines before the header (warnings such as "WARNING: Could not fetch
    server CONFIG") and lines that are not rows are skipped.
    """
    import csv

    header: list[str] | None = None
    out: dict[str, dict[str, float | None]] = {}
    for fields in csv.reader(line for line in text.replace("\r", "\n").splitlines() if line.strip()):
        if not fields:
            continue
        if fields[0] == "test":
            header = fields
            continue
        if header is None or len(fields) != len(header):
            continue
        row: dict[str, float | None] = dict.fromkeys(BENCH_COLUMNS)
        try:
            for name, value in zip(header[1:], fields[1:], strict=True):
                row[name] = float(value)
        except ValueError:
            continue
        out[fields[0]] = row
    return out


def benchmark_argv(exe: str, port: int, test: str, requests: int, clients: int, pipeline: int,
                   keyspace: int = 0) -> list[str]:
    """One redis-benchmark run of one test (one run per test, so each has its own CPU reading)."""
    argv = [exe, "-h", "127.0.0.1", "-p", str(port), "-t", test, "-n", str(requests), "-c", str(clients),
            "-P", str(pipeline), "--csv"]
    if keyspace:
        argv += ["-r", str(keyspace)]
    return argv


@dataclass
class RespRun:
    """One redis-benchmark run: one test, one pipeline depth, one system."""

    system: str
    test: str  # "SET" or "GET"
    pipeline: int
    requests: int
    ops_per_s: float | None
    p50_ms: float | None
    p99_ms: float | None
    server_cpu_s: float | None  # user + system over every process of the server side, across the run
    bench_cpu_s: float | None  # redis-benchmark's own user + system
    server_procs: int = 0


@dataclass
class RespRow:
    """The median of a configuration's runs; each figure is its own median, with the range of the main ones."""

    test: str
    pipeline: int
    system: str
    runs: int
    ops_per_s: float | None
    ops_range: tuple[float, float] | None
    p50_ms: float | None
    p99_ms: float | None
    p99_range: tuple[float, float] | None
    server_cpu_per_m: float | None  # CPU seconds per 1M ops
    server_cpu_range: tuple[float, float] | None
    bench_cpu_per_m: float | None
    server_procs: int = 0


def _median(values: Sequence[float | None]) -> float | None:
    import statistics

    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _span(values: Sequence[float | None]) -> tuple[float, float] | None:
    present = [v for v in values if v is not None]
    return (min(present), max(present)) if present else None


def summarize_resp(runs: Sequence[RespRun]) -> list[RespRow]:
    """One row per (pipeline, test, system), in that order (systems as in RESP_SYSTEMS)."""
    groups: dict[tuple[int, str, str], list[RespRun]] = {}
    for r in runs:
        groups.setdefault((r.pipeline, r.test, r.system), []).append(r)

    def order(key: tuple[int, str, str]) -> tuple[int, int, int]:
        pipeline, test, system = key
        t = test.lower()
        return (pipeline, RESP_TESTS.index(t) if t in RESP_TESTS else len(RESP_TESTS),
                RESP_SYSTEMS.index(system) if system in RESP_SYSTEMS else len(RESP_SYSTEMS))

    rows = []
    for key in sorted(groups, key=order):
        g = groups[key]
        server = [per_million(r.server_cpu_s, r.requests) for r in g]
        bench = [per_million(r.bench_cpu_s, r.requests) for r in g]
        rows.append(RespRow(key[1], key[0], key[2], len(g), _median([r.ops_per_s for r in g]),
                            _span([r.ops_per_s for r in g]), _median([r.p50_ms for r in g]),
                            _median([r.p99_ms for r in g]), _span([r.p99_ms for r in g]), _median(server),
                            _span(server), _median(bench), max(r.server_procs for r in g)))
    return rows


def _with_range(value: float | None, span: tuple[float, float] | None, digits: int) -> str:
    if value is None:
        return "—"
    text = f"{value:,.{digits}f}"
    if span is not None and span[0] != span[1]:
        text += f" ({span[0]:,.{digits}f} to {span[1]:,.{digits}f})"
    return text


def format_resp_table(rows: Sequence[RespRow]) -> str:
    """redis-benchmark per test and pipeline depth; ratios to the Redis row of the same test and depth."""
    lines = [
        "| test | pipeline | system | ops/s (range) | p50 ms | p99 ms (range) | ops/s " + X + " Redis | p99 " + X
        + " Redis | server CPU s per 1M ops (range) | server CPU " + X + " Redis | redis-benchmark CPU s per 1M ops "
        "| server processes |",
        "|" + "---|" * 12,
    ]
    redis = {(r.test, r.pipeline): r for r in rows if r.system == "redis"}
    for r in rows:
        base = redis.get((r.test, r.pipeline))
        lines.append(
            f"| {r.test} | {r.pipeline} | {r.system} | {_with_range(r.ops_per_s, r.ops_range, 0)} "
            f"| {fmt_num(r.p50_ms, 3)} | {_with_range(r.p99_ms, r.p99_range, 3)} "
            f"| {fmt_ratio(ratio(r.ops_per_s, base.ops_per_s if base else None))} "
            f"| {fmt_ratio(ratio(r.p99_ms, base.p99_ms if base else None))} "
            f"| {_with_range(r.server_cpu_per_m, r.server_cpu_range, 1)} "
            f"| {fmt_ratio(ratio(r.server_cpu_per_m, base.server_cpu_per_m if base else None))} "
            f"| {fmt_num(r.bench_cpu_per_m, 1)} | {r.server_procs} |"
        )
    return "\n".join(lines)


def evaluate_resp_targets(rows: Sequence[RespRow]) -> list[Target]:
    """Issue 14's targets for every shardd system in ``rows``: ops/s at least 0.5 times Redis's at
    -P 1 and 0.25 times at -P 16, p99 at most 3 times Redis's; each per test (SET, GET) and depth."""
    redis = {(r.test, r.pipeline): r for r in rows if r.system == "redis"}
    out = []
    for r in rows:
        if r.system == "redis":
            continue
        base = redis.get((r.test, r.pipeline))
        where = f"{r.system}, {r.test} -P {r.pipeline}"
        goal = RESP_TARGETS.get(r.pipeline)
        if goal is not None:
            out.append(_check(f"{where}: ops/s vs Redis's", ratio(r.ops_per_s, base.ops_per_s if base else None),
                              goal, True, _joined(f"{fmt_num(r.ops_per_s, 0)} vs {fmt_num(base.ops_per_s, 0)} ops/s"
                                                  if base else "")))
        out.append(_check(f"{where}: p99 vs Redis's", ratio(r.p99_ms, base.p99_ms if base else None), RESP_P99_GOAL,
                          False, f"{fmt_num(r.p99_ms, 3)} vs {fmt_num(base.p99_ms, 3)} ms" if base else ""))
    return out


def format_resp_verdicts(targets: Sequence[Target]) -> str:
    """One line per target: "PASS"/"FAIL"/"n/a", the name, measured vs goal."""
    lines = []
    for t in targets:
        verdict = "n/a " if t.met is None else ("PASS" if t.met else "FAIL")
        lines.append(f"- {verdict} {t.name}: {fmt_ratio(t.measured)} (goal {t.goal})"
                     + (f"; {t.detail}" if t.detail else ""))
    return "\n".join(lines)


# --- servers ----------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
try:  # resolved before any fork: the child only calls it
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def _die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGTERM to the server if this script dies, even by SIGKILL."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SetupError(Exception):
    """A server or a client library is missing, or a server did not start."""


class Server:
    """One server process tree that this script started, and how to stop it."""

    def __init__(self, name: str, argv: list[str], log_path: Path, port: int,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self) -> None:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - held for the server's lifetime
        self.proc = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=REPO, env=self.env, start_new_session=True, preexec_fn=_die_with_parent,
        )
        _STARTED.append(self)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, probe: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                code = self.proc.returncode if self.proc else None
                raise SetupError(f"{self.name} exited with code {code} while starting:\n{self.log_tail()}")
            with contextlib.suppress(Exception):
                if probe():
                    return
            if time.monotonic() > deadline:
                raise SetupError(f"{self.name} did not answer within {timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def processes(self) -> list[Any]:
        """The server's process and all its descendants (psutil.Process objects)."""
        import psutil

        if not self.alive():
            return []
        assert self.proc is not None
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss(self) -> tuple[int, int | None, int]:
        """(summed RSS, summed PSS or None, process count) of the whole tree."""
        import psutil

        rss, pss, n = 0, 0, 0
        for p in self.processes():
            try:
                info = p.memory_full_info()
            except psutil.AccessDenied:
                info, pss = p.memory_info(), None
            except psutil.NoSuchProcess:
                continue
            rss += info.rss
            if pss is not None:
                pss += getattr(info, "pss", 0)
            n += 1
        return rss, pss, n

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, wait; then SIGKILL the session and every descendant. Idempotent."""
        proc = self.proc
        if proc is None:
            return
        try:
            import psutil
        except ImportError:  # pragma: no cover - psutil is a shardd dependency
            psutil = None
        kids = []
        if proc.poll() is None and psutil is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                kids = psutil.Process(proc.pid).children(recursive=True)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the server's pgid is its pid
        if psutil is not None:
            for k in kids:
                with contextlib.suppress(psutil.NoSuchProcess):
                    k.kill()
            psutil.wait_procs(kids, timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None
        self.proc = None


_STARTED: list[Server] = []


def stop_all() -> None:
    """Stop every server this process started (registered with atexit; safe to call twice)."""
    while _STARTED:
        server = _STARTED.pop()
        try:
            server.stop()
        except Exception as exc:  # keep stopping the others
            print(f"compare: could not stop {server.name}: {exc}", file=sys.stderr)


def start_redis(tmp: Path, name: str = "redis") -> Server:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SetupError("redis-server not found: apt-get update && apt-get install -y redis-server memcached")
    port = free_port()
    server = Server(name, [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                           "--daemonize", "no", "--dir", str(tmp), "--logfile", ""], tmp / f"{name}.log", port)
    server.start()
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
    server.wait_ready(lambda: bool(client.ping()))
    client.close()
    return server


def start_memcached(tmp: Path, memory_keys: int, value_size: int) -> Server:
    exe = shutil.which("memcached")
    if exe is None:
        raise SetupError("memcached not found: apt-get update && apt-get install -y redis-server memcached")
    port = free_port()
    # Enough memory that nothing is evicted: ~(value + key + 60 B item header) rounded up to a
    # slab class, with room to spare.
    mb = max(1024, (memory_keys * (value_size + 200)) // 2**20 * 2)
    argv = [exe, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", str(mb)]
    if os.geteuid() == 0:
        argv += ["-u", "root"]  # memcached refuses to run as root without naming the user
    server = Server("memcached", argv, tmp / "memcached.log", port)
    server.start()
    from pymemcache.client.base import Client as MemcacheClient

    client = MemcacheClient(("127.0.0.1", port), connect_timeout=1, timeout=1)
    server.wait_ready(lambda: bool(client.version()))
    client.close()
    return server


def toml_config(settings: Mapping[str, str | int | float | bool]) -> str:
    """A flat TOML document of ``settings`` (strings, numbers, booleans): a shardd config file."""
    lines = []
    for key, value in settings.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = json.dumps(value)  # a JSON string is a TOML basic string for these values
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def start_shardd(tmp: Path, shards: int, direct: bool = False, name: str = "shardd",
                 settings: Mapping[str, str | int | float | bool] | None = None) -> tuple[Server, int]:
    """A shardd daemon on a free port; returns it and its shard count.

    With ``direct``, ready also means every worker has published its own endpoint (direct mode).
    ``settings`` go into a config file (``--config``): keys the daemon does not know make it
    refuse to start, and the SetupError carries its message.
    """
    port = free_port()
    argv = [sys.executable, "-m", "shardd", "serve", "--bind", f"tcp://127.0.0.1:{port}",
            "--runtime-dir", str(tmp / f"{name}-run")]
    if shards:
        argv += ["--shards", str(shards)]
    if settings:
        path = tmp / f"{name}.toml"
        path.write_text(toml_config(settings))
        argv += ["--config", str(path)]
    # Built-in defaults (and ``settings``) only: no config file or state directory from the
    # environment (a state directory would make the daemon write a snapshot when stopped).
    env = {k: v for k, v in os.environ.items() if k not in ("SHARDD_CONFIG", "STATE_DIRECTORY", "SHARDD_ENDPOINT")}
    server = Server(name, argv, tmp / f"{name}.log", port, env)
    server.start()
    from shardd import Client

    expected = shards or len(os.sched_getaffinity(0))
    with Client(f"tcp://127.0.0.1:{port}", timeout=0.5) as client:

        def ready() -> bool:
            if client.ping() != expected:
                return False
            return not direct or all(client.topology()["endpoints"][:expected])

        server.wait_ready(ready)
    return server, expected


def start_echo(tmp: Path, name: str) -> Server:
    """bench/zmq_echo.py: ``echo`` a bare ROUTER echo, ``echo-2hop`` a forwarder in front of its own echo."""
    port = free_port()
    mode = "echo" if name == "echo" else "forward"
    server = Server(name, [sys.executable, str(HERE / "zmq_echo.py"), mode, "--bind", f"tcp://127.0.0.1:{port}"],
                    tmp / f"{name}.log", port)
    server.start()
    client = EchoAdapter(port, 0.5)
    try:
        server.wait_ready(lambda: client.get(b"") is not None)
    finally:
        client.close()
    return server


# --- client adapters (used inside the client processes and for loading) -----------------------


class Adapter:
    """The three ops a workload needs, bound to one connection: get, set, mget (hits)."""

    get: Callable[[bytes], Any]
    set: Callable[[bytes, bytes], Any]

    def mget(self, keys: list[bytes]) -> int:
        raise NotImplementedError

    def load(self, start: int, stop: int, values: Sequence[bytes] | bytes) -> None:
        """SET keys ``start`` … ``stop - 1``; key i gets ``values[i % len(values)]`` (or ``values``, one bytes)."""
        raise NotImplementedError

    def count(self) -> int:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def own_memory(self) -> tuple[int | None, str]:
        return None, ""

    def close(self) -> None:
        pass


class SharddAdapter(Adapter):
    direct = False

    def __init__(self, port: int, timeout: float) -> None:
        from shardd import Client

        self.client = Client(f"tcp://127.0.0.1:{port}", timeout=timeout, direct=self.direct)
        self.get = self.client.get
        self.set = self.client.set
        if self.direct:
            # Client(direct=True) quietly uses the router for a shard whose worker has no
            # endpoint of its own; that would be a router-mode row under a direct-mode name.
            topology = self.client.topology()
            missing = [i for i, e in enumerate(topology["endpoints"][: topology["shards"]]) if not e]
            if missing or topology.get("resizing"):
                self.client.close()
                raise RuntimeError(f"direct mode unavailable: shards {missing} have no endpoint of their own"
                                   if missing else "direct mode unavailable: a resize is running")

    def mget(self, keys: list[bytes]) -> int:
        return len(self.client.get_many(keys))

    def load(self, start: int, stop: int, values: Sequence[bytes] | bytes) -> None:
        values = value_pool(values)
        chunk, n = load_chunk(values), len(values)
        with self.client.pipeline() as pipe:
            for lo in range(start, stop, chunk):
                pipe.set_many([(key_name(i), values[i % n]) for i in range(lo, min(lo + chunk, stop))])
                if len(pipe) >= 8:  # 8 messages of 1000 keys in flight at a time
                    pipe.execute()
            pipe.execute()

    def count(self) -> int:
        return sum(row.get("keys", 0) for row in self.client.stats()["shards"])

    def flush(self) -> None:
        self.client.flush()

    def own_memory(self) -> tuple[int | None, str]:
        return sum(row.get("used_bytes", 0) for row in self.client.stats()["shards"]), "Σ used_bytes"

    def close(self) -> None:
        self.client.close()


class SharddDirectAdapter(SharddAdapter):
    """shardd.Client(direct=True): keys placed by the client, straight to the owning worker."""

    direct = True


class RedisAdapter(Adapter):
    def __init__(self, port: int, timeout: float) -> None:
        import redis

        self.client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=timeout)
        self.get = self.client.get
        self.set = self.client.set

    def mget(self, keys: list[bytes]) -> int:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        values = pipe.execute()
        return len(values) - values.count(None)

    def load(self, start: int, stop: int, values: Sequence[bytes] | bytes) -> None:
        values = value_pool(values)
        chunk, n = load_chunk(values), len(values)
        pipe = self.client.pipeline(transaction=False)
        for lo in range(start, stop, chunk):
            pipe.mset({key_name(i): values[i % n] for i in range(lo, min(lo + chunk, stop))})
            if len(pipe) >= 8:
                pipe.execute()
        pipe.execute()

    def count(self) -> int:
        return int(self.client.dbsize())

    def flush(self) -> None:
        self.client.flushall()

    def own_memory(self) -> tuple[int | None, str]:
        return int(self.client.info("memory")["used_memory"]), "used_memory"

    def close(self) -> None:
        self.client.close()


class MemcachedAdapter(Adapter):
    def __init__(self, port: int, timeout: float) -> None:
        from pymemcache.client.base import Client as MemcacheClient

        # default_noreply=False: pymemcache's default (True) would not wait for SET's reply,
        # which is not the same workload as the others' acknowledged SETs.
        self.client = MemcacheClient(("127.0.0.1", port), default_noreply=False, no_delay=True,
                                     connect_timeout=timeout, timeout=timeout)
        self.get = self.client.get
        self.set = self.client.set

    def mget(self, keys: list[bytes]) -> int:
        return len(self.client.get_many(keys))

    def load(self, start: int, stop: int, values: Sequence[bytes] | bytes) -> None:
        values = value_pool(values)
        chunk, n = load_chunk(values), len(values)
        for lo in range(start, stop, chunk):
            failed = self.client.set_many({key_name(i): values[i % n] for i in range(lo, min(lo + chunk, stop))},
                                          noreply=False)
            if failed:
                raise RuntimeError(f"memcached did not store {len(failed)} keys (e.g. {failed[0]!r})")

    def _stats(self) -> dict[bytes, Any]:
        return self.client.stats()

    def count(self) -> int:
        return int(self._stats()[b"curr_items"])

    def flush(self) -> None:
        self.client.flush_all(noreply=False)

    def own_memory(self) -> tuple[int | None, str]:
        return int(self._stats()[b"bytes"]), "bytes"

    def close(self) -> None:
        self.client.close()


def echo_payload() -> bytes:
    """The frame a shardd client sends for one GET (``key:12345``): the echo floors' request size."""
    try:
        from shardd import protocol

        return protocol.encode_request(123456, protocol.Get(key_name(12345)))
    except ImportError:  # pragma: no cover - shardd is importable wherever this runs
        return b"\x00" * 23


class EchoAdapter(Adapter):
    """A DEALER to bench/zmq_echo.py: each "GET" sends one GET-sized frame and waits for it back.

    A blocking ``send``/``recv`` with RCVTIMEO (no poll), so this is the barest pyzmq round trip;
    a reply that missed its timeout raises zmq.Again (counted as an error).
    """

    def __init__(self, port: int, timeout: float) -> None:
        import zmq

        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, max(1, int(timeout * 1000)))
        sock.setsockopt(zmq.SNDTIMEO, max(1, int(timeout * 1000)))
        sock.connect(f"tcp://127.0.0.1:{port}")
        self._sock = sock
        payload, send, recv = echo_payload(), sock.send, sock.recv

        def get(key: bytes) -> bytes:
            send(payload)
            return recv()

        self.get = get
        self.set = lambda key, value: get(key)

    def mget(self, keys: list[bytes]) -> int:
        raise NotImplementedError("the echo floors answer single round trips only")

    def load(self, start: int, stop: int, values: Sequence[bytes] | bytes) -> None:
        pass  # nothing is stored

    def close(self) -> None:
        self._sock.close(0)


ADAPTERS: dict[str, type[Adapter]] = {"shardd": SharddAdapter, "shardd-direct": SharddDirectAdapter,
                                      "redis": RedisAdapter, "memcached": MemcachedAdapter,
                                      "echo": EchoAdapter, "echo-2hop": EchoAdapter}


def make_adapter(system: str, port: int, timeout: float = 5.0) -> Adapter:
    return ADAPTERS[system](port, timeout)


# --- the client processes ---------------------------------------------------------------------


def make_step(spec: dict[str, Any], adapter: Adapter, index: int) -> tuple[Callable[[int], int], int]:
    """The plan of one process as ``step(i) -> misses`` and the ops one step counts for."""
    rng = process_rng(spec["seed"], index)
    keys, value = spec["keys"], b"v" * spec["value_size"]
    mask = PLAN_SIZE - 1
    workload = spec["workload"]
    if workload == "get":
        plan = uniform_keys(rng, keys)
        get = adapter.get

        def step(i: int) -> int:
            return get(plan[i & mask]) is None
        return step, 1
    if workload == "set":
        plan = uniform_keys(rng, keys)
        put = adapter.set

        def step(i: int) -> int:
            put(plan[i & mask], value)
            return 0
        return step, 1
    if workload == "batch":
        batches = key_batches(rng, keys, spec["batch"])
        mget, size = adapter.mget, len(batches[0])

        def step(i: int) -> int:
            return size - mget(batches[i % BATCH_PLANS])
        return step, size
    if workload == "mixed":
        plan = zipf_keys(rng, keys, spec["zipf_s"])
        gets = op_mix(rng, spec["get_ratio"])
        get, put = adapter.get, adapter.set

        def step(i: int) -> int:
            j = i & mask
            if gets[j]:
                return get(plan[j]) is None
            put(plan[j], value)
            return 0
        return step, 1
    raise ValueError(f"unknown workload {workload!r}")


def timed_loop(step: Callable[[int], int], per_step: int, measure_from: int, stop_at: int,
               clock: Callable[[], int] = time.perf_counter_ns) -> dict[str, Any]:
    """Run ``step`` until ``stop_at``; measure the steps that start at or after ``measure_from``."""
    hist = Histogram()
    record = hist.record
    errors: Counter[str] = Counter()
    steps = misses = 0
    i = 0
    while True:
        t0 = clock()
        if t0 >= stop_at:
            break
        try:
            missed = step(i)
        except Exception as exc:  # a failed request is counted, not timed
            if t0 >= measure_from:
                errors[type(exc).__name__] += 1
            i += 1
            continue
        t1 = clock()
        i += 1
        if t0 >= measure_from:
            record(t1 - t0)
            steps += 1
            misses += missed
    elapsed = max(clock() - measure_from, 1) / 1e9
    return {"ops": steps * per_step, "elapsed_s": elapsed, "misses": int(misses), "errors": dict(errors),
            "histogram": hist.to_dict()}


def paced_loop(step: Callable[[int], int], per_step: int, first_due: int, period_ns: int, measure_from: int,
               stop_at: int, clock: Callable[[], int] = time.perf_counter_ns,
               sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Start one ``step`` every ``period_ns`` from ``first_due`` until ``stop_at``: an offered rate.

    Open loop on a fixed schedule: a step is never sent early; a late one is sent at once and
    none is skipped, so a server that cannot keep up gets fewer than offered (the achieved rate
    says so) and its latency, counted from when each step was *due*, shows how far behind it is.
    Steps sent at or after ``measure_from`` are measured; nothing is sent from ``stop_at`` on.
    """
    hist = Histogram()
    record = hist.record
    errors: Counter[str] = Counter()
    steps = misses = 0
    i = 0
    due = first_due
    while due < stop_at:
        now = clock()
        if now < due:
            sleep((due - now) / 1e9)
            now = clock()
        if now >= stop_at:
            break
        measured = now >= measure_from
        try:
            missed = step(i)
        except Exception as exc:
            if measured:
                errors[type(exc).__name__] += 1
        else:
            if measured:
                record(clock() - due)
                steps += 1
                misses += missed
        i += 1
        due += period_ns
    elapsed = max(max(clock(), stop_at) - measure_from, 1) / 1e9
    return {"ops": steps * per_step, "elapsed_s": elapsed, "misses": int(misses), "errors": dict(errors),
            "histogram": hist.to_dict()}


def _client_process(index: int, spec: dict[str, Any], start_at: Any, go: Any, results: Any) -> None:
    """One client process: plan, connect, report ready, wait for the common start, run, report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops us and the servers
    try:
        adapter = make_adapter(spec["system"], spec["port"], spec["timeout"])
        step, per_step = make_step(spec, adapter, index)
        adapter.get(key_name(0))  # connected, and the first request's set-up cost is paid
    except Exception as exc:
        results.put(("error", index, f"{type(exc).__name__}: {exc}"))
        return
    results.put(("ready", index, None))
    if not go.wait(120):
        return
    try:
        measure_from = int((start_at.value + spec["warmup"]) * 1e9)
        stop_at = measure_from + int(spec["duration"] * 1e9)
        if spec.get("rate"):  # paced: spec["rate"] steps/s over all spec["procs"] processes, phases spread
            period = int(1e9 * spec["procs"] / spec["rate"])
            first_due = int(start_at.value * 1e9) + period * index // spec["procs"]
            report = paced_loop(step, per_step, first_due, period, measure_from, stop_at)
        else:
            report = timed_loop(step, per_step, measure_from, stop_at)
    except Exception as exc:
        results.put(("error", index, f"{type(exc).__name__}: {exc}"))
    else:
        results.put(("done", index, report))
    finally:
        adapter.close()


class RunError(Exception):
    pass


def run_clients(spec: dict[str, Any], procs: int,
                on_start: Callable[[float, list[Any]], None] | None = None) -> dict[str, Any]:
    """Spawn ``procs`` client processes for one (system, workload); return the merged report.

    ``on_start(start_at, processes)``, if given, is called once every process is ready, with the
    ``time.perf_counter()`` instant they start at (measuring begins ``spec["warmup"]`` later).
    """
    ctx = mp.get_context("spawn")
    start_at = ctx.Value("d", 0.0)
    go = ctx.Event()
    results = ctx.Queue()
    workers = [ctx.Process(target=_client_process, args=(i, spec, start_at, go, results), daemon=True)
               for i in range(procs)]
    for w in workers:
        w.start()
    reports: list[dict[str, Any]] = []
    try:
        ready = 0
        while ready < procs:
            kind, index, detail = _next(results, 120.0, workers)
            if kind == "error":
                raise RunError(f"client process {index} could not start: {detail}")
            ready += 1
        start_at.value = time.perf_counter() + 0.05
        go.set()
        if on_start is not None:
            on_start(start_at.value, workers)
        while len(reports) < procs:
            kind, index, detail = _next(results, spec["warmup"] + spec["duration"] + 60.0, workers)
            if kind == "error":
                raise RunError(f"client process {index} failed: {detail}")
            reports.append(detail)
    except BaseException:  # interrupted or failed: no point letting the others finish their run
        for w in workers:
            if w.is_alive():
                w.terminate()
        raise
    finally:
        go.set()
        for w in workers:
            w.join(5)
            if w.is_alive():
                w.terminate()
                w.join(5)
    hist = Histogram()
    errors: Counter[str] = Counter()
    ops, ops_per_s, misses = 0, 0.0, 0
    for r in reports:
        hist.merge(Histogram.from_dict(r["histogram"]))
        errors.update(r["errors"])
        ops += r["ops"]
        misses += r["misses"]
        ops_per_s += r["ops"] / r["elapsed_s"]
    return {"ops": ops, "ops_per_s": ops_per_s, "misses": misses, "errors": dict(errors),
            "p50_us": hist.percentile(50) / 1000, "p95_us": hist.percentile(95) / 1000,
            "p99_us": hist.percentile(99) / 1000, "max_us": hist.max / 1000, "samples": hist.count}


def _next(results: Any, timeout: float, procs: list[Any]) -> tuple[str, int, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return results.get(timeout=0.5)
        except queue.Empty:
            if time.monotonic() > deadline:
                raise RunError("client processes stopped answering") from None
            dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                raise RunError(f"client process {dead[0]} died (exit code {procs[dead[0]].exitcode})") from None


# --- environment ------------------------------------------------------------------------------


def _run_out(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment() -> dict[str, str]:
    """Machine and versions, for the report."""
    cpu = next((line.split(":", 1)[1].strip() for line in _run_out(["lscpu"]).splitlines()
                if line.startswith("Model name:")), platform.processor() or "unknown")
    env = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(ImportError):
        import zmq

        env["pyzmq"] = f"{zmq.__version__} (libzmq {zmq.zmq_version()})"
    with contextlib.suppress(ImportError):
        import msgspec

        env["msgspec"] = msgspec.__version__
    with contextlib.suppress(ImportError):
        import shardd

        commit = _run_out(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
        dirty = _run_out(["git", "-C", str(REPO), "status", "--porcelain", "--", "shardd"])
        env["shardd"] = f"{shardd.__version__} ({commit}{', shardd/ modified' if dirty else ''})"
    redis_v = _run_out(["redis-server", "--version"]).split()
    env["redis-server"] = next((w[2:] for w in redis_v if w.startswith("v=")), "?")
    env["memcached"] = _run_out(["memcached", "-V"]).removeprefix("memcached ")
    with contextlib.suppress(ImportError):
        import redis

        try:
            import hiredis  # noqa: F401

            parser = "hiredis parser"
        except ImportError:
            parser = "pure-Python parser, no hiredis"
        env["redis-py"] = f"{redis.__version__} ({parser})"
    with contextlib.suppress(ImportError):
        import pymemcache

        env["pymemcache"] = pymemcache.__version__
    return env


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


# --- the run ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="shardd vs Redis vs memcached, side by side (see bench/README.md).")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: --warmup 0.3 --duration 1 --memory-keys 100000 --cpu-duration 2 "
                         "--json-keys 20000 (explicit options win)")
    ap.add_argument("--duration", type=float, help="measured seconds per workload and system (default 10)")
    ap.add_argument("--warmup", type=float, help="unmeasured seconds first (default 2)")
    ap.add_argument("--keys", type=int, default=100_000, help="key space of the workloads (default 100000)")
    ap.add_argument("--value-size", type=int, default=100, help="bytes per value (default 100)")
    ap.add_argument("--memory-keys", type=int, help="keys loaded for the memory comparison (default 1000000)")
    ap.add_argument("--batch", type=int, default=100, help="keys per batched GET (default 100)")
    ap.add_argument("--procs", type=int, default=8, help="client processes of the mixed workload (default 8)")
    ap.add_argument("--get-ratio", type=float, default=0.9, help="GET share of the mixed workload (default 0.9)")
    ap.add_argument("--zipf-s", type=float, default=0.99, help="Zipf exponent of the mixed workload (default 0.99)")
    ap.add_argument("--cpu-rate", type=float, default=5000.0,
                    help="cpu workload: GET/s offered, all client processes together (default 5000)")
    ap.add_argument("--cpu-duration", type=float, help="cpu workload: measured seconds per system (default 10)")
    ap.add_argument("--cpu-procs", type=int, default=4, help="cpu workload: pacing client processes (default 4)")
    ap.add_argument("--json-keys", type=int, help="json workload: keys with JSON values (default 100000)")
    ap.add_argument("--json-value-size", type=int, default=4096, help="json workload: bytes per value (default 4096)")
    ap.add_argument("--shards", type=int, default=0, help="shardd shards (default 0: one per CPU)")
    ap.add_argument("--systems", default=",".join(ALL_SYSTEMS),
                    help=f"comma-separated subset of {','.join(ALL_SYSTEMS)}")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma-separated subset of {','.join(WORKLOADS)}")
    ap.add_argument("--rounds", "--repeat", dest="rounds", type=int,
                    help="rounds of every throughput, cpu, json and resp row, systems interleaved within each round; "
                         "the median round is shown (default 1; 3 for resp)")
    ap.add_argument("--resp", action="store_true",
                    help="the RESP section only (same as --workloads resp): redis-benchmark against Redis and "
                         "shardd's RESP endpoint")
    ap.add_argument("--resp-systems", default="redis,shardd-resp,shardd-resp-router",
                    help=f"resp: comma-separated subset of {','.join(RESP_SYSTEMS)} (default redis,shardd-resp,"
                         "shardd-resp-router; "
                         "shardd-resp-gw is the measuring prototype bench/resp_gateway_proto.py)")
    ap.add_argument("--resp-requests", type=int, help="resp: redis-benchmark -n per run (default 200000)")
    ap.add_argument("--resp-clients", type=int, default=50, help="resp: redis-benchmark -c (default 50)")
    ap.add_argument("--resp-pipelines", default="1,16", help="resp: redis-benchmark -P depths (default 1,16)")
    ap.add_argument("--resp-tests", default="set,get", help="resp: redis-benchmark tests, each its own run "
                                                            "(default set,get)")
    ap.add_argument("--resp-keyspace", type=int, default=0,
                    help="resp: redis-benchmark -r (default 0: not passed, so every op uses one key)")
    ap.add_argument("--resp-gateways", type=int, default=0,
                    help="resp: gateway processes of shardd-resp-gw (default 0: one per CPU)")
    ap.add_argument("--timeout", type=float, default=5.0, help="client timeout in seconds (default 5)")
    ap.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    ap.add_argument("--json", metavar="PATH", help="also write every figure as JSON to PATH")
    args = ap.parse_args(argv)
    quick = {"duration": 1.0, "warmup": 0.3, "memory_keys": 100_000, "cpu_duration": 1.0, "json_keys": 20_000,
             "resp_requests": 20_000}
    full = {"duration": 10.0, "warmup": 2.0, "memory_keys": 1_000_000, "cpu_duration": 10.0, "json_keys": 100_000,
            "resp_requests": 200_000}
    for name, default in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    args.workloads = ["resp"] if args.resp else [w.strip() for w in args.workloads.split(",") if w.strip()]
    args.resp_rounds = 3 if args.rounds is None else args.rounds
    args.rounds = 1 if args.rounds is None else args.rounds
    args.resp_systems = [s.strip() for s in args.resp_systems.split(",") if s.strip()]
    args.resp_tests = [t.strip().lower() for t in args.resp_tests.split(",") if t.strip()]
    try:
        args.resp_pipelines = [int(d) for d in args.resp_pipelines.split(",") if d.strip()]
    except ValueError:
        ap.error("--resp-pipelines must be comma-separated integers")
    problems = [
        (args.duration > 0, "--duration must be > 0"),
        (args.warmup >= 0, "--warmup must be >= 0"),
        (args.keys >= 1, "--keys must be at least 1"),
        (args.value_size >= 1, "--value-size must be at least 1"),
        (args.memory_keys >= 1, "--memory-keys must be at least 1"),
        (args.batch >= 1, "--batch must be at least 1"),
        (args.procs >= 1, "--procs must be at least 1"),
        (0 <= args.get_ratio <= 1, "--get-ratio must be in [0, 1]"),
        (args.zipf_s >= 0, "--zipf-s must be >= 0"),
        (args.cpu_rate > 0, "--cpu-rate must be > 0"),
        (args.cpu_duration > 0, "--cpu-duration must be > 0"),
        (args.cpu_procs >= 1, "--cpu-procs must be at least 1"),
        (args.json_keys >= 1, "--json-keys must be at least 1"),
        (args.json_value_size >= 64, "--json-value-size must be at least 64"),
        (args.shards >= 0, "--shards must be >= 0"),
        (args.timeout > 0, "--timeout must be > 0"),
        (args.rounds >= 1, "--rounds must be at least 1"),
        (bool(args.resp_systems) and set(args.resp_systems) <= set(RESP_SYSTEMS),
         f"--resp-systems must be a subset of {RESP_SYSTEMS}"),
        (bool(args.resp_tests) and set(args.resp_tests) <= {"set", "get"}, "--resp-tests must be a subset of set,get"),
        (bool(args.resp_pipelines) and min(args.resp_pipelines) >= 1, "--resp-pipelines must be at least 1 each"),
        (args.resp_requests >= 1 and args.resp_clients >= 1, "--resp-requests and --resp-clients must be at least 1"),
        (args.resp_keyspace >= 0 and args.resp_gateways >= 0, "--resp-keyspace and --resp-gateways must be >= 0"),
        (bool(args.systems) and set(args.systems) <= set(ALL_SYSTEMS), f"--systems must be a subset of {ALL_SYSTEMS}"),
        (bool(args.workloads) and set(args.workloads) <= set(WORKLOADS),
         f"--workloads must be a subset of {WORKLOADS}"),
    ]
    for ok, message in problems:
        if not ok:
            ap.error(message)
    return args


def check_libraries(systems: Sequence[str]) -> None:
    servers = servers_for(systems)
    missing = [pkg for system, module, pkg in (("redis", "redis", "redis"), ("memcached", "pymemcache", "pymemcache"),
                                               ("shardd", "psutil", "psutil"))
               if system in servers and importlib.util.find_spec(module) is None]
    if importlib.util.find_spec("psutil") is None and "psutil" not in missing:
        missing.append("psutil")
    if missing:
        raise SetupError(f"missing Python packages: {', '.join(missing)}; install them with: pip install -e '.[bench]'")


def measure_memory(system: str, server: Server, adapter: Adapter, keys: int, values: Sequence[bytes]) -> MemoryRow:
    rss_empty, pss_empty, _ = server.rss()
    t0 = time.monotonic()
    adapter.load(0, keys, values)
    load_s = time.monotonic() - t0
    time.sleep(0.5)  # let allocators and background threads settle
    stored = adapter.count()
    rss_loaded, pss, nprocs = server.rss()
    own, own_name = adapter.own_memory()
    notes = []
    if nprocs > 1:
        notes.append(f"{nprocs} processes summed")
    if stored != keys:
        notes.append(f"**only {stored:,} of {keys:,} keys stored**")
    return MemoryRow(system, stored, rss_empty, rss_loaded, own, own_name, load_s, "; ".join(notes), pss_empty, pss)


def _sleep_until(instant: float) -> None:
    """Sleep until ``time.perf_counter()`` reaches ``instant`` (the clients' clock)."""
    while (left := instant - time.perf_counter()) > 0:
        time.sleep(min(left, 0.5))


class CpuProbe:
    """Reads the CPU times of a server's processes at the start and the end of the measured window.

    ``on_start`` is run_clients' hook: it runs in the parent once every client is ready and
    blocks through the window (the clients' reports wait in their queue meanwhile).
    """

    def __init__(self, server: Server, warmup: float, duration: float) -> None:
        self.server = server
        self.warmup = warmup
        self.duration = duration
        self.cpu_s: float | None = None
        self.processes = 0

    def on_start(self, start_at: float, _clients: list[Any]) -> None:
        begin = start_at + self.warmup
        _sleep_until(begin)
        before = cpu_seconds(self.server.processes())
        _sleep_until(begin + self.duration)
        after = cpu_seconds(self.server.processes())
        self.cpu_s = cpu_used(before, after)
        self.processes = len(after)


def run_workload(args: argparse.Namespace, workload: str, system: str, server: Server) -> dict[str, Any]:
    """One round of one (workload, system): spawn its client processes, return the merged report."""
    procs = {"mixed": args.procs, "cpu": args.cpu_procs}.get(workload, 1)
    spec = {"system": system, "port": server.port, "workload": "get" if workload == "cpu" else workload,
            "keys": args.keys, "value_size": args.value_size, "batch": args.batch,
            "get_ratio": args.get_ratio, "zipf_s": args.zipf_s, "seed": args.seed,
            "warmup": args.warmup, "duration": args.duration, "timeout": args.timeout}
    if workload != "cpu":
        return run_clients(spec, procs)
    spec.update(rate=args.cpu_rate, procs=procs, duration=args.cpu_duration)
    probe = CpuProbe(server, args.warmup, args.cpu_duration)
    result = run_clients(spec, procs, probe.on_start)
    result.update(cpu_s=probe.cpu_s, server_procs=probe.processes, cpu_per_m=per_million(probe.cpu_s, result["ops"]))
    return result


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_json(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The compressible-values workload: memory per key and sync GET of JSON values.

    Fresh servers of its own, so nothing earlier in the run is in their heaps: a Redis, a shardd
    with ``compression = "zstd"`` and one with ``compression = "off"``, each loaded with the same
    ``--json-keys`` keys (key i holds document i mod JSON_DOCUMENTS; shardd's ``max_memory`` is
    set so that nothing is evicted). The Redis goes once its memory is read; both shardd daemons
    then serve sync GETs (1 process, uniform keys) in each client mode, interleaved per round. A
    daemon that refuses the config key gives "n/a" rows.
    """
    size = args.json_value_size
    values = json_values.json_documents(args.seed, JSON_DOCUMENTS, size)
    zratio = json_values.zstd_ratio(values)
    shown = f"{zratio:.2f}:1" if zratio is not None else "not checked (zstandard not installed)"
    print(f"compare: json: {len(values)} distinct {size} B JSON documents, zstd level 1 ratio {shown}",
          file=sys.stderr)
    modes = [s for s in ("shardd-direct", "shardd") if s in args.systems]
    daemons = {"shardd-zstd": ("zstd", JSON_ZSTD), "shardd-off": ("off", JSON_OFF)} if modes else {}
    # Room for every value uncompressed, twice over, so nothing is evicted (as memcached's -m).
    max_memory = max(2**30, 2 * args.json_keys * (size + 512))
    servers: dict[str, Server] = {}
    refused: dict[str, str] = {}
    memory: list[MemoryRow] = []
    rows: list[Row] = []
    redis: Server | None = None
    shards = 0
    try:
        if "redis" in args.systems:
            print("compare: json: starting redis-json", file=sys.stderr)
            redis = start_redis(tmp, "redis-json")
        for name, (compression, _) in daemons.items():
            print(f"compare: json: starting {name} (compression = {compression!r})", file=sys.stderr)
            try:
                servers[name], shards = start_shardd(tmp, args.shards, direct="shardd-direct" in modes, name=name,
                                                     settings={"compression": compression,
                                                               "max_memory": max_memory})
            except SetupError as exc:
                refused[name] = one_line(str(exc))
                print(f"compare: json: {refused[name]}", file=sys.stderr)
        for label, server, system in (("redis", redis, "redis"), (JSON_ZSTD, servers.get("shardd-zstd"), "shardd"),
                                      (JSON_OFF, servers.get("shardd-off"), "shardd")):
            if server is None:
                continue
            print(f"compare: json: memory, {label}: loading {args.json_keys:,} keys", file=sys.stderr)
            adapter = make_adapter(system, server.port, max(args.timeout, 30.0))
            try:
                memory.append(measure_memory(label, server, adapter, args.json_keys, values))
            finally:
                adapter.close()
        if redis is not None:
            redis.stop()  # its part is done: give its memory back before the GET rows
        measured: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for round_no in range(args.rounds):
            for name, server in servers.items():
                for system in modes:
                    print(f"compare: json: round {round_no + 1}/{args.rounds}: sync GET, {name}, {system} "
                          f"[load {loadavg()}]", file=sys.stderr)
                    spec = {"system": system, "port": server.port, "workload": "get", "keys": args.json_keys,
                            "value_size": size, "batch": args.batch, "get_ratio": 1.0, "zipf_s": args.zipf_s,
                            "seed": args.seed, "warmup": args.warmup, "duration": args.duration,
                            "timeout": args.timeout}
                    measured.setdefault((name, system), []).append(run_clients(spec, 1))
                    if not server.alive():
                        raise RunError(f"{name} died during the json GETs ({system}):\n{server.log_tail()}")
        for name, (compression, _) in daemons.items():
            for system in modes:
                row = Row(f"json-{compression}", f"sync GET, {size} B JSON", system, CLIENTS[system], 1)
                if name in refused:
                    row.note = f"n/a: the daemon refused `compression = \"{compression}\"` (its message is above)"
                else:
                    runs = measured[(name, system)]
                    res = median_run(runs)
                    row.ops_per_s = res["ops_per_s"] if res["ops"] else None
                    row.p50_us, row.p95_us, row.p99_us = res["p50_us"], res["p95_us"], res["p99_us"]
                    row.note, row.misses, row.errors = spread_note(runs), res["misses"], res["errors"]
                rows.append(row)
    finally:
        for server in (redis, *servers.values()):
            if server is not None:
                server.stop()
    return {"documents": len(values), "value_size": size, "keys": args.json_keys, "zstd_ratio": zratio,
            "shards": shards, "memory": [asdict(m) for m in memory], "rows": [asdict(r) for r in rows],
            "refused": refused}


def wait_resp(server: Server, port: int) -> None:
    """Ready: the RESP port answers a PING with +PONG (a bare socket: no client's handshake)."""

    def ping() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")

    server.wait_ready(ping)


def start_gateways(tmp: Path, router_port: int, procs: int) -> Server:
    """bench/resp_gateway_proto.py: ``procs`` gateway processes on one SO_REUSEPORT port, in front
    of the daemon at ``router_port`` (they ask it for the workers' direct endpoints once)."""
    port = free_port()
    server = Server("shardd-resp-gw", [sys.executable, str(HERE / "resp_gateway_proto.py"), "--port", str(port),
                                       "--router", f"tcp://127.0.0.1:{router_port}", "--procs", str(procs)],
                    tmp / "shardd-resp-gw.log", port)
    server.start()
    wait_resp(server, port)
    return server


def run_benchmark(argv: list[str], system: str, test: str, pipeline: int, requests: int,
                  server_processes: Callable[[], list[Any]], timeout: float) -> RespRun:
    """One redis-benchmark run; the server side's CPU read just before and just after it, its own
    from ``wait4`` (exact, its whole life)."""
    import threading

    procs = server_processes()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        before = cpu_seconds(procs)
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            timer.cancel()
        after = cpu_seconds(procs)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, errors = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    figures = parse_benchmark_csv(text).get(test.upper())
    if proc.returncode != 0 or figures is None or not figures.get("rps"):
        raise RunError(f"redis-benchmark against {system} ({shlex.join(argv)}) exited with {proc.returncode} "
                       f"and no {test.upper()} row:\n{one_line(text + ' ' + errors, 1000)}")
    return RespRun(system, test.upper(), pipeline, requests, figures["rps"], figures.get("p50_latency_ms"),
                   figures.get("p99_latency_ms"), cpu_used(before, after), usage.ru_utime + usage.ru_stime,
                   len(after))


def run_resp(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The RESP section: redis-benchmark against Redis and shardd's RESP endpoint (and, with
    ``shardd-resp-gw`` in ``--resp-systems``, the gateway prototype in front of the same daemon).

    Fresh servers of its own: a Redis (no persistence) and a shardd daemon with ``resp_bind`` on
    a free port (direct mode on, which the gateways need). Each round runs every pipeline depth,
    test and system, systems innermost (interleaved), one redis-benchmark process per test; an
    unmeasured warm-up run per system comes first.
    """
    exe = shutil.which("redis-benchmark")
    if exe is None:
        raise SetupError("redis-benchmark not found: apt-get update && apt-get install -y redis-tools")
    systems = args.resp_systems
    servers: dict[str, Server] = {}
    procs_of: dict[str, Callable[[], list[Any]]] = {}
    ports: dict[str, int] = {}
    shards = 0
    gateways = args.resp_gateways or len(os.sched_getaffinity(0))
    runs: list[RespRun] = []
    try:
        if "redis" in systems:
            print("compare: resp: starting redis", file=sys.stderr)
            servers["redis"] = start_redis(tmp, "redis-resp")
            ports["redis"] = servers["redis"].port
            procs_of["redis"] = servers["redis"].processes
        def start_resp(system: str, front: str, direct: bool = False) -> None:
            nonlocal shards
            port = free_port()
            print(f"compare: resp: starting shardd (resp_front = {front}) on port {port}", file=sys.stderr)
            server, shards = start_shardd(tmp, args.shards, direct=direct, name=system,
                                     settings={"resp_bind": f"tcp://127.0.0.1:{port}", "resp_front": front})
            servers[system] = server
            wait_resp(server, port)
            ports[system] = port
            procs_of[system] = server.processes

        if "shardd-resp" in systems or "shardd-resp-gw" in systems:
            start_resp("shardd-resp", "workers", direct="shardd-resp-gw" in systems)
        if "shardd-resp-router" in systems:
            start_resp("shardd-resp-router", "router")
        if "shardd-resp" in servers:
            daemon = servers["shardd-resp"]
            if "shardd-resp-gw" in systems:
                print(f"compare: resp: starting {gateways} gateway processes", file=sys.stderr)
                gw = servers["shardd-resp-gw"] = start_gateways(tmp, daemon.port, gateways)  # type: ignore[union-attr]
                ports["shardd-resp-gw"] = gw.port
                procs_of["shardd-resp-gw"] = lambda: daemon.processes() + gw.processes()
        order = [s for s in RESP_SYSTEMS if s in systems]
        timeout = max(120.0, args.resp_requests / 1000.0)  # a server that stops answering: 1,000 ops/s at least

        def once(system: str, test: str, pipeline: int, requests: int) -> RespRun:
            argv = benchmark_argv(exe, ports[system], test, requests, args.resp_clients, pipeline, args.resp_keyspace)
            result = run_benchmark(argv, system, test, pipeline, requests, procs_of[system], timeout)
            for name, server in servers.items():
                if not server.alive():
                    raise RunError(f"{name} died during redis-benchmark {test} -P {pipeline} ({system}):\n"
                                   f"{server.log_tail()}")
            return result

        for system in order:  # warm-up: connections, allocators, the key
            for test in args.resp_tests:
                once(system, test, 16, min(args.resp_requests, 20_000))
        for round_no in range(args.resp_rounds):
            for pipeline in args.resp_pipelines:
                for test in args.resp_tests:
                    for system in order:
                        print(f"compare: resp: round {round_no + 1}/{args.resp_rounds}: {test.upper()} -P {pipeline}, "
                              f"{system} [load {loadavg()}]", file=sys.stderr)
                        run = once(system, test, pipeline, args.resp_requests)
                        runs.append(run)
                        print(f"compare: resp:   {run.ops_per_s:,.0f} ops/s, p99 {fmt_num(run.p99_ms, 3)} ms, "
                              f"server CPU {fmt_num(per_million(run.server_cpu_s, run.requests), 1)} s per 1M",
                              file=sys.stderr)
    finally:
        for server in reversed(list(servers.values())):
            server.stop()
    argv_shown = " ".join(benchmark_argv("redis-benchmark", 0, "TEST", args.resp_requests, args.resp_clients, 0,
                                         args.resp_keyspace)).replace("-p 0", "-p PORT").replace("-P 0", "-P DEPTH")
    return {"systems": order, "shards": shards, "gateways": gateways if "shardd-resp-gw" in systems else 0,
            "rounds": args.resp_rounds, "requests": args.resp_requests, "clients": args.resp_clients,
            "keyspace": args.resp_keyspace, "argv": argv_shown,
            "redis_benchmark": _run_out([exe, "--version"]), "runs": [asdict(r) for r in runs]}


def format_resp_report(jr: dict[str, Any]) -> list[str]:
    rows = summarize_resp([RespRun(**r) for r in jr["runs"]])
    servers = "; ".join(f"`{s}`: {RESP_SERVERS[s]}" for s in jr["systems"])
    gw = f", {jr['gateways']} gateway processes" if jr["gateways"] else ""
    keys = (f"`-r {jr['keyspace']}` random keys" if jr["keyspace"]
            else "one key (redis-benchmark's default without `-r`)")
    return [
        f"RESP endpoint (issue 14): {jr['redis_benchmark']}, `{jr['argv']}`, one run per test and depth, {keys}; "
        f"shardd: {jr['shards']} shards{gw}; each figure the median of {jr['rounds']} interleaved rounds "
        "(range in brackets). Server CPU = user + system summed over every process of the server side "
        "(psutil, read just before and after each redis-benchmark run); redis-benchmark's own from wait4. "
        f"{servers}.",
        "", format_resp_table(rows), "",
        "Targets (issue 14):", "", format_resp_verdicts(evaluate_resp_targets(rows)), "",
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    check_libraries(args.systems)
    env = environment()
    load_before = loadavg()
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    tmp = Path(tempfile.mkdtemp(prefix="shardd-compare-"))
    servers: dict[str, Server] = {}
    rows: list[Row] = []
    memory: list[MemoryRow] = []
    cpu: list[CpuRow] = []
    json_report: dict[str, Any] | None = None
    resp_report: dict[str, Any] | None = None
    value = b"v" * args.value_size
    try:
        shards = 0
        # The json and resp workloads start servers of their own; the others share these.
        shared = [w for w in args.workloads if w not in ("json", "resp")]
        for name in servers_for([s for s in args.systems if any(applies(s, w) for w in shared)]):
            print(f"compare: starting {name}", file=sys.stderr)
            if name == "redis":
                servers[name] = start_redis(tmp)
            elif name == "memcached":
                servers[name] = start_memcached(tmp, args.memory_keys, args.value_size)
            elif name in ECHO_SYSTEMS:
                servers[name] = start_echo(tmp, name)
            else:
                servers[name], shards = start_shardd(tmp, args.shards, direct="shardd-direct" in args.systems)
        throughput = [w for w in WORKLOADS if w in args.workloads and w not in ("memory", "json", "resp")]
        # Memory and loading once per data server, through its own system's (router-mode) client.
        for name in servers:
            if name in ECHO_SYSTEMS:
                continue
            adapter = make_adapter(name, servers[name].port, max(args.timeout, 30.0))
            try:
                if "memory" in args.workloads:
                    print(f"compare: memory, {name}: loading {args.memory_keys:,} keys", file=sys.stderr)
                    memory.append(measure_memory(name, servers[name], adapter, args.memory_keys, [value]))
                    adapter.flush()
                if throughput:
                    adapter.load(0, args.keys, [value])
            finally:
                adapter.close()
        measured: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for round_no in range(args.rounds):
            for workload in throughput:
                for system in args.systems:
                    if not applies(system, workload):
                        continue
                    server = servers[server_of(system)]
                    print(f"compare: round {round_no + 1}/{args.rounds}: {workload}, {system} "
                          f"[load {loadavg()}]", file=sys.stderr)
                    measured.setdefault((workload, system), []).append(run_workload(args, workload, system, server))
                    if not server.alive():
                        raise RunError(f"{server.name} died during {workload} ({system}):\n{server.log_tail()}")
        for workload in throughput:
            title = workload_title(workload, args.batch, args.get_ratio)
            for system in args.systems:
                if not applies(system, workload):
                    continue
                runs = measured[(workload, system)]
                if workload == "cpu":
                    res = median_run(runs, "cpu_per_m")
                    cpu.append(CpuRow(system, CLIENTS[system], args.cpu_procs, args.cpu_rate,
                                      res["ops_per_s"] if res["ops"] else None, res["ops"], res["cpu_s"],
                                      res["cpu_per_m"], res["server_procs"], res["p50_us"], res["p99_us"],
                                      spread_note(runs, "cpu_per_m", "CPU s per 1M", 1), res["errors"]))
                    continue
                res = median_run(runs)
                notes = []
                if workload == "batch":
                    notes.append(f"per round trip of {min(args.batch, args.keys)} keys; ops = keys")
                notes.append(spread_note(runs))
                procs = args.procs if workload == "mixed" else 1
                rows.append(Row(workload, title, system, CLIENTS[system], procs,
                                res["ops_per_s"] if res["ops"] else None, res["p50_us"], res["p95_us"],
                                res["p99_us"], _joined(*notes), res["misses"], res["errors"]))
        if "json" in args.workloads:
            json_report = run_json(args, tmp)
            shards = shards or json_report["shards"]
        if "resp" in args.workloads:
            resp_report = run_resp(args, tmp)
            shards = shards or resp_report["shards"]
    finally:
        for server in servers.values():
            server.stop()
        stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    json_memory = [MemoryRow(**m) for m in json_report["memory"]] if json_report else []
    json_rows = [Row(**r) for r in json_report["rows"]] if json_report else []
    return {
        "started": started_at,
        "command": "python " + shlex.join(sys.argv),
        "environment": env,
        "shards": shards,
        "load_before": load_before,
        "load_after": loadavg(),
        "settings": {k: getattr(args, k) for k in ("duration", "warmup", "keys", "value_size", "memory_keys", "batch",
                                                    "procs", "get_ratio", "zipf_s", "seed", "rounds", "cpu_rate",
                                                    "cpu_duration", "cpu_procs", "json_keys", "json_value_size",
                                                    "resp_requests", "resp_clients", "resp_keyspace",
                                                    "resp_rounds")},
        "rows": [asdict(r) for r in rows],
        "memory": [asdict(m) for m in memory],
        "cpu": [asdict(c) for c in cpu],
        "json": json_report,
        "resp": resp_report,
        "targets": [asdict(t) for t in evaluate_targets(rows, memory)],
        "targets_efficiency": [asdict(t) for t in evaluate_efficiency_targets(
            rows, memory, cpu, json_memory, json_rows, shards, args.batch, args.json_value_size)],
    }


def format_report(report: dict[str, Any]) -> str:
    env, s = report["environment"], report["settings"]
    rows = [Row(**r) for r in report["rows"]]
    memory = [MemoryRow(**m) for m in report["memory"]]
    cpu = [CpuRow(**c) for c in report["cpu"]]
    versions = ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("cpu", "cores", "kernel"))
    out = [
        f"Run {report['started']}: `{report['command']}`",
        "",
        f"- machine: {env['cpu']}, {env['cores']} cores, Linux {env['kernel']}; "
        f"load average (1/5/15 min) before {report['load_before']}, after {report['load_after']}",
        f"- versions: {versions}",
    ]
    if not (rows or memory or cpu or report.get("json")):  # the RESP section alone: its own settings line
        out += [""]
    else:
        out += [
        f"- settings: {s['warmup']:g} s warm-up + {s['duration']:g} s measured per row; {s['keys']:,} keys of "
        f"{s['value_size']} B loaded first (every GET hits); mixed: {s['procs']} processes, Zipf s={s['zipf_s']}; "
        f"shardd: {report['shards']} shards, tcp loopback, "
        f"router mode (shardd) and direct mode (shardd-direct, same daemon); seed {s['seed']}"
        + (f"; median of {s['rounds']} interleaved rounds" if s["rounds"] > 1 else ""),
        "",
        ]
    if rows:
        out += [format_table(rows), ""]
        if any(r.system in ECHO_SYSTEMS for r in rows):
            out += ["Raw ZeroMQ floors (bench/zmq_echo.py, each its own process on tcp loopback): `echo` is one bare "
                    "pyzmq round trip, a DEALER sending a GET-sized frame to a Python ROUTER that sends it back; "
                    "`echo-2hop` is the same through a Python ROUTER→DEALER forwarder in front of the echo "
                    "(measured, not computed): the hops of client → router → worker with no work in them.", ""]
    if memory:
        out += [f"Memory: {memory[0].keys_loaded:,} keys {X} {s['value_size']} B values, loaded into the fresh "
                "server; RSS and PSS summed over the server's processes.", "", format_memory_table(memory), ""]
    if cpu:
        out += [f"Server CPU at a fixed rate: {s['cpu_rate']:,.0f} GET/s offered by {s['cpu_procs']} client "
                f"processes pacing their GETs on a fixed schedule, {s['warmup']:g} s warm-up + "
                f"{s['cpu_duration']:g} s measured; CPU = user + system of every server process (psutil, "
                "read at the start and end of the window; 10 ms ticks); latency from when each GET was due.",
                "", format_cpu_table(cpu), ""]
    jr = report.get("json")
    if jr:
        ratio_text = f"{jr['zstd_ratio']:.2f}:1" if jr["zstd_ratio"] is not None else "not checked (no zstandard)"
        out += [f"Compressible values: {jr['keys']:,} keys {X} {jr['value_size']} B JSON documents "
                f"({jr['documents']} distinct, cycled); zstd level 1 compresses them {ratio_text}. Fresh servers.", ""]
        if jr["memory"]:
            out += [format_memory_table([MemoryRow(**m) for m in jr["memory"]]), ""]
        for name, message in jr["refused"].items():
            out += [f"- {name}: n/a: {message}"]
        if jr["refused"]:
            out += [""]
        if jr["rows"]:
            out += [format_json_table([Row(**r) for r in jr["rows"]]), ""]
    if report.get("resp"):
        out += format_resp_report(report["resp"])
    if not (rows or memory or cpu or jr):  # the RESP section alone: the other targets were not measured
        return "\n".join(out).rstrip()
    out += ["Targets (docs/design.md):", "", format_targets([Target(**t) for t in report["targets"]]), "",
            "Targets (efficiency: memory, compression, get_many, server CPU per op, raw ZeroMQ floors):", "",
            format_targets([Target(**t) for t in report["targets_efficiency"]])]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    atexit.register(stop_all)

    def on_signal(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        report = run(args)
    except KeyboardInterrupt:
        print("compare: interrupted; servers stopped", file=sys.stderr)
        return 130
    except SetupError as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return EXIT_SETUP
    except RunError as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
