"""The RESP endpoint's guarantees where its two fronts differ, with their windows held open on purpose.

``resp_front = "workers"`` (default): each worker accepts connections (SO_REUSEPORT), applies its own
keys, batches other shards' keys to their workers and sends the rest through the router.
``resp_front = "router"``: the router's loop serves every connection. Here: replies stay in request
order while a shard is stopped (SIGSTOP) and others answer first; a write to a key in transit
during a resize is not acknowledged before it is safe; a worker dying costs its own connections
and no more; single keys do not need the router.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest
import redis

from shardd.client import Client
from shardd.hashing import shard_for
from tests.conftest import free_port
from tests.helpers import keys_on_shard, wait_until
from tests.integration.test_resize_window import NEW, OLD, _in_transit, _load, _resize_in_background, _wait_moving
from tests.resp_support import wait_resp


def _start(make_daemon, tmp_path, front: str, shards: int = 2, extra: str = ""):
    port = free_port()
    config = tmp_path / f"resp-{front}-{port}.toml"
    config.write_text(f'resp_bind = "tcp://127.0.0.1:{port}"\nresp_front = "{front}"\n{extra}')
    d = make_daemon(shards=shards, config=str(config))
    wait_resp(port)
    return d, port


def _serving_pid(conn: redis.Redis) -> int:
    return int(conn.info("server")["process_id"])


def _worker_pids(d) -> dict[int, int]:
    with Client(d.endpoint, timeout=5) as c:
        return {row["shard"]: row["pid"] for row in c.stats()["shards"]}


def _raw(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _info_pid(s: socket.socket) -> int:
    """The pid of the process serving this raw connection (INFO server's process_id)."""
    s.sendall(_command(b"INFO", b"server"))
    data = b""
    while b"\r\n" not in data:
        data += s.recv(65536)
    header, _, body = data.partition(b"\r\n")
    length = int(header[1:])  # a bulk string (RESP2)
    while len(body) < length + 2:
        body += s.recv(65536)
    return int(body.split(b"process_id:")[1].split(b"\r\n")[0])


def _read_exactly(s: socket.socket, expected: bytes) -> bytes:
    got = b""
    while len(got) < len(expected):
        chunk = s.recv(65536)
        assert chunk, f"connection closed after {got!r}"
        got += chunk
    return got


@pytest.mark.parametrize("front", ["workers", "router"])
def test_replies_keep_request_order_while_a_stopped_shard_answers_last(make_daemon, tmp_path, front):
    d, port = _start(make_daemon, tmp_path, front)
    k0 = keys_on_shard(0, 2, 2, "ord0-")
    k1 = keys_on_shard(1, 2, 2, "ord1-")
    with redis.Redis(port=port) as r:
        r.mset({k0[0]: b"zero", k1[0]: b"one"})
    pids = _worker_pids(d)
    # A connection served by the process that stays up (in the workers front, worker 1), so that
    # shard 1's answers can come first while shard 0 is stopped.
    keep = []
    conn = None
    for _ in range(64):
        s = _raw(port)
        pid = _info_pid(s)
        if front == "router" or pid == pids[1]:
            conn = s
            break
        keep.append(s)
    assert conn is not None, "no connection landed on worker 1 in 64 tries"
    os.kill(pids[0], signal.SIGSTOP)
    try:
        conn.sendall(_command(b"GET", k0[0]) + _command(b"GET", k1[0]) + _command(b"SET", k0[1], b"x")
                     + _command(b"INCR", k1[1]) + _command(b"GET", k1[0]))
        # Shard 1 has answered its three (it is running); nothing may be sent before shard 0's reply.
        wait_until(lambda: _ops_of(d, 1) >= 3, what="shard 1 applying its ops")
        conn.settimeout(0.3)
        with pytest.raises(TimeoutError):
            conn.recv(1)
    finally:
        os.kill(pids[0], signal.SIGCONT)
    conn.settimeout(60)
    expected = b"$4\r\nzero\r\n$3\r\none\r\n+OK\r\n:1\r\n$3\r\none\r\n"
    assert _read_exactly(conn, expected) == expected
    for s in [conn, *keep]:
        s.close()


def _ops_of(d, shard: int) -> int:
    with Client(d.endpoint, timeout=5) as c:
        row = next(r for r in c.stats()["shards"] if r["shard"] == shard)
    return int(row.get("ops", 0))


def test_a_write_to_a_key_in_transit_waits_for_the_router_and_sticks(make_daemon, tmp_path):
    """Workers front, mid-resize, router stopped with entries taken from their old owner and not yet
    delivered: a RESP SET for such a key (local to a worker or sent to its old owner) is answered
    MOVED/TRYAGAIN inside the daemon and goes to the router, so it is not acknowledged before the
    router runs again, and then lands after the entry (it is what GET reads at the end)."""
    d, port = _start(make_daemon, tmp_path, "workers", shards=OLD)
    keys = _load(d)
    moving = [k for k in keys if shard_for(k, NEW) == NEW - 1]
    with Client(d.endpoint) as c:
        router_pid = c.stats()["router"]["pid"]
    conns = [redis.Redis(port=port, socket_timeout=120) for _ in range(4)]
    for conn in conns:
        conn.ping()
    resize, out = _resize_in_background(d, NEW)
    endpoints = _wait_moving(d, NEW)
    window: list[bytes] = []
    stopped = False
    results: dict[int, object] = {}
    writers = []
    try:
        while "result" not in out:
            os.kill(router_pid, signal.SIGSTOP)
            stopped = True
            window = _in_transit(endpoints, moving)
            if len(window) >= len(conns):
                break
            os.kill(router_pid, signal.SIGCONT)
            stopped = False
            time.sleep(0.002)
        assert len(window) >= len(conns), "never caught entries in flight; the resize finished first"
        for i, conn in enumerate(conns):  # connections on both workers, most likely: every path
            thread = threading.Thread(target=lambda i=i, conn=conn: results.update({i: conn.set(window[i], b"resp")}),
                                      daemon=True)
            thread.start()
            writers.append(thread)
        for thread in writers:
            thread.join(0.2)
        assert all(t.is_alive() for t in writers), f"acknowledged while the router was stopped: {results}"
    finally:
        if stopped:
            os.kill(router_pid, signal.SIGCONT)
    for thread in writers:
        thread.join(60)
    resize.join(120)
    assert "error" not in out, out.get("error")
    assert out["result"]["lost"] == 0
    assert results == dict.fromkeys(range(len(conns)), True)
    with redis.Redis(port=port) as r:
        assert r.mget(window[: len(conns)]) == [b"resp"] * len(conns)
        assert r.get(window[-1]) == b"v0"
        # A new shard serves its keys too: new connections are spread over 3 workers now.
        assert r.set(moving[-1], b"after") and r.get(moving[-1]) == b"after"
    for conn in conns:
        conn.close()


def test_a_worker_dying_costs_its_own_connections_only(make_daemon, tmp_path):
    d, port = _start(make_daemon, tmp_path, "workers")
    pids = _worker_pids(d)
    k0, k1 = keys_on_shard(0, 2, 1, "die0-")[0], keys_on_shard(1, 2, 1, "die1-")[0]
    conns = [redis.Redis(port=port, socket_timeout=30) for _ in range(16)]
    by_pid: dict[int, list[redis.Redis]] = {}
    for conn in conns:
        by_pid.setdefault(_serving_pid(conn), []).append(conn)
    assert set(by_pid) <= set(pids.values())
    survivors = by_pid.get(pids[1], [])
    if not survivors:
        pytest.fail("no connection landed on worker 1 among 16 (SO_REUSEPORT should spread them)")
    survivor = survivors[0]
    survivor.set(k1, b"kept")
    os.kill(pids[0], signal.SIGKILL)
    # A connection on the surviving worker: its own keys never stop working; shard 0's keys are
    # refused (retryable) while it restarts, then served again by the restarted worker.
    assert survivor.get(k1) == b"kept"

    def shard0_back() -> bool:
        try:
            return bool(survivor.set(k0, b"again"))
        except redis.exceptions.TryAgainError:  # "-TRYAGAIN shard 0 is down ...": retryable
            return False
    wait_until(shard0_back, what="shard 0 served again after its worker restarted")
    assert survivor.get(k0) == b"again"
    with redis.Redis(port=port) as fresh:
        assert fresh.get(k1) == b"kept"
    for conn in conns:
        conn.close()


def test_single_keys_do_not_need_the_router(make_daemon, tmp_path):
    """Workers front: with the router stopped, single-key and multi-key commands for either shard are
    still served (applied by this worker or batched to the other); one that needs every shard waits."""
    d, port = _start(make_daemon, tmp_path, "workers")
    keys = [keys_on_shard(0, 2, 1, "rr0-")[0], keys_on_shard(1, 2, 1, "rr1-")[0]]
    with Client(d.endpoint) as c:
        router_pid = c.stats()["router"]["pid"]
    with redis.Redis(port=port, socket_timeout=60) as r, redis.Redis(port=port, socket_timeout=60) as other:
        r.mset(dict.fromkeys(keys, b"v"))
        got: dict = {}
        os.kill(router_pid, signal.SIGSTOP)
        try:
            for key in keys:
                assert r.set(key, b"during") is True
                assert r.get(key) == b"during"
            assert r.mget(keys) == [b"during", b"during"]  # split per shard in the worker
            waiting = threading.Thread(target=lambda: got.update(dbsize=other.dbsize()), daemon=True)
            waiting.start()
            waiting.join(0.2)
            assert waiting.is_alive(), f"DBSIZE answered while the router was stopped: {got}"
        finally:
            os.kill(router_pid, signal.SIGCONT)
        waiting.join(60)
        assert got == {"dbsize": 2}


@pytest.mark.parametrize("front", ["workers", "router"])
def test_a_pipeline_runs_in_order_across_paths(make_daemon, tmp_path, front):
    """Commands that take different paths (this worker, a peer, the router) still run in the order
    sent: MSET then GET of its keys, FLUSHALL then SET, DEL of several keys then EXISTS."""
    _, port = _start(make_daemon, tmp_path, front)
    keys = keys_on_shard(0, 2, 3, "path0-") + keys_on_shard(1, 2, 3, "path1-")
    with redis.Redis(port=port) as r:
        for _ in range(20):  # new connections land on either worker: both sides of every path
            with r.pipeline(transaction=False) as pipe:
                pipe.mset(dict.fromkeys(keys, b"one"))
                pipe.get(keys[0]).get(keys[-1])
                pipe.flushall()
                pipe.set(keys[1], b"two").get(keys[1]).get(keys[0])
                pipe.mset({keys[2]: b"x", keys[-2]: b"y"})
                pipe.delete(keys[2], keys[-2])
                pipe.exists(keys[2], keys[-2])
                got = pipe.execute()
            assert got == [True, b"one", b"one", True, True, b"two", None, True, 2, 0]
            r.connection_pool.disconnect()


def test_an_op_through_the_router_waits_for_the_connections_ops_on_peer_links(make_daemon, tmp_path):
    """Workers front, the window held open: worker 1 stopped while a connection on worker 0 sends
    MSET (its shard-1 part waits on the peer link) then FLUSHALL (through the router). The FLUSHALL
    must not leave before the MSET part is answered, or it could reach shard 1 first and the MSET
    part would survive it: so while worker 1 is stopped, shard 0's key is still there."""
    d, port = _start(make_daemon, tmp_path, "workers")
    pids = _worker_pids(d)
    k0, k1 = keys_on_shard(0, 2, 1, "defer0-")[0], keys_on_shard(1, 2, 1, "defer1-")[0]
    keep, conn = [], None
    for _ in range(64):
        s = _raw(port)
        if _info_pid(s) == pids[0]:
            conn = s
            break
        keep.append(s)
    assert conn is not None, "no connection landed on worker 0 in 64 tries"
    conn.sendall(_command(b"GET", k1))  # worker 0's link to worker 1 is made, and up, before the stop
    assert _read_exactly(conn, b"$-1\r\n") == b"$-1\r\n"
    os.kill(pids[1], signal.SIGSTOP)
    try:
        conn.sendall(_command(b"MSET", k0, b"x", k1, b"x") + _command(b"FLUSHALL") + _command(b"GET", k0))
        wait_until(lambda: _resp_commands(d).get("mset", 0) >= 1, what="worker 0 reading the pipeline")
        with Client(d.endpoint, timeout=30) as c:
            assert c.get(k0) == b"x", "FLUSHALL went ahead while the MSET part was still on its way"
    finally:
        os.kill(pids[1], signal.SIGCONT)
    conn.settimeout(60)
    expected = b"+OK\r\n+OK\r\n$-1\r\n"
    assert _read_exactly(conn, expected) == expected
    with Client(d.endpoint, timeout=30) as c:
        assert c.get_many([k0, k1]) == {}  # both flushed: the MSET part did not survive the FLUSHALL
    for s in [conn, *keep]:
        s.close()


def _resp_commands(d) -> dict[str, int]:
    with Client(d.endpoint, timeout=5) as c:
        return c.stats().get("resp", {}).get("by_command", {})
