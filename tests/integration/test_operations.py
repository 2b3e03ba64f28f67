"""Operating a running daemon: health, maintenance mode, SIGHUP reload."""

from __future__ import annotations

import os
import signal

import pytest

from shardd.client import Client
from shardd.control import ControlClient
from shardd.errors import BadRequest, Maintenance, SharddError
from tests.helpers import run_cli, wait_until


def test_health_ok_then_names_the_hung_shard(make_daemon):
    d = make_daemon(shards=2)
    r = run_cli(d.endpoint, "health")
    assert r.returncode == 0 and "OK: 2 shards" in r.stdout, r.stderr
    with Client(d.endpoint) as c:
        victim = c.stats()["shards"][1]["pid"]
    os.kill(victim, signal.SIGSTOP)
    try:
        r = run_cli(d.endpoint, "health", "--deadline", "0.3")
        assert r.returncode == 1
        assert "shard 1 timeout" in r.stderr and "shard 0" not in r.stderr
        with Client(d.endpoint) as c:
            report = c.health(0.2)
            assert report["ok"] is False
            assert [row["status"] for row in report["shards"]] == ["ok", "timeout"]
    finally:
        os.kill(victim, signal.SIGCONT)
    assert run_cli(d.endpoint, "health").returncode == 0


def test_maintenance_refuses_writes_keeps_reads(make_daemon):
    d = make_daemon(shards=2)
    with Client(d.endpoint) as c:
        c.set("k", b"v")
        assert run_cli(d.endpoint, "maintenance", "on").stdout.strip() == "maintenance on"
        assert c.get("k") == b"v"
        assert c.get_many(["k", "x"]) == {"k": b"v"}
        for write in (lambda: c.set("k", b"w"), lambda: c.delete("k"), lambda: c.incr("n"),
                      lambda: c.set_many({"a": b"1"}), lambda: c.flush(), lambda: c.expire("k", 5)):
            with pytest.raises(Maintenance, match="maintenance mode"):
                write()
        assert c.stats()["router"]["maintenance"] is True
        assert c.health()["maintenance"] is True
        assert "maintenance mode" in run_cli(d.endpoint, "health").stdout
        assert run_cli(d.endpoint, "maintenance").stdout.strip() == "maintenance on"
        assert c.maintenance(False) is False
        assert c.set("k", b"w") is True
    assert run_cli(d.endpoint, "maintenance", "sideways").returncode == 2


def test_maintenance_holds_on_workers_own_endpoints_and_after_a_worker_restart(make_daemon):
    d = make_daemon(shards=2)
    with Client(d.endpoint, timeout=30) as admin, Client(d.endpoint, timeout=30, direct=True) as direct:
        keys = [f"m{i}" for i in range(20)]  # on both shards
        direct.set_many({k: b"v" for k in keys})
        assert admin.maintenance(True) is True
        # Direct clients skip the router; their writes must be refused all the same, reads served.
        for key in keys[:4]:
            with pytest.raises(Maintenance, match="maintenance mode"):
                direct.set(key, b"w")
            assert direct.get(key) == b"v"
        with pytest.raises(Maintenance):
            direct.delete_many(keys)
        # A worker killed while it is on comes back knowing it.
        victim = admin.stats()["shards"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: _serves(admin, victim), what="shard 0 to be served by a new worker")
        for key in keys:
            with pytest.raises(Maintenance):
                direct.set(key, b"w")
        assert admin.maintenance(False) is False
        assert direct.set_many({k: b"w" for k in keys}) == len(keys)


def _serves(client: Client, old_pid: int) -> bool:
    try:
        rows = client.stats()["shards"]
    except SharddError:
        return False
    return rows[0].get("status") == "up" and rows[0].get("pid") != old_pid and client.ping() == len(rows)


def test_configure_is_refused_on_the_public_endpoint(make_daemon):
    d = make_daemon(shards=1)
    assert not hasattr(Client, "configure")  # control ops are not on the public client
    with ControlClient(d.endpoint) as c, pytest.raises(BadRequest, match="control endpoint"):
        c.configure({"mailbox_limit": 1})


def test_sighup_applies_live_settings_and_names_restart_only_ones(make_daemon, tmp_path):
    conf = tmp_path / "shardd.toml"
    conf.write_text("mailbox_limit = 100\nlog_level = \"info\"\n")
    d = make_daemon(shards=2, config=str(conf))
    conf.write_text("mailbox_limit = 7\nlog_level = \"debug\"\nmax_key_bytes = 16\npin_cpus = false\n")
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for_log("SIGHUP: applied")
    assert "pin_cpus changed but only take effect after a restart" in d.log()
    with Client(d.endpoint) as c:
        assert c.stats()["router"]["mailbox_limit"] == 7
        from shardd.errors import TooLarge

        with pytest.raises(TooLarge, match="max_key_bytes"):
            c.set(b"k" * 17, b"v")
        # a broken file on reload keeps the running configuration
        conf.write_text("mailbox_limit = -3\n")
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for_log("configuration not reloaded")
        assert c.stats()["router"]["mailbox_limit"] == 7
        assert c.set(b"k" * 16, b"v") is True


def test_tune_applies_to_every_shard_at_once(make_daemon):
    d = make_daemon(shards=2)
    r = run_cli(d.endpoint, "tune", "mailbox-limit", "64")
    assert r.returncode == 0 and "on 2 shards" in r.stdout, r.stderr
    assert run_cli(d.endpoint, "tune", "max-memory", "64MiB").returncode == 0
    assert run_cli(d.endpoint, "tune", "eviction-policy", "allkeys-lfu").returncode == 0
    with Client(d.endpoint) as c:
        stats = c.stats()
    assert stats["router"]["mailbox_limit"] == 64
    assert [row["max_bytes"] for row in stats["shards"]] == [32 * 1024 * 1024] * 2
    assert [row["policy"] for row in stats["shards"]] == ["allkeys-lfu"] * 2
    assert "tuned mailbox_limit=64" in d.log()
    r = run_cli(d.endpoint, "tune", "eviction-policy", "lucky-dip")
    assert r.returncode == 1 and "eviction_policy" in r.stderr
    r = run_cli(d.endpoint, "tune", "mailbox-limit", "0")
    assert r.returncode == 1 and "mailbox_limit" in r.stderr
    assert run_cli(d.endpoint, "tune", "shards", "3").returncode == 2


def test_sighup_settings_are_live_where_they_are_read(make_daemon, tmp_path):
    """Issue 10, defect 4: the router's stats and balance check read the reloaded values, and
    the workers' hot-key tracking follows hotkeys_capacity (0 turns it off)."""
    conf = tmp_path / "shardd.toml"
    conf.write_text("imbalance_threshold = 1.5\nhotkeys_capacity = 64\n")
    d = make_daemon(shards=2, config=str(conf))
    with Client(d.endpoint) as c:
        assert c.stats()["imbalance"]["threshold"] == 1.5
        conf.write_text("imbalance_threshold = 3.25\nhotkeys_capacity = 0\n")
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for_log("SIGHUP: applied")
        assert "hotkeys_capacity=0" in d.log() and "imbalance_threshold=3.25" in d.log()
        assert c.stats()["imbalance"]["threshold"] == 3.25
        with c.pipeline() as pipe:
            for _ in range(200):
                pipe.get("hammered")
            pipe.execute()
        assert c.hotkeys(5)["keys"] == []  # tracking is off on every shard
