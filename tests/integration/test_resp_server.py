"""The RESP endpoint's own behaviour on a real daemon: transactions (queue-and-run), maxclients,
the counters in stats, INFO and /metrics, and the config checks that keep it safe."""

from __future__ import annotations

import socket
import urllib.request

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from shardd.client import Client
from shardd.config import build_config
from shardd.errors import ConfigError
from tests.conftest import free_port
from tests.helpers import keys_on_shard, run_cli
from tests.resp_support import wait_resp


def _start(make_daemon, tmp_path, text: str = "", shards: int = 2):
    port = free_port()
    config = tmp_path / f"resp-{port}.toml"
    config.write_text(f'resp_bind = "tcp://127.0.0.1:{port}"\n{text}')
    d = make_daemon(shards=shards, config=str(config))
    wait_resp(port)
    return d, port


@pytest.mark.parametrize("front", ["workers", "router"])
def test_multi_exec_queues_and_runs_in_order(make_daemon, tmp_path, front):
    _, port = _start(make_daemon, tmp_path, f'resp_front = "{front}"\n')
    keys = keys_on_shard(0, 2, 2, "tx0-") + keys_on_shard(1, 2, 2, "tx1-")
    with redis.Redis(port=port) as r:
        with r.pipeline(transaction=True) as pipe:  # MULTI ... EXEC, as Django's set_many sends
            pipe.mset(dict.fromkeys(keys, b"v"))
            for key in keys:
                pipe.expire(key, 100)
            pipe.incr(keys[0] + b"n")
            pipe.get(keys[3])
            pipe.mget(keys)
            results = pipe.execute()
        assert results == [True, True, True, True, True, 1, b"v", [b"v"] * 4]
        assert all(0 < r.ttl(key) <= 100 for key in keys)
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        try:
            raw.sendall(b"MULTI\r\nSET a 1\r\nNOPE x\r\nEXEC\r\nEXEC\r\nDISCARD\r\nMULTI\r\nMULTI\r\nDISCARD\r\n"
                        b"GET a\r\nWATCH a\r\n")
            expected = (b"+OK\r\n+QUEUED\r\n-ERR unknown command 'NOPE', with args beginning with: 'x' \r\n"
                        b"-EXECABORT Transaction discarded because of previous errors.\r\n"
                        b"-ERR EXEC without MULTI\r\n-ERR DISCARD without MULTI\r\n+OK\r\n"
                        b"-ERR MULTI calls can not be nested\r\n+OK\r\n$-1\r\n")
            got = b""
            while not got.endswith(b"isolation here\r\n"):
                chunk = raw.recv(65536)
                assert chunk, got
                got += chunk
            assert got.startswith(expected), got
            assert got[len(expected):].startswith(b"-ERR WATCH is not supported")
        finally:
            raw.close()


def test_max_clients(make_daemon, tmp_path):
    # One serving process (the router front) so that the limit is one number to reach.
    _, port = _start(make_daemon, tmp_path, 'resp_front = "router"\nresp_max_clients = 2\n')
    held = [redis.Redis(port=port) for _ in range(2)]
    for conn in held:
        conn.ping()
    third = socket.create_connection(("127.0.0.1", port), timeout=30)
    got = b""
    while not got.endswith(b"\r\n"):
        chunk = third.recv(1024)
        if not chunk:
            break
        got += chunk
    assert got == b"-ERR max number of clients reached\r\n"
    third.close()
    held[0].close()
    wait_resp(port)  # a free slot once a client left
    held[1].close()


def test_counters_in_stats_info_and_metrics(make_daemon, tmp_path):
    metrics_port = free_port()
    d, port = _start(make_daemon, tmp_path, f'metrics_bind = "127.0.0.1:{metrics_port}"\nresp_front = "workers"\n')
    conns = [redis.Redis(port=port) for _ in range(6)]
    for i, conn in enumerate(conns):
        conn.set(f"c{i}", "v")
        conn.get(f"c{i}")
        with pytest.raises(redis.ResponseError):
            conn.incr(f"c{i}")  # not an integer: an error reply
    with Client(d.endpoint, timeout=5) as c:
        resp = c.stats()["resp"]
    # Summed over every worker serving connections (the workers front).
    assert resp["connections"] == 6 and resp["processes"] == 2
    assert resp["by_command"]["set"] == 6 and resp["by_command"]["get"] == 6 and resp["by_command"]["incrby"] == 6
    # (redis-py sends INCR as INCRBY; its CLIENT MAINT_NOTIFICATIONS probe is refused as by Redis 7.0)
    assert resp["errors_by_command"]["incrby"] == 6
    info = conns[0].info()
    assert info["connected_clients"] == 6 and info["cluster_enabled"] == 0
    assert info["db0"]["keys"] == 6
    assert conns[0].info("commandstats")["cmdstat_incrby"]["failed_calls"] == 6
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("shardd_resp_connections", ())] == 6
    assert samples[("shardd_resp_commands_total", (("command", "incrby"),))] == 6
    assert samples[("shardd_resp_errors_total", (("command", "incrby"),))] == 6
    out = run_cli(d.endpoint, "stats").stdout
    assert "RESP tcp://127.0.0.1:" in out and "6 connections" in out
    for conn in conns:
        conn.close()


def test_config_keeps_the_endpoint_safe():
    with pytest.raises(ConfigError, match="resp_password"):
        build_config({"resp_bind": "tcp://0.0.0.0:6380"})  # protected mode
    assert build_config({"resp_bind": "tcp://0.0.0.0:6380", "resp_password": "s3cret"}).resp_password == "s3cret"
    with pytest.raises(ConfigError, match="cluster mode"):
        build_config({"resp_bind": "tcp://127.0.0.1:6380", "cluster_etcd": ["http://127.0.0.1:2379"],
                      "cluster_advertise": "tcp://127.0.0.1:7400"})
    with pytest.raises(ConfigError, match="tcp://HOST:PORT"):
        build_config({"resp_bind": "ipc:///tmp/x.sock"})
    with pytest.raises(ConfigError, match="resp_front"):
        build_config({"resp_bind": "tcp://127.0.0.1:6380", "resp_front": "gateways"})


def test_a_deep_pipeline_waits_and_a_protocol_error_comes_last(make_daemon, tmp_path):
    """mailbox_limit 16: the endpoint keeps at most 16 ops in flight, so a 300-command pipeline runs
    in slices from its backlog (never BUSY), and the protocol error read after it is answered after
    all 300 replies, then the connection closes (as Redis: replies before the error, then close)."""
    _, port = _start(make_daemon, tmp_path, 'resp_front = "router"\nmailbox_limit = 16\n')
    keys = keys_on_shard(0, 2, 150, "deep0-") + keys_on_shard(1, 2, 150, "deep1-")
    with redis.Redis(port=port) as r:
        r.mset(dict.fromkeys(keys, b"v"))
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        s.sendall(b"".join(b"GET %s\r\n" % key for key in keys) + b"*1\r\n$-1\r\n")
        got = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    finally:
        s.close()
    assert got == b"$1\r\nv\r\n" * len(keys) + b"-ERR Protocol error: invalid bulk length\r\n"
