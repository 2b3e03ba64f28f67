"""CURVE authentication against the real daemon: allowed keys in, others out, admin ops for admins."""

from __future__ import annotations

import os

import pytest

from shardd import load_curve
from shardd.client import Client
from shardd.errors import Forbidden, Timeout
from tests.helpers import run_cli


@pytest.fixture
def auth_dir(tmp_path):
    d = str(tmp_path / "keys")
    for args in (["--name", "admin"], ["--name", "app", "--client"], ["--name", "stranger", "--client"]):
        r = run_cli(None, "keys", "generate", d, *args)
        assert r.returncode == 0, r.stderr
    # "stranger" has a key pair but is not allowed in: remove it from clients/
    os.unlink(os.path.join(d, "clients", "stranger.key"))
    return d


def test_only_allowed_keys_get_in_and_only_admins_administer(make_daemon, auth_dir):
    d = make_daemon("--auth-dir", auth_dir, shards=2)
    with Client(d.endpoint, timeout=0.5) as anonymous, pytest.raises(Timeout):
        anonymous.get("k")  # no CURVE handshake: never answered
    with Client(d.endpoint, timeout=0.5, curve=load_curve(auth_dir, "stranger")) as c, pytest.raises(Timeout):
        c.get("k")  # a key the daemon does not list
    with Client(d.endpoint, timeout=30, curve=load_curve(auth_dir, "app")) as app:
        assert app.set("k", b"v") is True and app.get("k") == b"v"
        assert app.maintenance() is False  # asking is fine
        with pytest.raises(Forbidden, match="admin key"):
            app.flush()
        with pytest.raises(Forbidden):
            app.tune(mailbox_limit=10)
    with Client(d.endpoint, timeout=30, curve=load_curve(auth_dir, "admin"), direct=True) as admin:
        assert admin.get("k") == b"v"  # direct mode: the workers' own endpoints are secured too
        assert admin.set_many({f"x{i}": b"1" for i in range(20)}) == 20
        assert admin.flush() == 21
    with Client(d.endpoint, timeout=0.5, direct=True) as anonymous, pytest.raises(Timeout):
        anonymous.get("k")


def test_auth_allows_remote_binds_and_the_cli_uses_shardd_keys(make_daemon, auth_dir):
    d = make_daemon("--auth-dir", auth_dir, shards=1)
    r = run_cli(d.endpoint, "set", "a", "b", env={**os.environ, "SHARDD_KEYS": auth_dir})
    assert r.returncode == 0, r.stderr
    r = run_cli(None, "check-config", "/dev/stdin", input=f'bind = "tcp://0.0.0.0:7499"\nauth_dir = "{auth_dir}"\n')
    assert r.returncode == 0, r.stderr  # protected mode is satisfied by authentication


def test_a_missing_auth_dir_is_a_clear_start_up_error(tmp_path):
    r = run_cli(None, "serve", "--auth-dir", str(tmp_path / "nope"), "--bind", "tcp://127.0.0.1:7498",
                "--runtime-dir", str(tmp_path / "run"))
    assert r.returncode == 2
    assert "auth_dir" in r.stderr and "shardd keys generate" in r.stderr


def test_the_invalidation_feeds_are_secured_too(make_daemon, auth_dir):
    """Near caches under CURVE: an allowed client follows the feeds (hot keys served locally,
    another client's write seen), a subscriber without keys hears nothing, not even heartbeats."""
    import time

    import zmq

    d = make_daemon("--auth-dir", auth_dir, shards=1)
    with Client(d.endpoint, timeout=30, curve=load_curve(auth_dir, "app")) as app, \
            Client(d.endpoint, timeout=30, curve=load_curve(auth_dir, "admin")) as other:
        app.set("hot", b"v1")
        deadline = time.monotonic() + 60
        while app.near_cache_stats()["admitted"] < 1:  # read until the shard marks it and the copy is kept
            assert time.monotonic() < deadline, app.near_cache_stats()
            assert app.get("hot") == b"v1"
        while app.near_cache_stats()["hits"] < 1:  # then served locally (once the feed has spoken lately)
            assert time.monotonic() < deadline, app.near_cache_stats()
            assert app.get("hot") == b"v1"
        assert other.set("hot", b"v2") is True
        while app.get("hot") != b"v2":  # the invalidation arrives over the secured feed
            assert time.monotonic() < deadline, app.near_cache_stats()
        assert app.near_cache_stats()["invalidations"] >= 1
        feeds = [e for e in other.topology()["invalidations"] if e]
    assert feeds
    sock = zmq.Context.instance().socket(zmq.SUB)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(feeds[0])
        assert not sock.poll(2000)  # heartbeats go out every 0.1 s, to authenticated subscribers only
    finally:
        sock.close(0)
