"""The `shardd` CLI against a real daemon, as a user types it."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def shardd(daemon, *args: str, env_endpoint: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if env_endpoint:
        env["SHARDD_ENDPOINT"] = daemon.endpoint
    return subprocess.run([sys.executable, "-m", "shardd", *args], capture_output=True, text=True,
                          timeout=30, env=env)


def test_set_get_del_with_ttl(daemon):
    r = shardd(daemon, "set", "greeting", "hello", "--ttl", "60")
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stderr
    r = shardd(daemon, "get", "greeting")
    assert r.returncode == 0 and r.stdout == "hello\n"
    r = shardd(daemon, "set", "greeting", "again", "--nx")
    assert r.returncode == 1 and "not stored" in r.stderr
    r = shardd(daemon, "del", "greeting", "missing")
    assert r.returncode == 0 and r.stdout.strip() == "1"
    r = shardd(daemon, "get", "greeting")
    assert r.returncode == 1 and "not found" in r.stderr


def test_ping_and_endpoint_flag(daemon):
    r = shardd(daemon, "ping", "--endpoint", daemon.endpoint, env_endpoint=False)
    assert r.returncode == 0 and r.stdout.strip() == f"PONG ({daemon.shards} shards)"


def test_stats_table_one_row_per_shard_fits_80_columns(daemon):
    r = shardd(daemon, "stats")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert [row[0] for row in rows] == [str(i) for i in range(daemon.shards)]
    assert all(row[1] == "up" for row in rows)


def test_stats_json(daemon):
    r = shardd(daemon, "stats", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert len(data["shards"]) == daemon.shards
    assert {"keys", "used_bytes", "ops", "hits", "misses", "mailbox"} <= set(data["shards"][0])


def test_unreachable_daemon_is_a_clear_error(daemon):
    r = subprocess.run([sys.executable, "-m", "shardd", "ping", "--timeout", "0.2"], capture_output=True,
                       text=True, timeout=30, env={**os.environ, "SHARDD_ENDPOINT": "tcp://127.0.0.1:9"})
    assert r.returncode == 1
    assert "no reply" in r.stderr and "Traceback" not in r.stderr
