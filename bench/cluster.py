"""Cluster mode on one machine: join, SIGKILL, graceful leave, throughput 1 vs 3 nodes (issue 13).

    python bench/cluster.py                               # everything, ~2.5 minutes on a 2-core VM
    python bench/cluster.py --only kill --repeat 3        # one scenario, repeated
    python bench/cluster.py --only throughput --duration 10 --procs 4
    python bench/cluster.py --keys 20000 --duration 2 --repeat 1   # a quick pass
    python bench/cluster.py --help                        # every option

Theory of operation
-------------------
Every scenario starts its own etcd (``tests.etcd_server.running_etcd``: free ports, a temp data
dir) and its own nodes (``tests.cluster_harness.Cluster``: each node a whole ``shardd serve``
process tree on a free port, ``cluster_lease_ttl = --ttl``), in a temp dir; the clients are
``shardd.ClusterClient``. Waits are on states read from the nodes (the map a node installed,
``Cluster.settled``), never on bare sleeps, except the fixed-length load windows.

1. **join**: ``--keys`` keys (``set_many`` of 1000) into one node, then nodes added one at a
   time up to ``--join-nodes``. Per join: keys moved (the old nodes' key counts before minus
   after, ``Cluster.keys_per_node``) over the keys held, against the ideal 1/(N+1); slots whose
   owner changed; seconds from the new node's start to it answering ping and to the cluster
   settled; and what a client thread doing set+get of its own 300 keys (closed loop) saw in
   that window: ops, errors, stale reads (a get not returning the value just set), the slowest
   op. After the last join every key is read back (``get_many``) and compared.
2. **kill**: 3 nodes, ``--data-keys`` keys, a paced load of ``--rate`` ops/s on a fixed schedule
   (``--get-ratio`` gets, the rest sets) from ``--threads`` client threads per node's keys
   (each thread picks uniformly among the keys one node owns, so every node's keys are hit and
   a thread stuck on the dead node holds up only that node's keys). The victim's whole process
   tree is SIGSTOPped then SIGKILLed (a lost machine: no handoff). The main thread polls a
   survivor's ``topology`` until its map no longer names the victim (the issue's target: within
   lease TTL + 1 s), then waits for the survivors to settle and runs the load ``--after``
   seconds more. Each op is recorded (start, end, key, outcome); ops are classed by the owner
   of their key in the map before the kill: errors, ops slower than ``--slow-ms``, the slowest
   op, ops served between the kill and the map change, the trouble window (from the kill to the
   end of the last erroring or slow op) and the get miss rate after the map change, per class.
   Last, every loaded key is read once more (a sweep): the dead node's keys are gone (a slot
   that changes owner without a handoff starts empty) unless the load rewrote them. Variants:
   a non-controller victim with ``failover_timeout = --failover`` (large: the client rides the
   failover out, errors should be 0), the same with ``failover_timeout = 0.5`` (errors show,
   and only for the dead node's keys), and the controller as victim (an election first).
3. **leave**: 3 nodes, ``--data-keys`` keys, a writer thread (closed loop, set then get of its
   own 1000 keys, every acknowledged value remembered); SIGTERM to a node that is not the
   controller (then, in a fresh cluster, to the controller), which hands its slots off and
   exits. Reported: its keys, seconds to exit, to the survivor's map without it, to settled;
   the writer's errors and stale reads; acknowledged writes lost (every acked key read back
   with its last value) and loaded keys lost; processes of the node left behind.
4. **throughput**: three clusters up at once (an etcd each): 1 node x ``--shards``, 3 nodes x
   ``--shards``, 3 nodes x 1 shard; ``--tp-keys`` keys of 100 B in each. ``--procs`` client
   processes (spawned) do sync GETs of uniform keys with a ClusterClient each, ``--warmup`` s
   then ``--duration`` s measured, started at a common instant; latency per GET into
   ``bench/loadgen.py``'s Histogram, merged. Clusters interleave within each of ``--rounds``
   rounds; the median round (by ops/s) is shown with the range. Every process (clients and all
   nodes) shares the machine's cores: on 2 cores, 3 nodes x (router + 2 workers) + 4 clients
   oversubscribe the CPU, and the idle clusters cost a little (their agents' keepalives).
5. **sim**: how to run ``bench/cluster_sim.py`` and its line for 100 nodes (pure computation).

The report records the load average before and after every scenario. Whatever happens (an
error, Ctrl-C, SIGTERM, SIGHUP) every node is SIGKILLed as a whole tree, the client processes
are terminated and etcd is stopped (``try/finally`` and an ``atexit`` hook; etcd also dies with
this process by PR_SET_PDEATHSIG). Only a SIGKILL of this script leaves nodes behind.

The pure parts (``value_for``, ``moved_keys``, ``analyse_kill``, ``summarise_hist``,
``median_round``, ``table``) need no daemon: tests/unit/test_bench_cluster.py runs them.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib.util
import json
import multiprocessing as mp
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # a checkout runs without an install; tests.* are the harness


def _load_helper(name: str, filename: str) -> Any:
    """Another bench/ file as a module (bench/ is not a package)."""
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, HERE / filename)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


Histogram = _load_helper("shardd_bench_loadgen", "loadgen.py").Histogram

SCENARIOS = ("join", "kill", "leave", "replicas", "throughput", "sim")
CHUNK = 1000  # keys per set_many / get_many
EXIT_OK, EXIT_FAILED = 0, 1
X = "\u00d7"  # the multiplication sign, for tables


class RunError(RuntimeError):
    """A scenario could not be measured (a node died, the cluster did not settle …)."""


# --- pure helpers --------------------------------------------------------------------------------


def value_for(i: int, size: int) -> bytes:
    """The loaded value of key ``i``: its index then padding, ``size`` bytes (at least the index)."""
    head = f"{i}:".encode()
    return head + b"v" * max(0, size - len(head))


def key_for(prefix: str, i: int) -> bytes:
    return f"{prefix}{i}".encode()


def moved_keys(before: dict[str, int], after: dict[str, int]) -> tuple[int, float]:
    """Keys that left the nodes of ``before`` (their counts then minus now) and that over their total."""
    total = sum(before.values())
    moved = total - sum(after.get(node, 0) for node in before)
    return moved, (moved / total if total else 0.0)


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:,.1f}"


def secs(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds:.2f}"


def pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1%}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# An op of the paced load: (start, end, key index, is_get, outcome); outcome "hit", "miss", "ok"
# (a set) or the exception's class name.
OpRecord = tuple[float, float, int, bool, str]
GOOD = frozenset(("hit", "miss", "ok"))


def analyse_kill(ops: Sequence[OpRecord], t_kill: float, t_map: float | None, dead: Callable[[int], bool],
                 slow_s: float) -> dict[str, Any]:
    """What the paced client saw around a kill, per class of key (``dead``: owned by the victim
    before the kill; ``other``): ops from the kill on, errors by type, ops slower than
    ``slow_s``, the slowest op, the first and last trouble (error or slow op, seconds after the
    kill), the get miss rate of ops started after the map changed, and when the dead node's keys
    were first served again."""
    out: dict[str, Any] = {}
    for cls in ("dead", "other"):
        mine = [op for op in ops if dead(op[2]) == (cls == "dead")]
        during = [op for op in mine if op[1] >= t_kill]
        errors = [op for op in during if op[4] not in GOOD]
        slow = [op for op in during if op[1] - op[0] > slow_s]
        trouble = errors + slow
        after = [op for op in mine if t_map is not None and op[0] >= t_map and op[3] and op[4] in GOOD]
        misses = sum(op[4] == "miss" for op in after)
        before = [op for op in mine if op[1] < t_kill]
        served = [op[1] - t_kill for op in during if op[0] >= t_kill and op[4] in GOOD]
        late = [op for op in errors if t_map is None or op[0] >= t_map]
        window = [op for op in during if op[0] >= t_kill and (t_map is None or op[0] < t_map)]
        out[cls] = {
            "ops": len(during),
            "errors": len(errors),
            "error_types": dict(Counter(op[4] for op in errors)),
            "errors_after_map": len(late),
            "ops_in_window": len(window),
            "ok_in_window": sum(op[4] in GOOD for op in window),
            "slow": len(slow),
            "max_latency_s": max((op[1] - op[0] for op in during), default=None),
            "max_latency_before_s": max((op[1] - op[0] for op in before), default=None),
            "first_trouble_s": min((op[0] - t_kill for op in trouble), default=None),
            "last_trouble_s": max((op[1] - t_kill for op in trouble), default=None),
            "gets_after": len(after),
            "miss_rate_after": misses / len(after) if after else None,
            "first_served_s": min(served, default=None),
        }
    ends = [c["last_trouble_s"] for c in out.values() if c["last_trouble_s"] is not None]
    out["window_s"] = max(ends, default=None)
    return out


def summarise_hist(hist: Any) -> dict[str, float]:
    """p50 / p99 / max of a latency Histogram of nanoseconds, in µs."""
    return {"p50_us": hist.percentile(50) / 1000, "p99_us": hist.percentile(99) / 1000,
            "max_us": hist.max / 1000, "count": hist.count}


def median_round(runs: Sequence[dict[str, Any]], key: str = "ops_per_s") -> dict[str, Any]:
    """The run whose ``key`` is the median (the lower middle for an even count)."""
    ordered = sorted(runs, key=lambda r: r[key])
    return ordered[(len(ordered) - 1) // 2]


# --- processes: nodes, etcd, client processes -------------------------------------------------

_CLUSTERS: list[Any] = []  # every Cluster started, for the last-resort cleanup
_PROCS: list[Any] = []  # client processes


def kill_tree(node: Any) -> float:
    """SIGSTOP then SIGKILL every process of a node (supervisor first: nothing is respawned), and
    reap the supervisor: the node is gone at once, like a machine that lost power. Returns the
    time.monotonic() at which every process was stopped (the node's last answer was before)."""
    import psutil

    if node.proc is None or node.proc.poll() is not None:
        return time.monotonic()
    procs: list[Any] = []
    for _ in range(2):  # a second look catches a child forked while the first was being stopped
        try:
            tree = [psutil.Process(node.proc.pid), *psutil.Process(node.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for proc in tree:
            if proc.pid not in {p.pid for p in procs}:
                procs.append(proc)
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.suspend()
    stopped = time.monotonic()
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    node.proc.wait(10)
    # The others were re-parented when the supervisor died: whoever reaps them, dead is enough.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(proc) for proc in procs):
        time.sleep(0.01)
    return stopped


def _running(proc: Any) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def close_cluster(cluster: Any) -> None:
    for node in cluster.nodes:
        with contextlib.suppress(Exception):
            kill_tree(node)
        log = getattr(node, "_log", None)
        if log is not None:
            log.close()
    with contextlib.suppress(ValueError):
        _CLUSTERS.remove(cluster)


def stop_all() -> None:
    """Last resort (atexit): kill every node and client process still running."""
    for proc in list(_PROCS):
        with contextlib.suppress(Exception):
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    for cluster in list(_CLUSTERS):
        close_cluster(cluster)


@contextlib.contextmanager
def cluster_up(args: argparse.Namespace, nodes: int, shards: int | None = None, replicas: int = 0) -> Iterator[Any]:
    """A fresh etcd and ``nodes`` nodes (started together), settled; everything killed after."""
    from tests.cluster_harness import Cluster
    from tests.etcd_server import running_etcd

    with running_etcd() as etcd, tempfile.TemporaryDirectory(prefix="shardd-cbench-") as tmp:
        cluster = Cluster(Path(tmp), etcd.endpoint, ttl=args.ttl, shards=shards or args.shards, leave_timeout=60,
                          replicas=replicas)
        cluster.etcd_server = etcd
        _CLUSTERS.append(cluster)
        try:
            started = [cluster.add(wait=False) for _ in range(nodes)]
            for node in started:
                node.wait_ready()
            settle(cluster)
            yield cluster
        finally:
            close_cluster(cluster)


def settle(cluster: Any, nodes: list[Any] | None = None, timeout: float = 120.0) -> Any:
    try:
        return cluster.settled(nodes, timeout=timeout)
    except AssertionError as exc:
        raise RunError(str(exc)[:3000]) from None


def seeds(cluster: Any) -> list[str]:
    return [node.endpoint for node in cluster.live]


def preload(seed_list: list[str], n: int, value_size: int, prefix: str = "k") -> float:
    """``n`` keys ``<prefix><i>`` = value_for(i) via set_many of CHUNK; returns the seconds taken."""
    from shardd import ClusterClient

    start = time.monotonic()
    with ClusterClient(seed_list, timeout=10.0) as client:
        for at in range(0, n, CHUNK):
            client.set_many([(key_for(prefix, i), value_for(i, value_size)) for i in range(at, min(n, at + CHUNK))])
    return time.monotonic() - start


def verify(seed_list: list[str], expected: dict[bytes, bytes]) -> tuple[int, int]:
    """(missing, wrong) of ``expected`` read back with get_many."""
    from shardd import ClusterClient

    missing = wrong = 0
    keys = list(expected)
    with ClusterClient(seed_list, timeout=10.0) as client:
        for at in range(0, len(keys), CHUNK):
            part = keys[at:at + CHUNK]
            got = client.get_many(part)
            for key in part:
                value = got.get(key)
                if value is None:
                    missing += 1
                elif value != expected[key]:
                    wrong += 1
    return missing, wrong


def node_map(client: Any) -> Any:
    """The map a node has installed, through an open Client (None: none, or no answer)."""
    from shardd.errors import SharddError
    from shardd.slots import SlotMap

    try:
        raw = (client.topology().get("cluster") or {}).get("map")
    except SharddError:
        return None
    return SlotMap.from_wire(raw) if raw is not None else None


def is_controller(node: Any) -> bool:
    return "this node is the cluster controller now" in node.log()


# --- client threads ------------------------------------------------------------------------------


class SetGetTraffic:
    """A closed-loop client thread: set then get of its own keys; every acknowledged value kept,
    errors and stale reads counted, the slowest op timed. ``mark()`` returns counters so a
    window's share can be taken by difference."""

    def __init__(self, seed_list: list[str], prefix: str, keys: int, failover_timeout: float = 30.0) -> None:
        self.seeds, self.prefix, self.keys, self.failover = seed_list, prefix, keys, failover_timeout
        self.acked: dict[bytes, bytes] = {}
        self.ops = self.errors = self.stale = 0
        self.error_types: Counter[str] = Counter()
        self.max_latency = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"traffic-{prefix}", daemon=True)
        self.failure: BaseException | None = None

    def __enter__(self) -> SetGetTraffic:
        self._thread.start()
        deadline = time.monotonic() + 30
        while self.ops < 20:
            if self.failure is not None or time.monotonic() > deadline:
                raise RunError(f"the client thread did not start: {self.failure!r}")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def mark(self) -> dict[str, Any]:
        window = {"ops": self.ops, "errors": self.errors, "stale": self.stale, "max_latency_s": self.max_latency}
        self.max_latency = 0.0  # the slowest op is per window
        return window

    def _run(self) -> None:
        from shardd import ClusterClient
        from shardd.errors import SharddError

        try:
            with ClusterClient(self.seeds, timeout=5.0, failover_timeout=self.failover) as client:
                i = 0
                while not self._stop.is_set():
                    key = key_for(self.prefix, i % self.keys)
                    value = f"v{i}".encode()
                    start = time.monotonic()
                    try:
                        client.set(key, value)
                        self.acked[key] = value
                        if client.get(key) != value:
                            self.stale += 1
                    except SharddError as exc:
                        self.errors += 1
                        self.error_types[type(exc).__name__] += 1
                    self.max_latency = max(self.max_latency, time.monotonic() - start)
                    self.ops += 1
                    i += 1
        except BaseException as exc:  # reported by __enter__ / the scenario
            self.failure = exc


class PacedLoad:
    """Client threads, a ClusterClient each, sending ``rate`` ops/s together on a fixed schedule (a
    late op goes at once, none is skipped): gets of uniform keys among a group of loaded keys
    (indexes), and sets (``1 - get_ratio``) of new values; every op recorded as an OpRecord.
    ``threads`` threads per group, each group's share of the rate in proportion to its keys.
    The groups are the keys of each node: a thread stuck on a dead node's key then holds up only
    the schedule of that node's keys, as separate clients of separate users would."""

    def __init__(self, seed_list: list[str], prefix: str, groups: list[list[int]], rate: float, get_ratio: float,
                 timeout: float, failover_timeout: float, threads: int = 2, seed: int = 1) -> None:
        self.seeds, self.prefix, self.rate = seed_list, prefix, rate
        self.get_ratio, self.timeout, self.failover = get_ratio, timeout, failover_timeout
        self.records: list[OpRecord] = []
        self.failure: BaseException | None = None
        self._ready = threading.Semaphore(0)
        self._stop = threading.Event()
        self._go = threading.Event()
        self._t0 = 0.0
        total = sum(len(group) for group in groups)
        plans = [(group, rate * len(group) / total / threads, k)
                 for group in groups if group for k in range(threads)]
        self._threads = [threading.Thread(target=self._run, args=(group, per_thread, k / threads,
                                                                  random.Random(seed * 1000 + n)),
                                          name=f"paced-{n}", daemon=True)
                         for n, (group, per_thread, k) in enumerate(plans)]

    def __enter__(self) -> PacedLoad:
        for thread in self._threads:
            thread.start()
        for _ in self._threads:
            if not self._ready.acquire(timeout=30) or self.failure is not None:
                self._stop.set()
                self._go.set()
                raise RunError(f"the paced client did not start: {self.failure!r}")
        self._t0 = time.monotonic()
        self._go.set()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._go.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self, group: list[int], rate: float, phase: float, rng: random.Random) -> None:
        from shardd import ClusterClient
        from shardd.errors import SharddError

        records, interval = self.records, 1.0 / rate
        try:
            with ClusterClient(self.seeds, timeout=self.timeout, failover_timeout=self.failover) as client:
                client.get(key_for(self.prefix, group[0]))  # the map, and a connection to the node
                self._ready.release()
                self._go.wait()
                t0 = self._t0 + phase * interval
                i = 0
                while not self._stop.is_set():
                    delay = t0 + i * interval - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    index = rng.choice(group)
                    key = key_for(self.prefix, index)
                    is_get = rng.random() < self.get_ratio
                    start = time.monotonic()
                    try:
                        if is_get:
                            outcome = "hit" if client.get(key) is not None else "miss"
                        else:
                            client.set(key, b"w%d" % i)
                            outcome = "ok"
                    except SharddError as exc:
                        outcome = type(exc).__name__
                    records.append((start, time.monotonic(), index, is_get, outcome))
                    i += 1
        except BaseException as exc:
            self.failure = exc
            self._ready.release()


# --- 1. join --------------------------------------------------------------------------------------


def run_join(args: argparse.Namespace) -> dict[str, Any]:
    from shardd.slots import moved_fraction, owner_ids

    rows = []
    with cluster_up(args, 1) as cluster:
        first = cluster.nodes[0]
        load_s = preload([first.endpoint], args.keys, args.value_size)
        expected_total = args.keys
        with SetGetTraffic([first.endpoint], "t", 300) as traffic:
            old_map = settle(cluster)
            for n in range(2, args.join_nodes + 1):
                before = cluster.keys_per_node()
                traffic.mark()
                start = time.monotonic()
                node = cluster.add(wait=False)
                node.wait_ready(timeout=120)
                ready = time.monotonic() - start
                new_map = settle(cluster)
                took = time.monotonic() - start
                window = traffic.mark()
                after = cluster.keys_per_node()
                moved, frac = moved_keys(before, after)
                rows.append({
                    "nodes": f"{n - 1}→{n}", "keys_before": sum(before.values()), "moved": moved,
                    "moved_fraction": frac, "ideal": 1 / n,
                    "new_node_share": after.get(node.endpoint, 0) / max(1, sum(after.values())),
                    "slots_moved": moved_fraction(owner_ids(old_map), owner_ids(new_map)),
                    "ready_s": ready, "settled_s": took, "epoch": new_map.epoch,
                    "client_ops": window["ops"], "client_errors": window["errors"],
                    "client_stale": window["stale"], "client_max_s": window["max_latency_s"],
                    "load": loadavg(),
                })
                print(f"cluster: join {n - 1}→{n}: {moved:,} keys moved ({frac:.3f}, ideal {1 / n:.3f}), "
                      f"settled in {took:.2f} s [load {loadavg()}]", file=sys.stderr)
                old_map = new_map
        # the thread has stopped: what it acknowledged last is final now
        acked = dict(traffic.acked)
        totals = {"ops": traffic.ops, "errors": traffic.errors, "stale": traffic.stale,
                  "error_types": dict(traffic.error_types)}
        if traffic.failure is not None:
            raise RunError(f"join: the client thread failed: {traffic.failure!r}")
        expected = {key_for("k", i): value_for(i, args.value_size) for i in range(expected_total)}
        missing, wrong = verify(seeds(cluster), expected)
        acked_missing, acked_wrong = verify(seeds(cluster), acked)
        counts = cluster.keys_per_node()
    return {"rows": rows, "load_s": load_s, "keys": args.keys, "missing": missing, "wrong": wrong,
            "acked": len(acked), "acked_missing": acked_missing, "acked_wrong": acked_wrong,
            "traffic": totals, "final_counts": list(counts.values())}


def format_join(r: dict[str, Any]) -> str:
    rows = [[x["nodes"], f"{x['keys_before']:,}", f"{x['moved']:,}", f"{x['moved_fraction']:.3f}",
             f"{x['ideal']:.3f}", f"{x['slots_moved']:.3f}", secs(x["ready_s"]), secs(x["settled_s"]),
             f"{x['client_ops']:,}", x["client_errors"], x["client_stale"], ms(x["client_max_s"]), x["load"]]
            for x in r["rows"]]
    counts = r["final_counts"]
    mean = sum(counts) / len(counts) if counts else 0
    return "\n".join([
        f"Join: {r['keys']:,} keys loaded into 1 node in {r['load_s']:.1f} s "
        f"({r['keys'] / max(r['load_s'], 1e-9):,.0f} keys/s, set_many of {CHUNK}); a client thread doing "
        "set+get of 300 keys ran through every join (closed loop).",
        "",
        table(["join", "keys held", "keys moved", "moved fraction", "ideal 1/(N+1)", "slots moved",
               "start→ready s", "start→settled s", "client ops", "errors", "stale reads", "slowest op ms",
               "load 1/5/15"], rows),
        "",
        f"After the last join: {r['keys'] - r['missing'] - r['wrong']:,} of {r['keys']:,} loaded keys read back "
        f"with their value ({r['missing']} missing, {r['wrong']} wrong); the client's {r['acked']} keys: "
        f"{r['acked_missing']} missing, {r['acked_wrong']} not their last acknowledged value. Client in total: "
        f"{r['traffic']['ops']:,} ops, {r['traffic']['errors']} errors"
        f"{' ' + str(r['traffic']['error_types']) if r['traffic']['error_types'] else ''}, "
        f"{r['traffic']['stale']} stale reads. Keys per node: {', '.join(f'{c:,}' for c in counts)} "
        f"(max/mean {max(counts) / mean if mean else 0:.3f}).",
    ])


# --- 2. kill --------------------------------------------------------------------------------------


def run_kill_once(args: argparse.Namespace, victim_role: str, failover: float) -> dict[str, Any]:
    from shardd.client import Client
    from shardd.slots import slot_of

    with cluster_up(args, 3) as cluster:
        smap = settle(cluster)
        preload(seeds(cluster), args.data_keys, args.value_size, prefix="d")
        controllers = [node for node in cluster.nodes if is_controller(node)]
        if victim_role == "controller":
            victim = controllers[0] if controllers else cluster.nodes[0]
        else:
            victim = next(node for node in reversed(cluster.nodes) if node not in controllers)
        survivors = [node for node in cluster.nodes if node is not victim]
        owners = [smap.nodes[smap.owners[slot_of(key_for("d", i))]].id for i in range(args.data_keys)]
        dead_keys = {i for i, owner in enumerate(owners) if owner == victim.endpoint}
        groups = [[i for i, owner in enumerate(owners) if owner == node.endpoint] for node in cluster.nodes]
        load = PacedLoad([survivors[0].endpoint], "d", groups, args.rate, args.get_ratio,
                         args.client_timeout, failover, threads=args.threads)
        t_map = t_settled = None
        with load, Client(survivors[0].endpoint, timeout=1.0) as probe:
            time.sleep(args.before)
            t_kill = kill_tree(victim)
            deadline = t_kill + 120
            while t_map is None:
                m = node_map(probe)
                if m is not None and victim.endpoint not in {n.id for n in m.nodes}:
                    t_map = time.monotonic()
                elif time.monotonic() > deadline:
                    raise RunError(f"kill: the map still names {victim.endpoint} 120 s after the kill")
                else:
                    time.sleep(0.01)
            settle(cluster, survivors)
            t_settled = time.monotonic()
            time.sleep(args.after)
        if load.failure is not None:
            raise RunError(f"kill: the paced client failed: {load.failure!r}")
        records = list(load.records)
        report = analyse_kill(records, t_kill, t_map, dead_keys.__contains__, args.slow_ms / 1000)
        # the sweep: every loaded key once more, by class
        from shardd import ClusterClient

        present: set[int] = set()
        with ClusterClient(seeds(cluster), timeout=10.0) as client:
            for at in range(0, args.data_keys, CHUNK):
                part = [key_for("d", i) for i in range(at, min(args.data_keys, at + CHUNK))]
                got = client.get_many(part)
                present.update(at + j for j, key in enumerate(part) if got.get(key) is not None)
        rewritten = {op[2] for op in records if not op[3] and op[4] == "ok" and op[0] >= t_kill}
        n_dead = len(dead_keys)
        n_other = args.data_keys - n_dead
    run_s = (max(op[1] for op in records) - min(op[0] for op in records)) if records else 0.0
    return {
        "victim": victim_role, "failover_timeout": failover, "ttl": args.ttl, "dead_keys": n_dead,
        "map_s": t_map - t_kill, "settled_s": t_settled - t_kill,
        "ops": len(records), "achieved_rate": len(records) / run_s if run_s else 0.0,
        "client": report,
        "sweep_dead_missing": sum(1 for i in dead_keys if i not in present) / n_dead if n_dead else None,
        "sweep_dead_rewritten": len(rewritten & dead_keys),
        "sweep_other_missing": sum(1 for i in range(args.data_keys) if i not in dead_keys and i not in present)
        / n_other if n_other else None,
        "load": loadavg(),
    }


KILL_VARIANTS = (("member", None), ("member", 0.5), ("controller", None))


def run_kill(args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for victim, failover in KILL_VARIANTS:
        for r in range(args.repeat):
            f = args.failover if failover is None else failover
            run = run_kill_once(args, victim, f)
            run["round"] = r + 1
            runs.append(run)
            c = run["client"]
            print(f"cluster: kill {victim}, failover_timeout {f:g}: map changed after {run['map_s']:.2f} s, "
                  f"errors {c['dead']['errors']}/{c['other']['errors']} (dead/other) [load {loadavg()}]",
                  file=sys.stderr)
    return {"runs": runs, "rate": args.rate, "threads": args.threads, "get_ratio": args.get_ratio,
            "data_keys": args.data_keys, "client_timeout": args.client_timeout, "slow_ms": args.slow_ms,
            "ttl": args.ttl, "after": args.after}


def format_kill(r: dict[str, Any]) -> str:
    ttl = r["ttl"]
    timing, client = [], []
    for x in r["runs"]:
        c, d, o = x["client"], x["client"]["dead"], x["client"]["other"]
        name = f"{x['victim']} #{x['round']}"
        timing.append([name, f"{x['failover_timeout']:g}", ttl, secs(x["map_s"]),
                       "yes" if x["map_s"] <= ttl + 1 else "**no**", secs(x["settled_s"]),
                       secs(c["window_s"]), secs(d["first_served_s"]), f"{x['ops']:,}",
                       f"{x['achieved_rate']:,.0f}", x["load"]])
        types = ", ".join(f"{k} {v}" for k, v in {**d["error_types"], **o["error_types"]}.items())
        client.append([name, f"{x['failover_timeout']:g}", f"{x['dead_keys']:,}",
                       f"{d['ok_in_window']:,} of {d['ops_in_window']:,} / {o['ok_in_window']:,} of "
                       f"{o['ops_in_window']:,}",
                       f"{d['errors']} / {o['errors']}" + (f" ({types})" if types else ""),
                       d["errors_after_map"] + o["errors_after_map"],
                       f"{d['slow']} / {o['slow']}", f"{ms(d['max_latency_s'])} / {ms(o['max_latency_s'])}",
                       f"{ms(d['max_latency_before_s'])} / {ms(o['max_latency_before_s'])}",
                       f"{pct(d['miss_rate_after'])} / {pct(o['miss_rate_after'])}",
                       f"{pct(x['sweep_dead_missing'])} / {pct(x['sweep_other_missing'])}"])
    return "\n".join([
        f"SIGKILL of one of 3 nodes (its whole process tree, stopped then killed) under a paced load: "
        f"{r['threads']} client threads per node's keys (a ClusterClient each) offering {r['rate']:,.0f} ops/s "
        "together, "
        f"{r['get_ratio']:.0%} gets, uniform over {r['data_keys']:,} loaded keys, client timeout "
        f"{r['client_timeout']:g} s; lease TTL {ttl} s (target: map changed ≤ TTL + 1 = {ttl + 1} s). "
        f"Times in seconds from the kill; 'served again': the first op on a dead node's key that started "
        f"after the kill and succeeded; the load ran {r['after']:g} s past the settle.",
        "",
        table(["victim", "failover_timeout s", "lease TTL s", "kill→map changed", "≤ TTL+1", "kill→settled",
               "client trouble window", "dead keys served again", "client ops", "ops/s achieved", "load 1/5/15"],
              timing),
        "",
        f"Per class of key (owner before the kill): dead node's / others'. Slow: an op over {r['slow_ms']:g} ms. "
        "Miss rate: gets started after the map changed. Sweep: every loaded key read once after the run "
        "(the dead node's keys come back only where the load rewrote them).",
        "",
        table(["victim", "failover_timeout s", "dead node's keys", "ops served / started between kill and map change",
               "errors", "errors after the map changed",
               "slow ops", "slowest op ms (from kill)",
               "slowest op ms (before)", "get miss rate after", "sweep: keys missing"], client),
    ])


# --- 3. leave -------------------------------------------------------------------------------------


def run_leave_once(args: argparse.Namespace, role: str) -> dict[str, Any]:
    from shardd.client import Client

    with cluster_up(args, 3) as cluster:
        preload(seeds(cluster), args.data_keys, args.value_size, prefix="d")
        controllers = [node for node in cluster.nodes if is_controller(node)]
        if role == "controller":
            leaving = controllers[0] if controllers else cluster.nodes[0]
        else:
            leaving = next(node for node in reversed(cluster.nodes) if node not in controllers)
        survivors = [node for node in cluster.nodes if node is not leaving]
        held = cluster.keys_per_node()[leaving.endpoint]
        controller = is_controller(leaving)
        with SetGetTraffic([survivors[0].endpoint], "w", 1000) as traffic, \
                Client(survivors[0].endpoint, timeout=1.0) as probe:
            time.sleep(args.before)
            traffic.mark()
            kids = leaving.children()
            t_term = time.monotonic()
            leaving.proc.send_signal(signal.SIGTERM)
            t_exit = t_map = None
            deadline = t_term + 180
            while t_exit is None or t_map is None:
                now = time.monotonic()
                if t_exit is None and leaving.proc.poll() is not None:
                    t_exit = now
                if t_map is None:
                    m = node_map(probe)
                    if m is not None and leaving.endpoint not in {n.id for n in m.nodes}:
                        t_map = time.monotonic()
                if now > deadline:
                    raise RunError(f"leave: not done 180 s after SIGTERM (exit {t_exit}, map {t_map}):\n"
                                   f"{leaving.log()[-3000:]}")
                time.sleep(0.01)
            settle(cluster, survivors)
            t_settled = time.monotonic()
            time.sleep(args.after)
            window = traffic.mark()
        if traffic.failure is not None:
            raise RunError(f"leave: the writer failed: {traffic.failure!r}")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_running(kid) for kid in kids):
            time.sleep(0.01)
        leftover = [kid.pid for kid in kids if _running(kid)]
        code = leaving.proc.returncode
        expected = {key_for("d", i): value_for(i, args.value_size) for i in range(args.data_keys)}
        missing, wrong = verify(seeds(cluster), expected)
        acked_missing, acked_wrong = verify(seeds(cluster), dict(traffic.acked))
        left_logged = "left the cluster" in leaving.log()
    return {"keys": args.data_keys, "held": held, "controller": controller, "exit_code": code,
            "exit_s": t_exit - t_term, "map_s": t_map - t_term, "settled_s": t_settled - t_term,
            "ops": window["ops"], "errors": window["errors"], "error_types": dict(traffic.error_types),
            "stale": window["stale"], "max_latency_s": window["max_latency_s"], "acked": len(traffic.acked),
            "acked_lost": acked_missing + acked_wrong, "loaded_lost": missing + wrong, "leftover": leftover,
            "left_logged": left_logged, "load": loadavg()}


def run_leave(args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for role in ("member", "controller"):
        run = run_leave_once(args, role)
        runs.append(run)
        print(f"cluster: leave {role}: map without it after {run['map_s']:.2f} s, {run['errors']} errors, "
              f"{run['acked_lost']} acked writes lost [load {loadavg()}]", file=sys.stderr)
    return {"runs": runs, "keys": args.data_keys}


def format_leave(r: dict[str, Any]) -> str:
    return "\n".join([
        f"Graceful leave: SIGTERM to one of 3 nodes holding {r['keys']:,} loaded keys in all (a member, then in a "
        "fresh cluster the controller), while a writer thread (closed loop, set then get of its own 1000 keys "
        "through a survivor) runs; seconds from the SIGTERM. Lost: acknowledged values not read back as last "
        "written, after the leave.",
        "",
        table(["leaving", "its keys", "exit code", "SIGTERM→map without it", "SIGTERM→exit", "SIGTERM→settled",
               "writer ops", "errors", "stale reads", "slowest op ms", "acked writes lost", "loaded keys lost",
               "processes left", "load 1/5/15"], [leave_row(x) for x in r["runs"]]),
    ])


def leave_row(r: dict[str, Any]) -> list[object]:
    return ["controller" if r["controller"] else "member", f"{r['held']:,}",
            f"{r['exit_code']}" + ("" if r["left_logged"] else " (no 'left the cluster' logged)"), secs(r["map_s"]),
            secs(r["exit_s"]), secs(r["settled_s"]), f"{r['ops']:,}",
            f"{r['errors']}" + (f" {r['error_types']}" if r["error_types"] else ""), r["stale"],
            ms(r["max_latency_s"]), f"{r['acked_lost']} of {r['acked']:,}", f"{r['loaded_lost']} of {r['keys']:,}",
            len(r["leftover"]), r["load"]]


# --- 4. throughput --------------------------------------------------------------------------------


class SequenceWriter:
    """One thread writing ``w<i % keys>`` = its sequence number as fast as it can (replicas run):
    for every key, the last acknowledged sequence number and when it was acknowledged."""

    def __init__(self, seed_list: list[str], keys: int) -> None:
        self.seeds, self.keys = seed_list, keys
        self.history: list[tuple[bytes, int, float]] = []  # (key, seq, acknowledged at)
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sequence-writer", daemon=True)

    def __enter__(self) -> SequenceWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._thread.join(60)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        from shardd import ClusterClient
        from shardd.errors import SharddError

        with ClusterClient(self.seeds, timeout=2.0, failover_timeout=30.0) as client:
            seq = 0
            while not self._stop.is_set():
                key = key_for("w", seq % self.keys)
                try:
                    client.set(key, str(seq).encode())
                    self.history.append((key, seq, time.monotonic()))
                except SharddError:
                    self.errors += 1
                seq += 1


def run_replicas(args: argparse.Namespace) -> dict[str, Any]:
    """replicas = 1: SIGKILL a node under a writer; which acknowledged writes its keys lost."""
    from shardd import ClusterClient
    from shardd.slots import slot_of

    runs = []
    for _ in range(args.repeat):
        with cluster_up(args, 3, replicas=1) as cluster:
            smap = settle(cluster)
            preload(seeds(cluster), args.data_keys, args.value_size, prefix="d")
            deadline = time.monotonic() + 120
            while sum(cluster.keys_per_node().values()) < 2 * args.data_keys:  # owner + replica
                if time.monotonic() > deadline:
                    raise RunError("replicas: the loaded keys never reached their replicas")
                time.sleep(0.05)
            controllers = [node for node in cluster.nodes if is_controller(node)]
            victim = next(node for node in reversed(cluster.nodes) if node not in controllers)
            survivors = [node for node in cluster.nodes if node is not victim]
            owner = {smap.nodes[i].id for i in range(len(smap.nodes))}
            assert victim.endpoint in owner
            with SequenceWriter([survivors[0].endpoint], args.data_keys // 10) as writer:
                time.sleep(args.before)
                t_kill = kill_tree(victim)
                writer.stop()  # no write after the kill may hide a lost one
                settle(cluster, survivors)
            # the last write acknowledged before the kill, per key; keys written again after it are
            # left out (the op in flight at the kill is retried on the new owner)
            acked: dict[bytes, tuple[int, float]] = {}
            after_kill = set()
            for key, seq, at in writer.history:
                if at <= t_kill:
                    acked[key] = (seq, at)
                else:
                    after_kill.add(key)
            for key in after_kill:
                acked.pop(key, None)
            with ClusterClient(seeds(cluster), timeout=10.0) as client:
                loaded = [key_for("d", i) for i in range(args.data_keys)]
                got = {}
                for at in range(0, len(loaded), CHUNK):
                    got.update(client.get_many(loaded[at:at + CHUNK]))
                now = client.get_many(list(acked))
        dead = {key for key in loaded if smap.nodes[smap.owners[slot_of(key)]].id == victim.endpoint}
        dead_w = {key for key in acked if smap.nodes[smap.owners[slot_of(key)]].id == victim.endpoint}
        lost = []  # acknowledged writes (to the dead node's keys) that did not survive
        for key in dead_w:
            seq, at = acked[key]
            value = now.get(key)
            if value is None or int(value) < seq:
                lost.append(t_kill - at)
        before_kill = [t_kill - at for key, (seq, at) in acked.items() if key in dead_w]
        runs.append({
            "dead_loaded": len(dead), "dead_loaded_missing": sum(1 for key in dead if got.get(key) is None),
            "other_loaded_missing": sum(1 for key in loaded if key not in dead and got.get(key) is None),
            "writes_keys_dead": len(dead_w), "acked_lost": len(lost),
            "lost_window_ms": max(lost) * 1000 if lost else 0.0,
            "newest_ack_before_kill_ms": min(before_kill) * 1000 if before_kill else None,
            "writer_errors": writer.errors, "load": loadavg(),
        })
    return {"ttl": args.ttl, "runs": runs}


def format_replicas(r: dict[str, Any]) -> str:
    rows = [[i + 1, run["dead_loaded"], run["dead_loaded_missing"], run["other_loaded_missing"],
             run["writes_keys_dead"], run["acked_lost"], f"{run['lost_window_ms']:.1f}",
             ms(run["newest_ack_before_kill_ms"] / 1000 if run["newest_ack_before_kill_ms"] is not None else None),
             run["writer_errors"], run["load"]] for i, run in enumerate(r["runs"])]
    return "\n".join([
        f"### Replicas: SIGKILL one of 3 nodes with cluster_replicas = 1 (lease TTL {r['ttl']} s)",
        "",
        "Loaded keys wait until every one is on two nodes; then a writer sets keys as fast as it can",
        "(sequence numbers) and one node is killed. A write is lost if its key reads back older.",
        "",
        table(["run", "dead node's loaded keys", "missing after", "others missing",
               "written keys on dead node", "acked writes lost", "oldest lost ack before kill ms",
               "newest ack before kill ms", "writer errors", "load"], rows),
    ])


def _tp_client(seed_list: list[str], keys: int, warmup: float, duration: float, seed: int, go: Any,
               start_at: Any, results: Any) -> None:
    """A spawned client process: sync GETs of uniform keys from a common instant; one result dict."""
    from shardd import ClusterClient
    from shardd.errors import SharddError

    rng = random.Random(seed)
    plan = [key_for("p", rng.randrange(keys)) for _ in range(100_000)]
    hist = Histogram()
    ops = errors = misses = 0
    try:
        with ClusterClient(seed_list, timeout=5.0, failover_timeout=10.0) as client:
            client.get(plan[0])  # connect and learn the map
            for key in plan[:64]:
                client.get(key)  # a connection to every node
            results.put(("ready", seed))
            if not go.wait(120):
                results.put(("error", seed, "no start signal"))
                return
            begin = start_at.value
            measure_from = begin + int(warmup * 1e9)
            end = measure_from + int(duration * 1e9)
            while time.perf_counter_ns() < begin:
                time.sleep(0.0005)
            clock, get, record = time.perf_counter_ns, client.get, hist.record
            i, n = 0, len(plan)
            while True:
                t0 = clock()
                if t0 >= end:
                    break
                try:
                    value = get(plan[i % n])
                except SharddError:
                    if t0 >= measure_from:
                        errors += 1
                else:
                    if t0 >= measure_from:
                        record(clock() - t0)
                        ops += 1
                        misses += value is None
                i += 1
        results.put(("done", seed, {"ops": ops, "errors": errors, "misses": misses, "counts": hist.counts,
                                    "count": hist.count, "total": hist.total, "min": hist.min, "max": hist.max}))
    except BaseException as exc:  # reported, not raised: the parent decides
        results.put(("error", seed, repr(exc)))


def measure_throughput(args: argparse.Namespace, seed_list: list[str], round_no: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    go, start_at, results = ctx.Event(), ctx.Value("q", 0), ctx.Queue()
    procs = [ctx.Process(target=_tp_client, args=(seed_list, args.tp_keys, args.warmup, args.duration,
                                                  1000 * round_no + i, go, start_at, results), daemon=True)
             for i in range(args.procs)]
    _PROCS.extend(procs)
    try:
        for proc in procs:
            proc.start()
        ready = 0
        while ready < len(procs):
            msg = results.get(timeout=120)
            if msg[0] != "ready":
                raise RunError(f"throughput: a client process failed: {msg}")
            ready += 1
        start_at.value = time.perf_counter_ns() + 100_000_000
        go.set()
        hist, ops, errors, misses = Histogram(), 0, 0, 0
        for _ in procs:
            msg = results.get(timeout=args.warmup + args.duration + 120)
            if msg[0] != "done":
                raise RunError(f"throughput: a client process failed: {msg}")
            part = Histogram()
            part.counts, part.count, part.total, part.min, part.max = (
                msg[2]["counts"], msg[2]["count"], msg[2]["total"], msg[2]["min"], msg[2]["max"])
            hist.merge(part)
            ops += msg[2]["ops"]
            errors += msg[2]["errors"]
            misses += msg[2]["misses"]
        for proc in procs:
            proc.join(30)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
            _PROCS.remove(proc)
    return {"ops": ops, "ops_per_s": ops / args.duration, "errors": errors, "misses": misses,
            **summarise_hist(hist), "load": loadavg()}


def run_throughput(args: argparse.Namespace) -> dict[str, Any]:
    configs = [(f"1 node {X} {args.shards} shards", 1, args.shards),
               (f"3 nodes {X} {args.shards} shards", 3, args.shards),
               (f"3 nodes {X} 1 shard", 3, 1)]
    if args.shards == 1:
        configs = configs[:2]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in configs}
    with contextlib.ExitStack() as stack:
        clusters = {}
        for name, nodes, shards in configs:
            cluster = stack.enter_context(cluster_up(args, nodes, shards))
            preload(seeds(cluster), args.tp_keys, 100, prefix="p")
            clusters[name] = cluster
        for round_no in range(args.rounds):
            for name, _, _ in configs:
                run = measure_throughput(args, seeds(clusters[name]), round_no)
                runs[name].append(run)
                print(f"cluster: throughput round {round_no + 1}/{args.rounds}, {name}: {run['ops_per_s']:,.0f} "
                      f"GET/s, p50 {run['p50_us']:.0f} µs [load {loadavg()}]", file=sys.stderr)
                if any(not node.proc or node.proc.poll() is not None for node in clusters[name].nodes):
                    raise RunError(f"throughput: a node of {name} died")
    rows = []
    for name, nodes, shards in configs:
        med = median_round(runs[name])
        rows.append({"config": name, "nodes": nodes, "shards": shards, "busy_procs": nodes * (1 + shards),
                     "rounds": [r["ops_per_s"] for r in runs[name]], **med})
    return {"rows": rows, "procs": args.procs, "duration": args.duration, "warmup": args.warmup,
            "keys": args.tp_keys, "cores": os.cpu_count()}


def format_throughput(r: dict[str, Any]) -> str:
    base = r["rows"][0]["ops_per_s"] or 1
    rows = [[x["config"], x["busy_procs"], r["procs"], f"{x['ops_per_s']:,.0f}", f"{x['ops_per_s'] / base:.2f}{X}",
             f"{x['p50_us']:,.0f}", f"{x['p99_us']:,.0f}", ", ".join(f"{v:,.0f}" for v in x["rounds"]),
             x["errors"], x["misses"], x["load"]] for x in r["rows"]]
    over = max(x["busy_procs"] for x in r["rows"]) + r["procs"]
    return "\n".join([
        f"Throughput: {r['procs']} client processes, each a ClusterClient doing sync GETs of uniform keys "
        f"({r['keys']:,} keys of 100 B, every GET hits), {r['warmup']:g} s warm-up + {r['duration']:g} s measured; "
        "the clusters run side by side and interleave within each round; the median round is shown. "
        f"Busy server processes = nodes {X} (router + workers). On {r['cores']} cores the 3-node rows run up to "
        f"{over} busy processes with the clients: the CPU is oversubscribed, so this measures the cost of the "
        "extra hops and processes on one machine, not scaling across machines.",
        "",
        table(["cluster", "busy server procs", "client procs", "GET/s", f"{X} 1 node", "p50 µs", "p99 µs",
               "GET/s per round", "errors", "misses", "load 1/5/15"], rows),
    ])


# --- 5. simulation --------------------------------------------------------------------------------


def run_sim(args: argparse.Namespace) -> dict[str, Any]:
    sim = _load_helper("shardd_bench_cluster_sim", "cluster_sim.py")
    start = time.monotonic()
    row = sim.simulate(100, 3, 1, [], 2)
    return {"row": row, "seconds": time.monotonic() - start}


def format_sim(r: dict[str, Any]) -> str:
    x = r["row"]
    return "\n".join([
        "100-node placement (pure computation, shardd.slots; full table: `python bench/cluster_sim.py`, "
        "or `python bench/cluster_sim.py --sizes 100 --keys 100000 --random-ids 50`):",
        "",
        f"N=100: add moves {x['add_mean']:.4f} of slots (max {x['add_max']:.4f}, ideal 1/(N+1) "
        f"{x['add_ideal']:.4f}, only to the new node: {'yes' if x['only_new'] else 'NO'}); the largest node's "
        f"leave moves {x['leave']:.4f} (1/N {x['leave_ideal']:.4f}, only its own: "
        f"{'yes' if x['only_own'] else 'NO'}); slots max/mean {x['slots']:.3f}; map computed in "
        f"{x['ms']:.0f} ms ({r['seconds']:.1f} s for this line).",
    ])


# --- the run --------------------------------------------------------------------------------------


def environment() -> dict[str, str]:
    def out(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    cpu = next((line.split(":", 1)[1].strip() for line in out(["lscpu"]).splitlines()
                if line.startswith("Model name:")), platform.processor() or "unknown")
    commit = out(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = out(["git", "-C", str(REPO), "status", "--porcelain", "--", "shardd"])
    etcd = out(["etcd", "--version"]).splitlines()
    return {"cpu": cpu, "cores": str(os.cpu_count()), "kernel": platform.release(),
            "python": platform.python_version(), "etcd": etcd[0].split()[-1] if etcd else "?",
            "shardd": commit + (" + shardd/ modified" if dirty else "")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="shardd cluster mode on one machine (see bench/README.md).")
    ap.add_argument("--only", default=",".join(SCENARIOS),
                    help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)")
    ap.add_argument("--keys", type=int, default=100_000, help="join: keys loaded into the first node")
    ap.add_argument("--join-nodes", type=int, default=4, help="join: nodes at the end")
    ap.add_argument("--value-size", type=int, default=100, help="bytes per loaded value (join, kill, leave)")
    ap.add_argument("--ttl", type=int, default=3, help="cluster_lease_ttl of every node, seconds (min 2)")
    ap.add_argument("--shards", type=int, default=2, help="shards per node")
    ap.add_argument("--data-keys", type=int, default=10_000, help="kill, leave: keys loaded over the 3 nodes")
    ap.add_argument("--rate", type=float, default=1000, help="kill: ops/s offered by the paced client")
    ap.add_argument("--threads", type=int, default=2,
                    help="kill: client threads per node's keys, sharing --rate")
    ap.add_argument("--get-ratio", type=float, default=0.8, help="kill: share of gets (the rest are sets)")
    ap.add_argument("--failover", type=float, default=30.0,
                    help="kill: the client's failover_timeout in the ride-it-out variants (the other is 0.5)")
    ap.add_argument("--client-timeout", type=float, default=2.0, help="kill: the paced client's timeout, s")
    ap.add_argument("--slow-ms", type=float, default=100.0, help="kill: an op slower than this counts as trouble")
    ap.add_argument("--before", type=float, default=1.0, help="kill, leave: seconds of load before the event")
    ap.add_argument("--after", type=float, default=2.0, help="kill, leave: seconds of load after the settle")
    ap.add_argument("--repeat", type=int, default=2, help="kill: runs of each variant")
    ap.add_argument("--procs", type=int, default=4, help="throughput: client processes")
    ap.add_argument("--duration", type=float, default=5.0, help="throughput: measured seconds per row")
    ap.add_argument("--warmup", type=float, default=1.0, help="throughput: unmeasured seconds first")
    ap.add_argument("--rounds", type=int, default=3, help="throughput: interleaved rounds (median shown)")
    ap.add_argument("--tp-keys", type=int, default=10_000, help="throughput: keys loaded into each cluster")
    ap.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SCENARIOS))
    if unknown:
        ap.error(f"--only: unknown {', '.join(unknown)} (choose from {', '.join(SCENARIOS)})")
    args.only = [s for s in SCENARIOS if s in only]
    if args.ttl < 2:
        ap.error("--ttl: etcd's shortest lease is 2 s")
    if args.join_nodes < 2 or args.keys < 1 or args.data_keys < 10 or args.rate <= 0 or args.procs < 1:
        ap.error("--join-nodes ≥ 2, --keys ≥ 1, --data-keys ≥ 10, --rate > 0 and --procs ≥ 1")
    if args.repeat < 1 or args.rounds < 1 or args.duration <= 0:
        ap.error("--repeat, --rounds ≥ 1 and --duration > 0")
    return args


RUNNERS: dict[str, tuple[Callable[[argparse.Namespace], dict[str, Any]], Callable[[dict[str, Any]], str]]] = {
    "join": (run_join, format_join), "kill": (run_kill, format_kill), "leave": (run_leave, format_leave),
    "replicas": (run_replicas, format_replicas),
    "throughput": (run_throughput, format_throughput), "sim": (run_sim, format_sim),
}


@dataclass
class Report:
    command: str
    started: str
    environment: dict[str, str]
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    loads: dict[str, tuple[str, str]] = field(default_factory=dict)
    seconds: float = 0.0


def format_header(report: Report, args: argparse.Namespace) -> str:
    env = report.environment
    return "\n".join([
        f"Run {report.started}: `{report.command}` ({report.seconds:.0f} s)",
        "",
        f"- machine: {env['cpu']}, {env['cores']} cores, Linux {env['kernel']}; Python {env['python']}, "
        f"etcd {env['etcd']}, shardd {env['shardd']}",
        f"- nodes: {args.shards} shards each unless said, lease TTL {args.ttl} s, pin_cpus = false, "
        "all on tcp loopback with one etcd per cluster; load average (1/5/15 min) before/after each part: "
        + "; ".join(f"{name} {a} → {b}" for name, (a, b) in report.loads.items()),
    ])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    atexit.register(stop_all)

    def on_signal(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    report = Report("python " + shlex.join(["bench/cluster.py", *(sys.argv[1:] if argv is None else argv)]),
                    time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), environment())
    began = time.monotonic()
    texts = []
    try:
        for name in args.only:
            runner, formatter = RUNNERS[name]
            before = loadavg()
            print(f"cluster: {name} [load {before}]", file=sys.stderr)
            report.sections[name] = runner(args)
            report.loads[name] = (before, loadavg())
            texts.append(formatter(report.sections[name]))
    except KeyboardInterrupt:
        print("cluster: interrupted; every node, client and etcd stopped", file=sys.stderr)
        return 130
    except SystemExit:
        print("cluster: stopped by a signal; every node, client and etcd stopped", file=sys.stderr)
        raise
    except RunError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        stop_all()
    report.seconds = time.monotonic() - began
    if args.json:
        Path(args.json).write_text(json.dumps(report.__dict__, indent=2, default=str) + "\n")
    print("\n\n".join([format_header(report, args), *texts]))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
