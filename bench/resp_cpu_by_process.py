"""Server CPU per request by process, RESP endpoint in the router's loop vs bench/resp_gateway_proto.py.

    PYTHONPATH=. python bench/resp_cpu_by_process.py [--requests 100000] [--repeat 2]

One shardd daemon (one shard per CPU, direct mode on, ``resp_bind`` on a free port) and the
gateway prototype (one process per CPU) in front of it; ``redis-benchmark -t get -c 50 -r 100000``
at ``-P 1`` and ``-P 16`` against each, each process's CPU (user + system) read before and after
every run and attributed by role: router, each worker (pids from the daemon's log), gateways.
The evidence behind bench/RESULTS.md "Where the endpoint runs". Uses compare.py's helpers.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("shardd_bench_compare", HERE / "compare.py")
assert spec is not None and spec.loader is not None
c = importlib.util.module_from_spec(spec)
sys.modules["shardd_bench_compare"] = c
spec.loader.exec_module(c)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    exe = shutil.which("redis-benchmark")
    if exe is None:
        print("redis-benchmark not found: apt-get install -y redis-tools", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="shardd-resp-cpu-"))
    port = c.free_port()
    daemon, _ = c.start_shardd(tmp, 0, direct=True, name="d", settings={"resp_bind": f"tcp://127.0.0.1:{port}"})
    try:
        c.wait_resp(daemon, port)
        gw = c.start_gateways(tmp, daemon.port, 0)
        roles: dict[int, str] = {}
        for line in daemon.log_path.read_text().splitlines():
            m = re.search(r"shardd\[(\d+)\] (router|worker \d+)", line)
            if m:
                roles.setdefault(int(m.group(1)), m.group(2))
        gateways = {p.pid for p in gw.processes()}
        procs = daemon.processes() + gw.processes()
        print("| -P | endpoint | ops/s | CPU s per 1M GETs, by process | total |\n|---|---|---|---|---|")
        for pipeline in (1, 16):
            for name, target in (("router loop", port), ("gateways", gw.port)):
                for _ in range(args.repeat):
                    argv = c.benchmark_argv(exe, target, "get", args.requests, 50, pipeline, 100_000)
                    before = c.cpu_seconds(procs)
                    run = c.run_benchmark(argv, name, "get", pipeline, args.requests, lambda: procs, 600)
                    after = c.cpu_seconds(procs)
                    by: dict[str, float] = {}
                    for pid, t in after.items():
                        role = roles.get(pid, "gateways" if pid in gateways else "other")
                        by[role] = by.get(role, 0.0) + (t - before.get(pid, 0.0)) / args.requests * 1e6
                    parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(by.items()) if v >= 0.05)
                    print(f"| {pipeline} | {name} | {run.ops_per_s:,.0f} | {parts} | {sum(by.values()):.1f} |",
                          flush=True)
    finally:
        c.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
