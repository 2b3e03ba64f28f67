"""Lean processes (issue 12): which processes an empty daemon is, what each imports, and how
shardd.process starts children and reports their exit.

What is checked here can fail without a clock: sets of modules, sets of pids, parent pids,
exit codes and the libraries mapped into a process. Memory itself is bench/footprint.py's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from shardd.client import Client
from tests.conftest import REPO
from tests.helpers import wait_until

# What no process of the daemon needs: the CLI (typer, and pydantic and rich under it) and the
# metrics library (imported by the supervisor only when metrics_bind is set).
CLI_AND_METRICS = ("typer", "click", "rich", "pydantic", "pydantic_core", "prometheus_client",
                   "shardd.cli", "shardd.metrics")


def _imported(*modules: str) -> set[str]:
    """Which of CLI_AND_METRICS importing ``modules`` in a fresh interpreter loads."""
    code = ("import importlib, json, sys\n"
            f"for m in {list(modules)!r}: importlib.import_module(m)\n"
            f"print(json.dumps(sorted(m for m in {list(CLI_AND_METRICS)!r} if m in sys.modules)))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                         env=env, timeout=120)
    return set(json.loads(out.stdout))


@pytest.mark.parametrize("entry", ["shardd.worker", "shardd.router_main", "shardd.router", "shardd.supervisor",
                                   "shardd.process"])
def test_no_process_entry_module_imports_the_cli_or_prometheus_client(entry):
    assert _imported(entry) == set()


def test_what_the_forkserver_preloads_imports_neither():
    from shardd.supervisor import _PRELOAD

    assert _imported("shardd.supervisor", *_PRELOAD) == set()


def _daemon_processes(d) -> tuple[psutil.Process, dict[int, str]]:
    """The supervisor, and each process below it by role: worker N, router, forkserver, or its command line."""
    with Client(d.endpoint, timeout=10) as c:
        stats = c.stats()
    roles = {row["pid"]: f"worker {row['shard']}" for row in stats["shards"]}
    roles[stats["router"]["pid"]] = "router"
    supervisor = psutil.Process(d.proc.pid)
    below = {}
    for p in supervisor.children(recursive=True):
        below[p.pid] = roles.get(p.pid) or ("forkserver" if p.name() == "shardd-forksrv" else " ".join(p.cmdline()))
    return supervisor, below


def test_an_empty_daemon_is_a_supervisor_a_forkserver_the_router_and_one_worker_per_shard(make_daemon):
    d = make_daemon(shards=2)
    supervisor, below = _daemon_processes(d)
    # No resource tracker, nothing else; every one a child of the supervisor (a subreaper), so
    # it reaps them all and the router's os.getppid() is the supervisor.
    assert sorted(below.values()) == ["forkserver", "router", "worker 0", "worker 1"], below
    assert {p.pid for p in supervisor.children()} == set(below)
    assert supervisor.name() == "shardd"


def test_no_process_of_the_daemon_has_loaded_the_cli(make_daemon):
    """`shardd serve` execs the supervisor once its flags are parsed: typer's option conversion
    (pydantic_core, a C extension, hence visible in the memory map) is in no daemon process."""
    d = make_daemon(shards=2)
    supervisor, below = _daemon_processes(d)
    for pid in [supervisor.pid, *below]:
        with open(f"/proc/{pid}/maps") as maps:
            assert "pydantic_core" not in maps.read(), below.get(pid, "supervisor")


def test_a_killed_forkserver_is_reaped_and_replaced_when_a_worker_must_restart(make_daemon):
    d = make_daemon(shards=2)
    supervisor, below = _daemon_processes(d)
    forkserver = next(pid for pid, role in below.items() if role == "forkserver")
    worker0 = next(pid for pid, role in below.items() if role == "worker 0")
    os.kill(forkserver, signal.SIGKILL)
    wait_until(lambda: forkserver not in {p.pid for p in supervisor.children()}, what="the forkserver reaped")
    assert "the forkserver exited (exit code -9)" in d.log()
    os.kill(worker0, signal.SIGKILL)

    def shard0_back() -> bool:
        with Client(d.endpoint, timeout=10) as c:
            row = c.stats()["shards"][0]
        return row.get("status") == "up" and row.get("pid") not in (None, worker0)

    wait_until(shard0_back, what="shard 0 served by a new worker")
    _, below = _daemon_processes(d)
    assert sorted(below.values()) == ["forkserver", "router", "worker 0", "worker 1"], below
    assert forkserver not in below and worker0 not in below  # reaped, not zombies
    assert d.stop() == 0, d.log()
    assert d.leftover == []


# shardd.process.Child on its own, in a separate interpreter: the supervisor becomes a child
# subreaper, which the test runner must not. Targets are stdlib functions, by name.
_CHILDREN = """
import json, os, sys
import psutil
from shardd import process

process.start_forkserver()
out = {}
for name, target, args in [("returns 7", "builtins:int", ("7",)), ("returns None", "builtins:print", ()),
                           ("exits 3", "sys:exit", (3,)), ("raises", "builtins:int", ("x",)),
                           ("aborts", "os:abort", ())]:
    child = process.Child(name, target, args)
    child.start()
    child.join(60)
    out[name] = child.exitcode
sleeper = process.Child("sleeper", "time:sleep", (600,))
sleeper.start()
out["sleeper alive"] = sleeper.is_alive()
out["sleeper's parent is us"] = psutil.Process(sleeper.pid).ppid() == os.getpid()
sleeper.kill()
sleeper.join(60)
out["killed"] = sleeper.exitcode
out["forkserver"] = process._forkserver.pid is not None
process.stop_forkserver()
out["children left"] = [p.pid for p in psutil.Process().children() if p.status() != psutil.STATUS_ZOMBIE]
print(json.dumps(out))
"""


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_child_s_exit_code_and_parent_whichever_way_it_starts(method):
    env = {**os.environ, "PYTHONPATH": str(REPO), "SHARDD_START_METHOD": method}
    run = subprocess.run([sys.executable, "-c", _CHILDREN], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out == {
        "returns 7": 7, "returns None": 0, "exits 3": 3, "raises": 1, "aborts": -signal.SIGABRT,
        "sleeper alive": True, "sleeper's parent is us": True, "killed": -signal.SIGKILL,
        "forkserver": method == "forkserver", "children left": [],
    }, run.stderr
    assert "ValueError" in run.stderr  # the exception's traceback, from the child
