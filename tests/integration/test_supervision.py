"""Supervision with real signals: a killed worker under load, crash loops, a dead router."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

from shardd.client import Client
from shardd.errors import SharddError, Unavailable
from tests.helpers import keys_on_shard, wait_until


def _load_on_keys(endpoint: str, keys: list[bytes], stop, progress, out) -> None:
    """Set/get ``keys`` until ``stop`` is set, counting ops in ``progress``; report (ops, errors) through ``out``."""
    ops = 0
    errors: list[str] = []
    # The timeout is a deadline against a hang: on a busy machine a healthy reply may be slow.
    with Client(endpoint, timeout=30) as c:
        i = 0
        while not stop.is_set():
            key = keys[i % len(keys)]
            value = str(i).encode()
            try:
                c.set(key, value)
                got = c.get(key)
                if got != value:
                    errors.append(f"read {got!r} after writing {value!r}")
                ops += 2
            except SharddError as exc:
                errors.append(repr(exc))
            i += 1
            progress.value = ops
    out.put((ops, errors))


def test_kill_9_worker_under_load_other_shard_sees_no_error(make_daemon):
    d = make_daemon(shards=2)
    healthy_keys = keys_on_shard(1, 2, 60)
    victim_key = keys_on_shard(0, 2, 1)[0]
    mp = multiprocessing.get_context("spawn")
    stop, out = mp.Event(), mp.Queue()
    progress = [mp.Value("l", 0) for _ in range(3)]
    # each load process owns its keys, so a read must return that process's last write
    load = [mp.Process(target=_load_on_keys, args=(d.endpoint, healthy_keys[i::3], stop, progress[i], out))
            for i in range(3)]
    for p in load:
        p.start()

    def every_load_did(ops: int) -> bool:
        return all(v.value >= ops for v in progress)

    try:
        with Client(d.endpoint, timeout=30) as c:
            c.set(victim_key, b"before")
            old_pid = c.stats()["shards"][0]["pid"]
            wait_until(lambda: every_load_did(100), what="load on the healthy shard")  # readiness, not a sleep
            during = [v.value for v in progress]
            killed_at = time.monotonic()
            os.kill(old_pid, signal.SIGKILL)
            unavailable = 0

            def back() -> bool:
                nonlocal unavailable
                try:
                    row = c.stats()["shards"][0]
                except Unavailable:
                    unavailable += 1
                    return False
                if row.get("status") != "up" or row.get("pid") in (None, old_pid):
                    unavailable += row.get("status") == "down"
                    return False
                return True

            wait_until(back, what="shard 0 served by a new worker", interval=0.002)
            restart_s = time.monotonic() - killed_at
            # The new worker started empty: the kill really took the old one (and its data) away.
            assert c.get(victim_key) is None
            c.set(victim_key, b"after")
            assert c.get(victim_key) == b"after"
            # the load went on across the kill and the restart
            wait_until(lambda: all(v.value >= f + 100 for v, f in zip(progress, during, strict=True)),
                       what="load after the restart")
    finally:
        stop.set()
    results = [out.get(timeout=60) for _ in load]
    for p in load:
        p.join(30)
    assert [e for _, errors in results for e in errors] == []
    # A figure, not a bound (a busy machine stretches it): bench/chaos.py and bench/warm_restart.py measure it.
    print(f"\nshard restart after kill -9: {restart_s * 1000:.0f} ms, {unavailable} UNAVAILABLE replies meanwhile")


def _shard0_pid(c: Client) -> int | None:
    try:
        row = c.stats()["shards"][0]
    except SharddError:
        return None
    return row.get("pid") if row.get("status") == "up" else None


def test_crash_loop_stops_the_daemon_with_a_clear_line(make_daemon):
    d = make_daemon(shards=2)
    with Client(d.endpoint, timeout=5) as c:
        for _ in range(5):
            pid = wait_until(lambda: _shard0_pid(c), what="shard 0 up")
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: d.proc.poll() is not None or _shard0_pid(c) not in (None, pid),  # noqa: B023
                       what="shard 0 restarted or the daemon stopped")
    assert d.proc.wait(60) == 4
    assert "crash loop, stopping" in d.log()
    assert d.children() == []


def test_router_death_stops_the_daemon_non_zero(make_daemon):
    d = make_daemon(shards=2)
    with Client(d.endpoint) as c:
        router_pid = c.stats()["router"]["pid"]
    os.kill(router_pid, signal.SIGKILL)
    assert d.proc.wait(60) == 4
    assert "router exited" in d.log()
    assert d.children() == []


def test_a_worker_that_cannot_start_after_a_restart_stops_the_daemon(make_daemon):
    """Its ipc path became unusable while it served: the restart fails at bind, and the daemon
    stops with one line naming the worker instead of retrying it until the crash-loop limit."""
    d = make_daemon(shards=2)
    with Client(d.endpoint) as c:
        pid = c.stats()["shards"][1]["pid"]
    path = d.runtime_dir / "shard-1.ipc"
    path.unlink()  # the running worker keeps its bound socket; the router keeps its connection
    path.mkdir()   # nothing can bind here now, not even root
    os.kill(pid, signal.SIGKILL)
    assert d.proc.wait(60) == 3
    assert "worker 1 could not start" in d.log() and "crash loop" not in d.log()
    assert d.children() == []
