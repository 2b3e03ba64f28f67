"""The `shardd` CLI against a real daemon, as a user types it."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys

from shardd.client import Client
from tests.helpers import keys_on_shard, run_cli, wait_until


def test_set_get_del_with_ttl(daemon):
    r = run_cli(daemon.endpoint, "set", "greeting", "hello", "--ttl", "60")
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stderr
    r = run_cli(daemon.endpoint, "get", "greeting")
    assert r.returncode == 0 and r.stdout == "hello\n"
    r = run_cli(daemon.endpoint, "set", "greeting", "again", "--nx")
    assert r.returncode == 1 and "not stored" in r.stderr
    r = run_cli(daemon.endpoint, "del", "greeting", "missing")
    assert r.returncode == 0 and r.stdout.strip() == "1"
    r = run_cli(daemon.endpoint, "get", "greeting")
    assert r.returncode == 1 and "not found" in r.stderr


def test_ping_and_endpoint_flag(daemon):
    r = run_cli(None, "ping", "--endpoint", daemon.endpoint)
    assert r.returncode == 0 and r.stdout.strip() == f"PONG ({daemon.shards} shards)"


def test_stats_table_one_row_per_shard_fits_80_columns(daemon):
    r = run_cli(daemon.endpoint, "stats")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert [row[0] for row in rows] == [str(i) for i in range(daemon.shards)]
    assert all(row[1] == "up" for row in rows)


def test_stats_json(daemon):
    r = run_cli(daemon.endpoint, "stats", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert len(data["shards"]) == daemon.shards
    assert {"keys", "used_bytes", "ops", "hits", "misses", "mailbox"} <= set(data["shards"][0])


def test_unreachable_daemon_is_a_clear_error(daemon):
    r = run_cli("tcp://127.0.0.1:9", "ping", "--timeout", "0.2")
    assert r.returncode == 1
    assert "no reply" in r.stderr and "Traceback" not in r.stderr


def test_incr_decr_ttl_expire_persist(daemon):
    run_cli(daemon.endpoint, "del", "n", "t")
    assert run_cli(daemon.endpoint, "incr", "n").stdout == "1\n"
    assert run_cli(daemon.endpoint, "incr", "n", "41").stdout == "42\n"
    assert run_cli(daemon.endpoint, "decr", "n").stdout == "41\n"
    assert run_cli(daemon.endpoint, "decr", "n", "50").stdout == "-9\n"
    r = run_cli(daemon.endpoint, "set", "t", "word")
    assert r.returncode == 0, r.stderr
    r = run_cli(daemon.endpoint, "incr", "t")
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert run_cli(daemon.endpoint, "ttl", "t").stdout == "inf\n"
    r = run_cli(daemon.endpoint, "expire", "t", "100.5")  # seconds, fractions allowed
    assert r.returncode == 0 and r.stdout == "OK\n", r.stderr
    left = float(run_cli(daemon.endpoint, "ttl", "t").stdout)
    assert 0 < left <= 100.5
    assert run_cli(daemon.endpoint, "persist", "t").stdout == "OK\n"
    assert run_cli(daemon.endpoint, "ttl", "t").stdout == "inf\n"
    for command in (["ttl", "missing"], ["expire", "missing", "5"], ["persist", "missing"]):
        r = run_cli(daemon.endpoint, *command)
        assert r.returncode == 1 and r.stderr == "shardd: missing: not found\n", (command, r.stderr)


def test_set_ttl_is_in_seconds(daemon):
    r = run_cli(daemon.endpoint, "set", "s", "v", "--ttl", "30")
    assert r.returncode == 0, r.stderr
    assert 1 < float(run_cli(daemon.endpoint, "ttl", "s").stdout) <= 30  # seconds: not 30 ms, not 30000 s


def test_set_from_a_file_and_from_stdin_binary_and_large(daemon, tmp_path):
    blob = bytes(range(256)) * 2048 + b"\x00\xff\n"  # 512 KiB + 3, every byte value, not UTF-8
    path = tmp_path / "blob.bin"
    path.write_bytes(blob)

    run = functools.partial(run_cli, daemon.endpoint, text=False)  # bytes in and out (binary values)

    r = run("set", "blob", "--file", str(path))
    assert r.returncode == 0 and r.stdout == b"OK\n", r.stderr
    r = run("get", "blob", "--raw")
    assert r.returncode == 0 and r.stdout == blob
    r = run("set", "piped", "-f", "-", "--ttl", "60", input=blob[::-1])
    assert r.returncode == 0, r.stderr
    assert run("get", "piped", "--raw").stdout == blob[::-1]
    assert run("get", "piped").stdout == blob[::-1] + b"\n"  # without --raw: a newline
    r = run("set", "huge", "--file", "-", input=b"x" * (2 << 20))  # past the 1 MiB limit
    assert r.returncode == 1 and b"Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr


def test_flush_needs_yes_when_not_interactive(daemon):
    assert run_cli(daemon.endpoint, "set", "f1", "v").returncode == 0
    r = run_cli(daemon.endpoint, "flush")
    assert r.returncode == 2 and "--yes" in r.stderr
    assert run_cli(daemon.endpoint, "get", "f1").returncode == 0  # nothing removed
    r = run_cli(daemon.endpoint, "flush", "--yes")
    assert r.returncode == 0 and r.stdout.startswith("flushed: "), r.stderr
    assert run_cli(daemon.endpoint, "get", "f1").returncode == 1


def test_keys_generate_refuses_names_that_leave_the_directory_or_hide(tmp_path):
    keys = tmp_path / "auth"
    for name in ("../evil", "", "a/b", "/tmp/abs", ".hidden", "a..b", "..", "server", "x" * 65):
        r = run_cli(None, "keys", "generate", str(keys), "--name", name)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (name, r.stderr)
    # nothing was written anywhere: not in the directory, not beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    r = run_cli(None, "keys", "generate", str(keys), "--name", "app-1.v2", "--client")
    assert r.returncode == 0, r.stderr
    assert max(len(line) for line in r.stdout.splitlines()) <= 80 or len(str(keys)) > 40
    assert (keys / "clients" / "app-1.v2.key").exists() and not (keys / "admins" / "app-1.v2.key").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auth"]
    assert not any(p.name.startswith(".") for p in keys.rglob("*"))


def test_resize_against_an_unreachable_daemon_fails_at_once():
    """Before: the 600 s resize timeout applied to reaching the daemon too, with nothing printed."""
    from tests.conftest import free_port

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    r = run_cli(None, "shards", "resize", "3", "-e", endpoint, timeout=120)
    assert r.returncode == 1
    assert r.stderr == f"shardd: no reply from {endpoint} within 2 s to topology\n"


def test_resize_shows_progress_then_the_result(make_daemon):
    d = make_daemon(shards=2)
    with Client(d.endpoint) as c:
        c.set_many({f"k{i}": b"v" for i in range(200)})
    r = run_cli(None, "shards", "resize", "3", "-e", d.endpoint, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[0] == "resizing 2 → 3 shards (epoch 1)..."
    assert all(len(line) <= 80 for line in r.stderr.splitlines())
    assert r.stdout.startswith("resized 2 → 3 shards in ") and "/200 keys" in r.stdout
    with Client(d.endpoint) as c:
        assert c.topology()["shards"] == 3


def test_top_off_a_terminal_prints_plain_snapshots(daemon):
    """Before: with stdout a pipe `shardd top` printed nothing at all."""
    r = run_cli(daemon.endpoint, "top", "--iterations", "2", "--interval", "0.1")
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout  # no cursor movement, no colour: plain text
    titles = [line for line in r.stdout.splitlines() if line.strip().startswith("shardd:")]
    assert len(titles) == 2
    rows = [line.split() for line in r.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [row[0] for row in rows] == [str(i) for i in range(daemon.shards)] * 2
    assert max(len(line) for line in r.stdout.splitlines()) <= 80


def test_top_restores_the_cursor_and_terminal_on_sigterm(daemon):
    """Before: SIGTERM killed `shardd top` with the cursor hidden and the terminal in cbreak mode."""
    import pty
    import select
    import signal
    import termios

    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen([sys.executable, "-m", "shardd", "top", "--interval", "0.2"], stdin=slave,
                            stdout=slave, stderr=slave, env={**os.environ, "SHARDD_ENDPOINT": daemon.endpoint,
                                                             "TERM": "xterm", "COLUMNS": "100"})
    out = b""
    try:
        while b"\x1b[?25l" not in out or b"shard" not in out.split(b"\x1b[?25l")[-1]:  # cursor hidden, table shown
            ready, _, _ = select.select([master], [], [], 30)
            assert ready, out
            out += os.read(master, 65536)
        assert termios.tcgetattr(slave)[3] & termios.ICANON == 0  # top put the terminal in cbreak mode
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        while select.select([master], [], [], 0)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        after = termios.tcgetattr(slave)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)
    assert out.rfind(b"\x1b[?25h") > out.rfind(b"\x1b[?25l")  # the cursor is shown again
    assert after == before  # and the terminal is out of cbreak mode
    assert b"Traceback" not in out


def test_health_deadline_error_names_the_option_and_value(daemon):
    """Before: `--deadline -1` said "timeout must be ... > 0, got 0.0"."""
    r = run_cli(daemon.endpoint, "health", "--deadline", "-1")
    assert r.returncode == 2
    assert "'--deadline'" in r.stderr and "got -1" in r.stderr and "timeout" not in r.stderr


def test_stats_and_hotkeys_show_healthy_shards_and_name_the_stuck_one(make_daemon):
    """Before: one SIGSTOPped worker made `stats` and `hotkeys` time out whole."""
    import psutil

    d = make_daemon(shards=3)
    keys = {shard: keys_on_shard(shard, 3, 5, prefix="hot") for shard in range(3)}
    with Client(d.endpoint) as c:
        for shard_keys in keys.values():
            for key in shard_keys:
                c.set(key, b"v")
                c.get(key)
        victim = c.stats()["shards"][1]["pid"]
    assert victim in {p.pid for p in d.children()}
    os.kill(victim, signal.SIGSTOP)
    try:
        wait_until(lambda: psutil.Process(victim).status() == psutil.STATUS_STOPPED, what="the worker to stop")
        with Client(d.endpoint, timeout=5.0) as c:
            data = c.stats()
            assert [row["status"] for row in data["shards"]] == ["up", "timeout", "up"]
            assert data["missing"] == [{"shard": 1, "status": "timeout"}]
            assert data["total"]["shards_up"] == 2 and data["total"]["keys"] == 10
            hot = c.hotkeys(100)
            assert hot["missing"] == [{"shard": 1, "status": "timeout"}] and hot["down"] == [1]
            assert {bytes(row[0]) for row in hot["keys"]} == set(keys[0]) | set(keys[2])
        r = run_cli(d.endpoint, "stats")
        assert r.returncode == 0, r.stderr
        rows = [line.split() for line in r.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
        assert [row[:2] for row in rows] == [["0", "up"], ["1", "timeout"], ["2", "up"]]
        assert "shard 1 timeout" in r.stderr and "shard 0" not in r.stderr
        assert max(len(line) for line in r.stdout.splitlines() + r.stderr.splitlines()) <= 80
        r = run_cli(d.endpoint, "stats", "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["missing"] == [{"shard": 1, "status": "timeout"}]
        r = run_cli(d.endpoint, "hotkeys", "--top", "100")
        assert r.returncode == 0, r.stderr
        rows = [line.split() for line in r.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
        assert {row[1] for row in rows} == {k.decode() for k in keys[0] + keys[2]}
        assert {row[2] for row in rows} == {"0", "2"}
        assert "shard 1 timeout" in r.stderr
    finally:
        os.kill(victim, signal.SIGCONT)
    with Client(d.endpoint, timeout=5.0) as c:
        assert c.health(5.0)["ok"] is True
        assert c.stats()["missing"] == []
