"""shardd side by side with Redis and memcached: same data, same workloads, same client processes.

    python bench/compare.py            # full run: 2 s warm-up + 10 s measured per workload and system
    python bench/compare.py --quick    # smoke run, under a minute
    python bench/compare.py --help     # every option

Theory of operation
-------------------
The parent starts three servers on free loopback ports, each in its own session, logging
into a private temporary directory: ``redis-server`` without persistence (``--save ""
--appendonly no``), ``memcached`` and a shardd daemon (``python -m shardd serve``, one
worker per CPU by default). It waits until each answers (PING / version / a shardd ping
answered by every shard), never on a bare sleep.

Then, for every system in turn:

1. **memory** (on the fresh server): RSS of the whole server (for shardd: supervisor + router +
   every worker, summed with psutil) before and after loading ``--memory-keys`` keys of
   ``--value-size`` bytes, plus the server's own figure (Redis ``used_memory``, memcached
   ``bytes``, the sum of shardd's per-shard ``used_bytes``) and a check that every key is there.
   Then every key is removed again.
2. the ``--keys`` key space (``key:0`` … ``key:K-1``, ``--value-size`` bytes each) is loaded,
   so every GET hits.
3. the throughput workloads, each from freshly spawned client processes: sync GET (1 process),
   sync SET (1 process), batched GET of ``--batch`` keys (1 process: shardd ``get_many``,
   a redis-py pipeline of GETs, pymemcache ``get_many``), and mixed (``--procs`` processes,
   ``--get-ratio`` GETs, the rest SETs, keys drawn from a Zipf distribution).

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

The pure parts (``ZipfSampler``, the plan builders, ``ratio`` and the table formatters) import
nothing beyond the standard library and ``loadgen.Histogram``: the unit tests load this file
without any server or client library.
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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _load_loadgen() -> Any:
    """bench/loadgen.py as a module (bench/ is not a package): its Histogram is the one we use."""
    name = "shardd_bench_loadgen"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, HERE / "loadgen.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


Histogram = _load_loadgen().Histogram

SYSTEMS = ("shardd", "shardd-direct", "redis", "memcached")
WORKLOADS = ("memory", "get", "set", "batch", "mixed")
CLIENTS = {"shardd": "shardd.Client, router", "shardd-direct": "shardd.Client, direct",
           "redis": "redis-py", "memcached": "pymemcache"}
# A system measured with another system's server: the same running daemon, another client mode.
SERVER_OF = {"shardd-direct": "shardd"}
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


def median_run(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median ops/s (the lower middle one for an even count), whole: its latencies too."""
    if not runs:
        raise ValueError("no runs")
    return sorted(runs, key=lambda r: r["ops_per_s"])[(len(runs) - 1) // 2]


def format_memory_table(rows: Sequence[MemoryRow]) -> str:
    lines = [
        "| system | keys stored | RSS empty MiB | RSS loaded MiB | Δ RSS B/key | server's own figure MiB "
        f"| RSS {X} Redis | load s | notes |",
        "|" + "---|" * 9,
    ]
    redis = next((m for m in rows if m.system == "redis"), None)
    for m in rows:
        per_key = (m.rss_loaded - m.rss_empty) / m.keys_loaded if m.keys_loaded else None
        own = f"{fmt_mib(m.self_reported)} ({m.self_reported_name})" if m.self_reported is not None else "—"
        lines.append(
            f"| {m.system} | {m.keys_loaded:,} | {fmt_mib(m.rss_empty)} | {fmt_mib(m.rss_loaded)} "
            f"| {fmt_num(per_key, 0)} | {own} | {fmt_ratio(ratio(m.rss_loaded, redis.rss_loaded if redis else None))} "
            f"| {m.load_s:.1f} | {m.note} |"
        )
    return "\n".join(lines)


@dataclass
class Target:
    name: str
    measured: float | None  # the ratio
    goal: str  # e.g. ">= 0.60"
    met: bool | None  # None: not measured
    detail: str = ""


def evaluate_targets(rows: Sequence[Row], memory: Sequence[MemoryRow]) -> list[Target]:
    """The performance targets (docs/design.md), as ratios to the peer measured in the same run.

    The sync GET target is split by client mode (direct: at least 1.0 times Redis, router: at
    least 0.6 times); the batched and mixed targets name no mode, so each is evaluated for both
    shardd rows.
    """

    def find(workload: str, system: str) -> Row | None:
        return next((r for r in rows if r.kind == workload and r.system == system
                     and r.ops_per_s is not None), None)

    def check(name: str, value: float | None, goal: float, at_least: bool, detail: str = "") -> Target:
        met = None if value is None else (value >= goal if at_least else value <= goal)
        return Target(name, value, f"{'≥' if at_least else '≤'} {goal:.2f}{X}", met, detail)

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


def format_targets(targets: Sequence[Target]) -> str:
    lines = ["| target | goal | measured | met? |", "|---|---|---|---|"]
    for t in targets:
        met = "not measured" if t.met is None else ("yes" if t.met else "**no**")
        measured = fmt_ratio(t.measured)
        if t.detail:
            measured = f"{measured} ({t.detail})"
        lines.append(f"| {t.name} | {t.goal} | {measured} | {met} |")
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


def start_redis(tmp: Path) -> Server:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SetupError("redis-server not found: apt-get update && apt-get install -y redis-server memcached")
    port = free_port()
    server = Server("redis", [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                              "--daemonize", "no", "--dir", str(tmp), "--logfile", ""], tmp / "redis.log", port)
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


def start_shardd(tmp: Path, shards: int, direct: bool = False) -> tuple[Server, int]:
    """A shardd daemon on a free port; returns it and its shard count.

    With ``direct``, ready also means every worker has published its own endpoint (direct mode).
    """
    port = free_port()
    argv = [sys.executable, "-m", "shardd", "serve", "--bind", f"tcp://127.0.0.1:{port}",
            "--runtime-dir", str(tmp / "shardd-run")]
    if shards:
        argv += ["--shards", str(shards)]
    # Built-in defaults only: no config file or state directory from the environment (a state
    # directory would make the daemon write a snapshot when stopped).
    env = {k: v for k, v in os.environ.items() if k not in ("SHARDD_CONFIG", "STATE_DIRECTORY", "SHARDD_ENDPOINT")}
    server = Server("shardd", argv, tmp / "shardd.log", port, env)
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


# --- client adapters (used inside the client processes and for loading) -----------------------


class Adapter:
    """The three ops a workload needs, bound to one connection: get, set, mget (hits)."""

    get: Callable[[bytes], Any]
    set: Callable[[bytes, bytes], Any]

    def mget(self, keys: list[bytes]) -> int:
        raise NotImplementedError

    def load(self, start: int, stop: int, value: bytes) -> None:
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

    def load(self, start: int, stop: int, value: bytes) -> None:
        chunk = 1000
        with self.client.pipeline() as pipe:
            for lo in range(start, stop, chunk):
                pipe.set_many([(key_name(i), value) for i in range(lo, min(lo + chunk, stop))])
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

    def load(self, start: int, stop: int, value: bytes) -> None:
        chunk = 1000
        pipe = self.client.pipeline(transaction=False)
        for lo in range(start, stop, chunk):
            pipe.mset({key_name(i): value for i in range(lo, min(lo + chunk, stop))})
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

    def load(self, start: int, stop: int, value: bytes) -> None:
        chunk = 1000
        for lo in range(start, stop, chunk):
            failed = self.client.set_many({key_name(i): value for i in range(lo, min(lo + chunk, stop))},
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


ADAPTERS: dict[str, type[Adapter]] = {"shardd": SharddAdapter, "shardd-direct": SharddDirectAdapter,
                                      "redis": RedisAdapter, "memcached": MemcachedAdapter}


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
                    help="smoke run: --warmup 0.3 --duration 1 --memory-keys 100000 (explicit options win)")
    ap.add_argument("--duration", type=float, help="measured seconds per workload and system (default 10)")
    ap.add_argument("--warmup", type=float, help="unmeasured seconds first (default 2)")
    ap.add_argument("--keys", type=int, default=100_000, help="key space of the workloads (default 100000)")
    ap.add_argument("--value-size", type=int, default=100, help="bytes per value (default 100)")
    ap.add_argument("--memory-keys", type=int, help="keys loaded for the memory comparison (default 1000000)")
    ap.add_argument("--batch", type=int, default=100, help="keys per batched GET (default 100)")
    ap.add_argument("--procs", type=int, default=8, help="client processes of the mixed workload (default 8)")
    ap.add_argument("--get-ratio", type=float, default=0.9, help="GET share of the mixed workload (default 0.9)")
    ap.add_argument("--zipf-s", type=float, default=0.99, help="Zipf exponent of the mixed workload (default 0.99)")
    ap.add_argument("--shards", type=int, default=0, help="shardd shards (default 0: one per CPU)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma-separated subset of {','.join(WORKLOADS)}")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of every throughput workload, interleaved; the median round is shown (default 1)")
    ap.add_argument("--timeout", type=float, default=5.0, help="client timeout in seconds (default 5)")
    ap.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    ap.add_argument("--json", metavar="PATH", help="also write every figure as JSON to PATH")
    args = ap.parse_args(argv)
    quick = {"duration": 1.0, "warmup": 0.3, "memory_keys": 100_000}
    full = {"duration": 10.0, "warmup": 2.0, "memory_keys": 1_000_000}
    for name, default in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
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
        (args.shards >= 0, "--shards must be >= 0"),
        (args.timeout > 0, "--timeout must be > 0"),
        (args.repeat >= 1, "--repeat must be at least 1"),
        (bool(args.systems) and set(args.systems) <= set(SYSTEMS), f"--systems must be a subset of {SYSTEMS}"),
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


def measure_memory(system: str, server: Server, adapter: Adapter, keys: int, value: bytes) -> MemoryRow:
    rss_empty, _, _ = server.rss()
    t0 = time.monotonic()
    adapter.load(0, keys, value)
    load_s = time.monotonic() - t0
    time.sleep(0.5)  # let allocators and background threads settle
    stored = adapter.count()
    rss_loaded, pss, nprocs = server.rss()
    own, own_name = adapter.own_memory()
    notes = []
    if nprocs > 1:
        notes.append(f"{nprocs} processes summed" + (f"; PSS {fmt_mib(pss)} MiB" if pss else ""))
    if stored != keys:
        notes.append(f"**only {stored:,} of {keys:,} keys stored**")
    return MemoryRow(system, stored, rss_empty, rss_loaded, own, own_name, load_s, "; ".join(notes))


def run(args: argparse.Namespace) -> dict[str, Any]:
    check_libraries(args.systems)
    env = environment()
    load_before = loadavg()
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    tmp = Path(tempfile.mkdtemp(prefix="shardd-compare-"))
    servers: dict[str, Server] = {}
    rows: list[Row] = []
    memory: list[MemoryRow] = []
    value = b"v" * args.value_size
    try:
        shards = 0
        for name in servers_for(args.systems):
            print(f"compare: starting {name}", file=sys.stderr)
            if name == "redis":
                servers[name] = start_redis(tmp)
            elif name == "memcached":
                servers[name] = start_memcached(tmp, args.memory_keys, args.value_size)
            else:
                servers[name], shards = start_shardd(tmp, args.shards, direct="shardd-direct" in args.systems)
        throughput = [w for w in WORKLOADS if w in args.workloads and w != "memory"]
        # Memory and loading once per server, through its own system's (router-mode) client.
        for name in servers:
            adapter = make_adapter(name, servers[name].port, max(args.timeout, 30.0))
            try:
                if "memory" in args.workloads:
                    print(f"compare: memory, {name}: loading {args.memory_keys:,} keys", file=sys.stderr)
                    memory.append(measure_memory(name, servers[name], adapter, args.memory_keys, value))
                    adapter.flush()
                if throughput:
                    adapter.load(0, args.keys, value)
            finally:
                adapter.close()
        measured: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for round_no in range(args.repeat):
            for workload in throughput:
                procs = args.procs if workload == "mixed" else 1
                for system in args.systems:
                    print(f"compare: round {round_no + 1}/{args.repeat}: {workload}, {system}, {procs} process(es) "
                          f"[load {loadavg()}]", file=sys.stderr)
                    server = servers[server_of(system)]
                    spec = {"system": system, "port": server.port, "workload": workload,
                            "keys": args.keys, "value_size": args.value_size, "batch": args.batch,
                            "get_ratio": args.get_ratio, "zipf_s": args.zipf_s, "seed": args.seed,
                            "warmup": args.warmup, "duration": args.duration, "timeout": args.timeout}
                    measured.setdefault((workload, system), []).append(run_clients(spec, procs))
                    if not server.alive():
                        raise RunError(f"{server.name} died during {workload} ({system}):\n{server.log_tail()}")
        for workload in throughput:
            procs = args.procs if workload == "mixed" else 1
            title = workload_title(workload, args.batch, args.get_ratio)
            for system in args.systems:
                runs = measured[(workload, system)]
                res = median_run(runs)
                notes = []
                if workload == "batch":
                    notes.append(f"per round trip of {min(args.batch, args.keys)} keys; ops = keys")
                if len(runs) > 1:
                    lo, hi = min(r["ops_per_s"] for r in runs), max(r["ops_per_s"] for r in runs)
                    notes.append(f"median of {len(runs)} rounds, ops/s {lo:,.0f} to {hi:,.0f}")
                rows.append(Row(workload, title, system, CLIENTS[system], procs,
                                res["ops_per_s"] if res["ops"] else None, res["p50_us"], res["p95_us"],
                                res["p99_us"], "; ".join(notes), res["misses"], res["errors"]))
    finally:
        for server in servers.values():
            server.stop()
        stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "started": started_at,
        "command": "python " + shlex.join(sys.argv),
        "environment": env,
        "shards": shards,
        "load_before": load_before,
        "load_after": loadavg(),
        "settings": {k: getattr(args, k) for k in ("duration", "warmup", "keys", "value_size", "memory_keys", "batch",
                                                    "procs", "get_ratio", "zipf_s", "seed", "repeat")},
        "rows": [asdict(r) for r in rows],
        "memory": [asdict(m) for m in memory],
        "targets": [asdict(t) for t in evaluate_targets(rows, memory)],
    }


def format_report(report: dict[str, Any]) -> str:
    env, s = report["environment"], report["settings"]
    rows = [Row(**r) for r in report["rows"]]
    memory = [MemoryRow(**m) for m in report["memory"]]
    targets = [Target(**t) for t in report["targets"]]
    versions = ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("cpu", "cores", "kernel"))
    out = [
        f"Run {report['started']}: `{report['command']}`",
        "",
        f"- machine: {env['cpu']}, {env['cores']} cores, Linux {env['kernel']}; "
        f"load average (1/5/15 min) before {report['load_before']}, after {report['load_after']}",
        f"- versions: {versions}",
        f"- settings: {s['warmup']:g} s warm-up + {s['duration']:g} s measured per row; {s['keys']:,} keys of "
        f"{s['value_size']} B loaded first (every GET hits); mixed: {s['procs']} processes, Zipf s={s['zipf_s']}; "
        f"shardd: {report['shards']} shards, tcp loopback, "
        f"router mode (shardd) and direct mode (shardd-direct, same daemon); seed {s['seed']}",
        "",
    ]
    if rows:
        out += [format_table(rows), ""]
    if memory:
        out += [f"Memory: {memory[0].keys_loaded:,} keys {X} {s['value_size']} B values, loaded into the fresh server.",
                "", format_memory_table(memory), ""]
    out += ["Targets (docs/design.md):", "", format_targets(targets)]
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
