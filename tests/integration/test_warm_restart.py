"""Warm restart against the real daemon: snapshot on SIGTERM, reload into another shard count."""

from __future__ import annotations

import os
import time

from shardd import snapshot
from shardd.client import Client


def _fill(c: Client) -> dict[str, bytes]:
    data = {f"warm:{i}": f"value-{i}".encode() * 3 for i in range(400)}
    c.set_many(data)
    for i in range(20):
        c.set(f"ttl:{i}", b"long", ttl=3600)
        c.set(f"short:{i}", b"gone soon", ttl=0.2)
    c.incr("counter", 41)
    return data


def test_graceful_stop_snapshots_and_a_resharded_start_reloads(make_daemon, tmp_path):
    state = str(tmp_path / "state")
    d = make_daemon("--state-dir", state, shards=2)
    with Client(d.endpoint) as c:
        data = _fill(c)
        _, version = c.gets("warm:7")
    assert d.stop() == 0
    assert "snapshot gen-" in d.log()
    assert snapshot.current(state) is not None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and time.time() < os.path.getmtime(snapshot.current(state)) + 0.3:
        time.sleep(0.05)  # let the 0.2 s TTLs pass while the daemon is down

    d2 = make_daemon("--state-dir", state, shards=3)
    with Client(d2.endpoint) as c:
        assert c.get_many(list(data)) == data
        assert c.incr("counter") == 42
        assert c.gets("warm:7") == (data["warm:7"], version)  # CAS versions survive
        assert 600 < c.ttl("ttl:3") <= 3600                   # TTLs kept by wall-clock time
        assert c.get("short:3") is None                        # expired while down
        rows = c.stats()["shards"]
        assert len(rows) == 3 and all(row["keys"] > 50 for row in rows)  # re-placed over 3 shards
    assert "loaded" in d2.log() and "had expired while down" in d2.log()
    # The generation was consumed when loaded: a crash now must not resurrect it.
    assert snapshot.current(state) is None


def test_crash_after_load_starts_cold(make_daemon, tmp_path):
    state = str(tmp_path / "state")
    d = make_daemon("--state-dir", state, shards=2)
    with Client(d.endpoint) as c:
        c.set("k", b"v")
    assert d.stop() == 0
    d2 = make_daemon("--state-dir", state, shards=2)
    with Client(d2.endpoint) as c:
        assert c.get("k") == b"v"
        c.delete("k")
    d2.kill_all()  # SIGKILL: no snapshot of the delete
    d3 = make_daemon("--state-dir", state, shards=2)
    with Client(d3.endpoint) as c:
        assert c.get("k") is None  # not brought back from the consumed snapshot


def test_corrupt_snapshot_is_reported_and_the_daemon_still_starts(make_daemon, tmp_path):
    state = str(tmp_path / "state")
    d = make_daemon("--state-dir", state, shards=2)
    with Client(d.endpoint) as c:
        c.set_many({f"k{i}": b"v" for i in range(100)})
    assert d.stop() == 0
    victim = snapshot.shard_file(snapshot.current(state), 0)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    d2 = make_daemon("--state-dir", state, shards=2)
    assert "not loaded" in d2.log() and "truncated" in d2.log()
    with Client(d2.endpoint) as c:
        got = c.get_many([f"k{i}" for i in range(100)])
        assert 0 < len(got) < 100  # shard-1.snap still loaded; the damaged file was skipped
        assert c.set("new", b"ok") is True


def test_periodic_snapshot_survives_a_crash(make_daemon, tmp_path):
    state = str(tmp_path / "state")
    conf = tmp_path / "c.toml"
    conf.write_text("snapshot_interval = 1\n")
    d = make_daemon("--state-dir", state, shards=2, config=str(conf))
    with Client(d.endpoint) as c:
        c.set("periodic", b"yes")
    before = d.log().count("snapshot gen-")
    deadline = time.monotonic() + 60  # against a hang only
    while d.log().count("snapshot gen-") <= before:  # a periodic snapshot taken after the SET
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.05)
    d.kill_all()
    d2 = make_daemon("--state-dir", state, shards=2)
    with Client(d2.endpoint) as c:
        assert c.get("periodic") == b"yes"
