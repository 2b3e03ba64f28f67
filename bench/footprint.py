"""Footprint of an empty daemon: each process's RSS and PSS, their sum, and the 60 MiB PSS target.

    python bench/footprint.py                        # 2 shards, started like the systemd unit (console script)
    python bench/footprint.py --start-method spawn   # a fresh interpreter per child, no forkserver
    python bench/footprint.py --launcher module      # started as `python -m shardd serve`
    python bench/footprint.py --imports              # also: what importing each entry module costs
    python bench/footprint.py --json

Theory of operation
-------------------
Starts ``shardd serve`` with its defaults except a free loopback port, ``--shards`` and a
private ``--runtime-dir``, waits until every shard answers a ping, lets it settle, then reads
``/proc/<pid>/smaps_rollup`` (psutil ``memory_full_info``) of the supervisor and every
process below it. Roles come from the daemon itself: worker pids from ``stats`` rows, the
router's from ``stats()["router"]``; anything else below the supervisor by its process name
(``shardd-forksrv``, the forkserver of shardd.process) or command line.

PSS (proportional set size) charges each shared page to its sharers in equal parts, so the
PSS sum is what the machine really spends on the daemon; the RSS sum counts shared pages
(the interpreter, libzmq, ...) once per process. The target (issue 12) is on the PSS sum.

``--launcher script`` (default) runs a copy of the console-script wrapper pip installs
(``from shardd.cli import main``) with this checkout first on ``sys.path``, as the systemd
unit starts the daemon; ``--launcher module`` runs ``python -m shardd``. (They differed when
children were multiprocessing ``spawn`` children, which re-ran the script, CLI and all.)

``--start-method`` sets ``SHARDD_START_METHOD`` for the daemon (shardd.process): the default
``forkserver`` forks every child from one process that imported the roles' modules, so their
pages are shared; ``spawn`` starts a fresh interpreter for each.

``--imports`` runs ``python -c "import M"`` for each process's entry module in a fresh
interpreter and reports the RSS/PSS it adds to a bare interpreter's (the first row), and
which heavy packages it loaded.

The daemon is stopped with SIGTERM and waited for; nothing is left running.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MiB = 1024 * 1024
TARGET_PSS = 60 * MiB  # issue 12, item 2: an empty 2-shard daemon, summed over its processes

# The console script pip writes for `shardd = "shardd.cli:main"` (setuptools' template).
_SCRIPT = """\
import re
import sys
from shardd.cli import main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
"""

# Entry module of each process, for --imports: the CLI (before serve execs the supervisor),
# the supervisor, the forkserver (what it preloads: shardd.supervisor._PRELOAD) and the roles.
ENTRIES = ("shardd.cli", "shardd.supervisor", "shardd.process", "shardd.router_main", "shardd.worker",
           "shardd.worker,shardd.router_main")
HEAVY = ("typer", "pydantic", "rich", "prometheus_client", "asyncio", "multiprocessing",
         "zmq", "msgspec", "psutil", "xxhash")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def memory(proc: psutil.Process) -> tuple[int, int, int]:
    info = proc.memory_full_info()
    return info.rss, info.pss, info.uss


@contextlib.contextmanager
def daemon(shards: int, launcher: str, start_method: str, extra: list[str]):
    from shardd.client import Client
    from shardd.errors import SharddError

    tmp = Path(tempfile.mkdtemp(prefix="shardd-footprint-"))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    if launcher == "script":
        (tmp / "shardd").write_text(_SCRIPT)
        head = [sys.executable, str(tmp / "shardd")]
    else:
        head = [sys.executable, "-m", "shardd"]
    argv = [*head, "serve", "--bind", endpoint, "--shards", str(shards), "--runtime-dir", str(tmp / "run"), *extra]
    log = open(tmp / "shardd.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=tmp,
                            env=env(SHARDD_START_METHOD=start_method))
    try:
        with Client(endpoint, timeout=1) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if client.ping() == shards:
                        break
                except SharddError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"shardd did not start:\n{(tmp / 'shardd.log').read_text()}")
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


def measure(shards: int, launcher: str, start_method: str, settle: float, extra: list[str]) -> dict[str, Any]:
    with daemon(shards, launcher, start_method, extra) as (proc, client):
        time.sleep(settle)  # anything a process does lazily after its first request
        stats = client.stats()
        roles = {row["pid"]: f"worker {row['shard']}" for row in stats["shards"] if row.get("pid")}
        roles[stats["router"]["pid"]] = "router"
        root = psutil.Process(proc.pid)
        rows = []
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                role = "supervisor" if p.pid == root.pid else roles.get(p.pid)
                if role is None:
                    role = "forkserver" if p.name() == "shardd-forksrv" else " ".join(p.cmdline())[-60:]
                rss, pss, uss = memory(p)
                rows.append({"role": role, "pid": p.pid, "rss": rss, "pss": pss, "uss": uss})
    total = {k: sum(r[k] for r in rows) for k in ("rss", "pss", "uss")}
    return {"shards": shards, "launcher": launcher, "start_method": start_method, "processes": rows, "total": total,
            "target_pss": TARGET_PSS, "met": total["pss"] <= TARGET_PSS}


_IMPORT = """\
import sys
def mem():
    fields = dict(line.split()[:2] for line in open("/proc/self/smaps_rollup") if line.split()[0] in ("Rss:", "Pss:"))
    return int(fields["Rss:"]) * 1024, int(fields["Pss:"]) * 1024
rss0, pss0 = mem()
for module in sys.argv[1].split(","):
    if module:
        __import__(module)
rss, pss = mem()
print(rss, pss, rss - rss0, pss - pss0, len(sys.modules), *[h for h in sys.argv[2:] if h in sys.modules])
"""


def import_cost(modules: str) -> dict[str, Any]:
    """What importing ``modules`` (comma-separated; "" for none) adds to a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", _IMPORT, modules, *HEAVY], capture_output=True, text=True,
                         env=env(), cwd=REPO, check=True).stdout.split()
    rss, pss, d_rss, d_pss, n = map(int, out[:5])
    return {"modules": modules or "(bare interpreter)", "rss": rss, "pss": pss, "added_rss": d_rss,
            "added_pss": d_pss, "loaded": n, "heavy": out[5:]}


def mib(n: int) -> str:
    return f"{n / MiB:6.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--launcher", choices=("script", "module"), default="script",
                    help="console script (as systemd runs it) or python -m shardd")
    ap.add_argument("--start-method", choices=("forkserver", "spawn"), default="forkserver",
                    help="how the supervisor starts its children (SHARDD_START_METHOD)")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds to wait after ready before measuring")
    ap.add_argument("--imports", action="store_true", help="also measure importing each entry module")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("extra", nargs="*", help="more `shardd serve` arguments (after --)")
    args = ap.parse_args()
    result = measure(args.shards, args.launcher, args.start_method, args.settle, args.extra)
    if args.imports:
        result["imports"] = [import_cost(m) for m in ("", *ENTRIES)]
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"empty daemon, {args.shards} shards, started as {args.launcher}, children by {args.start_method}")
    print(f"{'process':<16}{'pid':>8}{'RSS MiB':>9}{'PSS MiB':>9}{'USS MiB':>9}")
    for r in result["processes"]:
        print(f"{r['role'][:16]:<16}{r['pid']:>8}{mib(r['rss']):>9}{mib(r['pss']):>9}{mib(r['uss']):>9}")
    t = result["total"]
    print(f"{'sum of ' + str(len(result['processes'])):<24}{mib(t['rss']):>9}{mib(t['pss']):>9}{mib(t['uss']):>9}")
    print(f"target: PSS sum <= {TARGET_PSS // MiB} MiB: {'met' if result['met'] else 'NOT met'}")
    if args.imports:
        print(f"\n{'import (fresh interpreter)':<36}{'RSS':>7}{'PSS':>7}{'+RSS':>7}{'+PSS':>7}{'modules':>8}  heavy")
        for r in result["imports"]:
            print(f"{r['modules']:<36}{mib(r['rss']):>7}{mib(r['pss']):>7}{mib(r['added_rss']):>7}"
                  f"{mib(r['added_pss']):>7}{r['loaded']:>8}  {' '.join(r['heavy'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
