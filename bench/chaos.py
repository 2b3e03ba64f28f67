"""Chaos: kill -9 random workers of a running daemon, repeatedly, under steady load.

    python bench/chaos.py --endpoint tcp://127.0.0.1:7400 --duration 600 --procs 3 [--json]

Theory of operation
-------------------
``--procs`` load processes (this file, re-run with ``--load``) each loop over SET then GET of
keys spread over every shard, through ``shardd.Client``, and record each failure with its
time (``time.monotonic``, one clock for every process on the machine) and the key's shard.
Meanwhile the controller repeatedly picks a victim shard at random, SIGKILLs its worker
(pid from ``stats``), and polls ``health`` until the shard is back with a new pid: that is
the restart time. A shard counts as *down* from the kill until it answers again, plus
``--grace`` seconds for replies already on their way.

The verdict: clients of healthy shards see no error (every failure must be
on a shard that was down at that moment, and be UNAVAILABLE), each restart is under
``--max-restart`` seconds, no child of the supervisor is a zombie, and router + worker RSS
does not grow by more than ``--max-rss-growth`` MiB.

The supervisor stops the daemon after 5 deaths of one shard within 60 s (its crash-loop
rule), and backs off restarts from the second death on (0.1 s, 0.5 s, 1 s). So a shard is
killed at most ``--kills-per-minute`` times (default 3: restarts stay under a second) in
any 60 s, and a victim is only chosen among shards that are up. Exit status 0 when every
check held, 1 otherwise, 2 when the daemon cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import deque
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_UNREACHABLE = 0, 1, 2


# --- load (one process per --procs; re-runs this file with --load) ---------------------------

def run_load(endpoint: str, until: float, seed: int, timeout: float = 2.0) -> dict[str, Any]:
    """SET then GET random keys until ``until`` (monotonic) or until stdin is readable (a line or
    EOF: the controller says stop); failures as [time, shard, kind]. Prints "ready" once serving."""
    import select

    from shardd import Client, SharddError
    from shardd.hashing import shard_for

    rng = random.Random(seed)
    ok, failures = 0, []
    with Client(endpoint, timeout=timeout) as c:
        shards = c.ping()
        print("ready", flush=True)
        keys = [f"chaos:{seed}:{i}".encode() for i in range(256)]
        owner = [shard_for(k, shards) for k in keys]
        n = 0
        while time.monotonic() < until and not select.select([sys.stdin], [], [], 0)[0]:
            i = rng.randrange(len(keys))
            value = str(n).encode()
            n += 1
            try:
                if c.set(keys[i], value) is not True:
                    failures.append([time.monotonic(), owner[i], "NotStored"])
                    continue
                got = c.get(keys[i])
                if got != value:  # the shard restarted empty between the two: only a down shard may
                    failures.append([time.monotonic(), owner[i], "Lost"])
                    continue
                ok += 2
            except SharddError as exc:
                failures.append([time.monotonic(), owner[i], type(exc).__name__])
    return {"ok": ok, "failures": failures}


# --- the controller ------------------------------------------------------------------------------

def _tree(supervisor_pid: int) -> list[Any]:
    import psutil

    try:
        return psutil.Process(supervisor_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _rss(supervisor_pid: int) -> int:
    """RSS of the router and the workers (not the supervisor's resource tracker)."""
    import psutil

    total = 0
    for p in _tree(supervisor_pid):
        try:
            if "resource_tracker" not in " ".join(p.cmdline()):
                total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _wait_back(c: Any, shard: int, old_pid: int, timeout: float) -> float | None:
    """Poll until ``shard`` is healthy with a new worker; seconds waited, or None on timeout."""
    from shardd import SharddError

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            health = c.health(0.2)
            if health["shards"][shard]["status"] == "ok":
                row = c.stats()["shards"][shard]
                if row.get("status") == "up" and row.get("pid") != old_pid:
                    return time.monotonic() - start
        except SharddError:
            pass
        time.sleep(0.01)
    return None


def _zombies(supervisor_pid: int) -> list[int]:
    import psutil

    out = []
    for p in _tree(supervisor_pid):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def run_chaos(endpoint: str, duration: float, procs: int = 3, seed: int = 1, kills_per_minute: int = 3,
              pause: float = 0.2, grace: float = 0.25, max_restart: float = 1.0,
              max_rss_growth_mib: float = 64.0, log: Any = None, kills: int | None = None,
              client_timeout: float = 2.0, wait_back: float = 10.0) -> dict[str, Any]:
    """Run the load and the kills for ``duration`` seconds; return the report (``report["ok"]``).

    With ``kills``, stop as soon as that many workers were killed and came back (``duration`` is
    then only a cap): the CI test counts kills, not seconds, so a busy machine only makes it slower.
    """
    import psutil

    from shardd import Client

    wanted_kills = kills
    say = log or (lambda message: None)
    rng = random.Random(seed)
    with Client(endpoint, timeout=2.0) as c:
        stats = c.stats()
        shards = len(stats["shards"])
        supervisor = psutil.Process(stats["router"]["pid"]).ppid()
        rss_start = _rss(supervisor)
        until = time.monotonic() + duration
        load = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--load", "--endpoint", endpoint,
                                  "--until", repr(until + 0.0), "--seed", str(seed * 1000 + i),
                                  "--timeout", repr(client_timeout)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for i in range(procs)]
        kills: dict[int, deque[float]] = {s: deque() for s in range(shards)}
        down: list[tuple[int, float, float]] = []  # (shard, killed at, back at + grace)
        restarts: list[float] = []
        problems: list[str] = []
        try:
            for p in load:  # readiness: every load process is serving before the first kill
                if p.stdout.readline().strip() != "ready":
                    problems.append("a load process did not start")
            while (time.monotonic() < until - 0.5 and not problems
                   and (wanted_kills is None or len(restarts) < wanted_kills)):
                now = time.monotonic()
                for recent in kills.values():
                    while recent and now - recent[0] > 60.0:
                        recent.popleft()
                allowed = [s for s in range(shards) if len(kills[s]) < kills_per_minute]
                if not allowed:
                    time.sleep(0.1)
                    continue
                victim = rng.choice(allowed)
                pid = c.stats()["shards"][victim]["pid"]
                killed_at = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                kills[victim].append(killed_at)
                took = _wait_back(c, victim, pid, timeout=wait_back)
                back = time.monotonic()
                down.append((victim, killed_at, back + grace))
                if took is None:
                    problems.append(f"shard {victim} was not back within {wait_back:g} s of the kill")
                    break
                restarts.append(took)
                say(f"killed shard {victim} (pid {pid}): back in {took * 1000:.0f} ms")
                # The supervisor reaps on its next loop turn; a zombie that stays is a bug.
                reap_by = time.monotonic() + wait_back
                while (zombies := _zombies(supervisor)) and time.monotonic() < reap_by:
                    time.sleep(0.01)
                if zombies:
                    problems.append(f"zombie children {wait_back:g} s after killing shard {victim}: {zombies}")
                time.sleep(pause)
        finally:
            results = []
            for p in load:
                out, _ = p.communicate("stop\n", timeout=duration + 30)
                if p.returncode != 0:
                    problems.append(f"a load process exited {p.returncode}")
                else:
                    results.append(json.loads(out.strip().splitlines()[-1]))
        health = c.health(1.0)
        rss_end = _rss(supervisor)

    def was_down(shard: int, t: float) -> bool:
        return any(s == shard and start <= t <= end for s, start, end in down)

    failures = [f for r in results for f in r["failures"]]
    healthy_errors = [f for f in failures if not was_down(f[1], f[0])]
    bad_kinds = sorted({f[2] for f in failures if was_down(f[1], f[0]) and f[2] not in ("Unavailable", "Lost")})
    if healthy_errors:
        problems.append(f"{len(healthy_errors)} errors on healthy shards, e.g. {healthy_errors[:3]}")
    if bad_kinds:
        problems.append(f"errors other than UNAVAILABLE on down shards: {bad_kinds}")
    if restarts and max(restarts) >= max_restart:
        problems.append(f"slowest restart {max(restarts):.3f} s (bound {max_restart} s)")
    if not health["ok"]:
        problems.append(f"not healthy at the end: {health}")
    if rss_end - rss_start > max_rss_growth_mib * 2**20:
        problems.append(f"router+workers RSS grew {(rss_end - rss_start) / 2**20:.1f} MiB")
    return {
        "ok": not problems, "problems": problems, "duration_s": duration, "shards": shards, "procs": procs,
        "kills": len(restarts), "kills_by_shard": {s: sum(1 for d in down if d[0] == s) for s in range(shards)},
        "restart_ms": {"max": round(max(restarts, default=0) * 1000, 1),
                       "mean": round(sum(restarts) / max(1, len(restarts)) * 1000, 1)},
        "ops_ok": sum(r["ok"] for r in results), "errors_on_down_shards": len(failures) - len(healthy_errors),
        "errors_on_healthy_shards": len(healthy_errors),
        "rss_mib": {"start": round(rss_start / 2**20, 1), "end": round(rss_end / 2**20, 1)},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", default=os.environ.get("SHARDD_ENDPOINT", "tcp://127.0.0.1:7400"))
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of chaos (default 60)")
    ap.add_argument("--procs", type=int, default=3, help="load processes (default 3)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kills-per-minute", type=int, default=3,
                    help="most kills of one shard in any 60 s (the supervisor gives up at 5)")
    ap.add_argument("--pause", type=float, default=0.2, help="seconds between a restart and the next kill")
    ap.add_argument("--grace", type=float, default=0.25, help="seconds a shard still counts as down once back")
    ap.add_argument("--max-restart", type=float, default=1.0, help="bound on each restart, seconds")
    ap.add_argument("--max-rss-growth", type=float, default=64.0, help="bound on router+worker RSS growth, MiB")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--until", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=2.0, help="the load clients' timeout, seconds (default 2)")
    args = ap.parse_args(argv)
    if args.load:
        print(json.dumps(run_load(args.endpoint, args.until, args.seed, args.timeout)), flush=True)
        return EXIT_OK
    from shardd import Client, SharddError

    try:
        with Client(args.endpoint, timeout=2.0) as c:
            c.ping()
    except SharddError as exc:
        print(f"chaos: cannot reach {args.endpoint}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    report = run_chaos(args.endpoint, args.duration, args.procs, args.seed, args.kills_per_minute, args.pause,
                       args.grace, args.max_restart, args.max_rss_growth,
                       log=None if args.json else lambda m: print(m, flush=True), client_timeout=args.timeout)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return EXIT_OK if report["ok"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
