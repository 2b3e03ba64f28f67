"""Where a request's time goes: CPU per op of every process and thread, and optionally py-spy.

    python bench/profile_get.py                          # shardd, 1 client process, 10 s
    python bench/profile_get.py --clients 8              # the mixed workload's process count
    python bench/profile_get.py --system redis           # the same numbers for redis-py -> Redis
    python bench/profile_get.py --system shardd-direct   # shardd.Client(direct=True): no router hop
    python bench/profile_get.py --py-spy /tmp/prof       # also sample each process with py-spy

Theory of operation
-------------------
Starts one server the way ``bench/compare.py`` does (same code: free loopback port, no
persistence, stopped on every exit path), loads ``--keys`` keys, and runs compare.py's sync
GET workload (uniform keys, every GET hits; or ``--workload set|batch|mixed``) from
``--clients`` spawned processes. Over the
measured window it reads each process's per-thread CPU time (user + system, from /proc via
psutil) before and after, and divides by the ops completed: "µs of CPU per op" for the
client(s), the router, each worker and the supervisor, split into the Python main thread and the
other threads (for shardd these are libzmq's I/O threads). Summed over processes this is what
one op costs the machine; on a 2-core box with the clients on the same cores, it bounds the
aggregate throughput at about ``2e6 / total`` ops/s.

With ``--py-spy DIR`` each process is also sampled by py-spy (``record --native``, on-CPU
samples only, raw collapsed stacks written to ``DIR/<role>.txt``) and the functions with the
most samples are printed: inclusive (the function or anything it calls) and self (the leaf).
py-spy pauses the process for each sample, so ops/s is lower while it runs.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _load_compare() -> Any:
    name = "shardd_bench_compare"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, HERE / "compare.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


compare = _load_compare()

_BOOT_FRAMES = re.compile(r"^(<module>|spawn_main|_main|BaseProcess\.|0x[0-9a-f]+ \(libc)")


def cpu_by_thread(proc: Any) -> dict[int, float]:
    """Thread id -> CPU seconds (user + system); empty if the process is gone."""
    import psutil

    try:
        return {t.id: t.user_time + t.system_time for t in proc.threads()}
    except psutil.NoSuchProcess:
        return {}


def roles_of(system: str, server: Any) -> dict[str, Any]:
    """Role name -> psutil.Process for the server's processes."""
    import psutil

    procs = server.processes()
    if compare.server_of(system) != "shardd":
        return {system: procs[0]}
    from shardd import Client

    with Client(f"tcp://127.0.0.1:{server.port}", timeout=5) as client:
        stats = client.stats()
    roles = {"supervisor": procs[0], "router": psutil.Process(stats["router"]["pid"])}
    for row in stats["shards"]:
        roles[f"worker {row['shard']}"] = psutil.Process(row["pid"])
    known = {p.pid for p in roles.values()}
    for p in procs[1:]:
        if p.pid not in known:
            roles[f"other {p.pid}"] = p  # e.g. multiprocessing's resource tracker
    return roles


def summarize_stacks(path: Path, top: int) -> list[str]:
    """Top inclusive and self functions of a py-spy raw (collapsed) file, as text lines."""
    total = 0
    inclusive: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        frames = [f for f in frames if not _BOOT_FRAMES.match(f)]
        for f in set(frames):
            inclusive[f] += n
        if frames:
            leaf[frames[-1]] += n
    if not total:
        return ["    (no on-CPU samples)"]
    out = [f"    {total} on-CPU samples; inclusive:"]
    out += [f"      {n / total:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    out.append("    self (leaf):")
    out += [f"      {n / total:6.1%}  {f}" for f, n in leaf.most_common(top)]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="CPU per sync GET, per process and thread (see the docstring).")
    ap.add_argument("--system", choices=compare.SYSTEMS, default="shardd",
                    help="shardd-direct: shardd.Client(direct=True) against the same daemon")
    ap.add_argument("--workload", choices=("get", "set", "batch", "mixed"), default="get",
                    help="compare.py's workload to run (default get; batch: ops are keys)")
    ap.add_argument("--clients", type=int, default=1, help="client processes (default 1)")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (default 2)")
    ap.add_argument("--keys", type=int, default=100_000, help="keys loaded and read (default 100000)")
    ap.add_argument("--shards", type=int, default=0, help="shardd shards (default 0: one per CPU)")
    ap.add_argument("--py-spy", metavar="DIR", help="also record each process with py-spy into DIR")
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second (default 200)")
    ap.add_argument("--top", type=int, default=12, help="functions listed per process (default 12)")
    args = ap.parse_args(argv)
    if args.py_spy and shutil.which("py-spy") is None:
        ap.error("py-spy is not installed (pip install py-spy)")

    import atexit

    atexit.register(compare.stop_all)
    tmp = Path(tempfile.mkdtemp(prefix="shardd-profile-"))
    load_before = compare.loadavg()
    try:
        if compare.server_of(args.system) == "shardd":
            server, _ = compare.start_shardd(tmp, args.shards, direct=args.system == "shardd-direct")
        elif args.system == "redis":
            server = compare.start_redis(tmp)
        else:
            server = compare.start_memcached(tmp, args.keys, 100)
        adapter = compare.make_adapter(compare.server_of(args.system), server.port, 30.0)
        adapter.load(0, args.keys, b"v" * 100)
        adapter.close()
        roles = roles_of(args.system, server)
        window: dict[str, Any] = {}

        def on_start(start_at: float, workers: list[Any]) -> None:
            import psutil

            for i, w in enumerate(workers):
                roles[f"client {i}"] = psutil.Process(w.pid)

            def sample() -> None:
                time.sleep(max(0.0, start_at + args.warmup - time.perf_counter()))
                window["before"] = {name: cpu_by_thread(p) for name, p in roles.items()}
                window["t0"] = time.perf_counter()
                spies = []
                if args.py_spy:
                    out = Path(args.py_spy)
                    out.mkdir(parents=True, exist_ok=True)
                    for name, p in roles.items():
                        dest = out / (name.replace(" ", "") + ".txt")
                        spies.append(subprocess.Popen(
                            ["py-spy", "record", "--pid", str(p.pid), "--duration", str(max(1, int(args.duration) - 1)),
                             "--rate", str(args.rate), "--native", "--format", "raw", "--output", str(dest)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                time.sleep(args.duration - 0.3)
                window["after"] = {name: cpu_by_thread(p) for name, p in roles.items()}
                window["t1"] = time.perf_counter()
                for spy in spies:
                    spy.wait()

            thread = threading.Thread(target=sample, daemon=True)
            window["thread"] = thread
            thread.start()

        spec = {"system": args.system, "port": server.port, "workload": args.workload, "keys": args.keys,
                "value_size": 100, "batch": 100, "get_ratio": 0.9, "zipf_s": 0.99, "seed": 1, "warmup": args.warmup,
                "duration": args.duration, "timeout": 5.0}
        result = compare.run_clients(spec, args.clients, on_start)
        window["thread"].join(30)
    finally:
        compare.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    elapsed = window["t1"] - window["t0"]
    ops = result["ops_per_s"] * elapsed
    print(f"{args.system}: {args.workload}, {args.clients} client process(es): {result['ops_per_s']:,.0f} ops/s, "
          f"p50 {result['p50_us']:.1f} µs, p99 {result['p99_us']:.1f} µs; "
          f"load average before {load_before}, after {compare.loadavg()}")
    print(f"{'process':14s} {'% of a core':>11s} {'CPU µs/op':>10s} {'main thread':>12s} {'other threads':>14s}")
    total = 0.0
    clients = [0.0, 0.0, 0.0]
    for name, proc in roles.items():
        before, after = window["before"].get(name, {}), window["after"].get(name, {})
        main_s = after.get(proc.pid, 0.0) - before.get(proc.pid, 0.0)
        all_s = sum(after.values()) - sum(before.get(t, 0.0) for t in after)
        total += all_s
        row = (all_s / elapsed * 100, all_s / ops * 1e6, main_s / ops * 1e6, (all_s - main_s) / ops * 1e6)
        if name.startswith("client ") and args.clients > 4:  # one line for many clients
            clients = [a + b for a, b in zip(clients, row[1:], strict=True)]
            continue
        print(f"{name:14s} {row[0]:10.1f}% {row[1]:10.1f} {row[2]:12.1f} {row[3]:14.1f}")
    if args.clients > 4:
        print(f"{'all clients':14s} {'':11s} {clients[0]:10.1f} {clients[1]:12.1f} {clients[2]:14.1f}")
    print(f"{'total':14s} {total / elapsed * 100:10.1f}% {total / ops * 1e6:10.1f}")
    if args.py_spy:
        for name in roles:
            path = Path(args.py_spy) / (name.replace(" ", "") + ".txt")
            if path.exists() and (name in ("router", "worker 0", "client 0", args.system)):
                print(f"\n== {name} (py-spy, {path})")
                print("\n".join(summarize_stacks(path, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
