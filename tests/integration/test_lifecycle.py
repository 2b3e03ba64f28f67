"""The daemon as real processes: readiness, pinning, signals, bad config, shard failure."""

from __future__ import annotations

import os
import signal

import psutil
import pytest
import zmq

from shardd import protocol as proto
from shardd.client import Client
from shardd.errors import Unavailable
from tests.conftest import REPO
from tests.helpers import assert_one_message, keys_on_shard, run_cli, wait_until


def test_workers_are_pinned_one_per_cpu(make_daemon):
    d = make_daemon(shards=2)
    with Client(d.endpoint) as c:
        rows = c.stats()["shards"]
    allowed = sorted(os.sched_getaffinity(0))
    assert [r["shard"] for r in rows] == [0, 1]
    for row in rows:
        expected = allowed[row["shard"] % len(allowed)]
        assert row["cpu"] == expected
        assert psutil.Process(row["pid"]).cpu_affinity() == [expected]
    assert "ready: 2 shards" in d.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_leaves_nothing_behind(make_daemon, sig):
    d = make_daemon(shards=2)
    kids = d.children()
    assert len(kids) >= 3  # router + 2 workers (+ the forkserver)
    with Client(d.endpoint) as c:
        c.set("x", b"1")
    code = d.stop(sig, timeout=60)  # a deadline against a hang; a clean stop is exit 0, nothing killed
    assert code == 0, d.log()
    assert d.leftover == []
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in kids)
    assert not d.runtime_dir.exists() or list(d.runtime_dir.iterdir()) == []


def test_in_flight_requests_are_answered_on_stop(make_daemon):
    """A request already at a (slow) worker when SIGTERM arrives still gets its reply."""
    d = make_daemon("--enable-debug-ops", shards=2)
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(d.endpoint)
    s.send(proto.encode_request(77, proto.DebugSleep(0, 1000)))
    # Same connection, so the router has taken the sleep once this later get is answered.
    s.send(proto.encode_request(78, proto.Get(keys_on_shard(1, 2, 1)[0])))
    assert s.poll(30_000)
    assert proto.decode_reply(s.recv()).id == 78
    d.proc.send_signal(signal.SIGTERM)
    assert s.poll(30_000)
    reply = proto.decode_reply(s.recv())
    assert (reply.id, reply.status) == (77, proto.OK)
    s.close(0)
    ctx.term()
    assert d.stop() == 0


def test_bad_config_file_exits_2_with_one_line(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('shards = "many"\n')
    r = run_cli(None, "serve", "--config", str(cfg))
    assert r.returncode == 2
    assert_one_message(r.stderr, "shards")


def test_unknown_config_key_and_bad_flag_exit_2(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('mailbox_limt = 3\n')
    r = run_cli(None, "check-config", str(cfg))
    assert r.returncode == 2 and "mailbox_limt" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(None, "serve", "--bind", "http://0.0.0.0")
    assert r.returncode == 2 and "bind" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(None, "serve", "--shards", "lots")
    assert r.returncode == 2 and "shards" in r.stderr and "Traceback" not in r.stderr


def test_check_config_accepts_the_shipped_file():
    r = run_cli(None, "check-config", "configs/shardd.toml", cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "mailbox_limit = 1024" in r.stdout


def test_port_in_use_stops_with_boot_failure(make_daemon):
    first = make_daemon(shards=1)
    port = first.endpoint.rsplit(":", 1)[1]
    second = make_daemon(shards=1, wait=False)
    second.argv[second.argv.index("--bind") + 1] = f"tcp://127.0.0.1:{port}"
    second.proc.kill()
    second.proc.wait()
    second.start(wait=False)
    assert second.proc.wait(30) == 3
    assert "cannot bind" in second.log()


def test_killed_worker_is_unavailable_then_restarted_while_others_serve(make_daemon):
    d = make_daemon(shards=2)
    k0 = keys_on_shard(0, 2, 1)[0]
    k1 = keys_on_shard(1, 2, 1)[0]

    def unavailable() -> bool:
        assert c.get(k1) == b"alive"  # the other shard never errors
        try:
            c.set(k0, b"too early")
        except Unavailable:
            return True
        return False

    def back() -> bool:
        assert c.get(k1) == b"alive"
        try:
            return c.set(k0, b"back")
        except Unavailable:
            return False

    with Client(d.endpoint, timeout=30) as c:
        c.set(k1, b"alive")
        victim = next(r["pid"] for r in c.stats()["shards"] if r["shard"] == 0)
        # Hold the supervisor so the restart waits until the test has seen the shard down: on a
        # busy machine a restart could otherwise beat the test's next request.
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:
            os.kill(victim, signal.SIGKILL)
            wait_until(unavailable, what="the dead shard reported UNAVAILABLE")
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        wait_until(back, what="the shard served again")
        assert c.get(k0) == b"back"
        new_pid = next(r["pid"] for r in c.stats()["shards"] if r["shard"] == 0)
    assert new_pid != victim
    assert "worker 0 exited" in d.log()
