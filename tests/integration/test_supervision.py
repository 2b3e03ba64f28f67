"""Supervision with real signals: a killed worker under load, crash loops, a dead router."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

from shardd.client import Client
from shardd.errors import SharddError, Unavailable
from tests.helpers import keys_on_shard


def _load_on_keys(endpoint: str, keys: list[bytes], seconds: float, out) -> None:
    """Set/get ``keys`` for ``seconds``; report (ops, errors) through ``out``."""
    ops = 0
    errors: list[str] = []
    with Client(endpoint, timeout=2) as c:
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
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
    out.put((ops, errors))


def test_kill_9_worker_under_load_other_shard_sees_no_error(make_daemon):
    d = make_daemon(shards=2)
    healthy_keys = keys_on_shard(1, 2, 60)
    victim_key = keys_on_shard(0, 2, 1)[0]
    mp = multiprocessing.get_context("spawn")
    out = mp.Queue()
    # each load process owns its keys, so a read must return that process's last write
    load = [mp.Process(target=_load_on_keys, args=(d.endpoint, healthy_keys[i::3], 4.0, out)) for i in range(3)]
    for p in load:
        p.start()
    with Client(d.endpoint, timeout=2) as c:
        c.set(victim_key, b"before")
        old_pid = c.stats()["shards"][0]["pid"]
        time.sleep(0.5)  # let the load run before the kill (the load is the point, not readiness)
        killed_at = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        unavailable = 0
        while True:
            try:
                c.set(victim_key, b"after")
                break
            except Unavailable:
                unavailable += 1
            assert time.monotonic() - killed_at < 5, "shard 0 did not come back within 5 s"
            time.sleep(0.002)
        restart_s = time.monotonic() - killed_at
        assert c.get(victim_key) == b"after"
    results = [out.get(timeout=30) for _ in load]
    for p in load:
        p.join(10)
    assert sum(ops for ops, _ in results) > 500
    assert [e for _, errors in results for e in errors] == []
    assert unavailable > 0
    assert restart_s < 1.0, f"shard 0 served again only after {restart_s:.3f} s"
    print(f"\nshard restart after kill -9: {restart_s * 1000:.0f} ms, {unavailable} UNAVAILABLE replies meanwhile")


def test_crash_loop_stops_the_daemon_with_a_clear_line(make_daemon):
    d = make_daemon(shards=2)
    with Client(d.endpoint, timeout=1) as c:
        for _ in range(5):
            pid = c.stats()["shards"][0]["pid"]
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while d.proc.poll() is None and time.monotonic() < deadline:
                try:
                    if c.stats()["shards"][0].get("pid") not in (None, pid):
                        break
                except SharddError:
                    pass
                time.sleep(0.02)
    assert d.proc.wait(15) == 4
    assert "crash loop, stopping" in d.log()
    assert d.children() == []


def test_router_death_stops_the_daemon_non_zero(make_daemon):
    d = make_daemon(shards=2)
    with Client(d.endpoint) as c:
        router_pid = c.stats()["router"]["pid"]
    os.kill(router_pid, signal.SIGKILL)
    assert d.proc.wait(15) == 4
    assert "router exited" in d.log()
    assert d.children() == []
