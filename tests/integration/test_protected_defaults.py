"""Protected defaults against the real daemon: no unauthenticated remote bind, private ipc files."""

from __future__ import annotations

import os
import stat
import subprocess

from shardd.client import Client
from tests.conftest import REPO, free_port
from tests.helpers import assert_one_message, run_cli


def _serve(*args: str) -> subprocess.CompletedProcess:
    return run_cli(None, "serve", *args, cwd=REPO)


def test_remote_bind_without_auth_is_refused_with_exit_2(tmp_path):
    port = free_port()
    r = _serve("--bind", f"tcp://0.0.0.0:{port}", "--shards", "1", "--runtime-dir", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    assert_one_message(r.stderr, "allow_remote_without_auth", "0.0.0.0")
    assert not (tmp_path / "run").exists()  # refused before anything was created or bound
    cfg = tmp_path / "remote.toml"
    cfg.write_text(f'bind = "tcp://0.0.0.0:{port}"\n')
    r = run_cli(None, "check-config", str(cfg), cwd=REPO)
    assert r.returncode == 2 and "allow_remote_without_auth" in r.stderr and "Traceback" not in r.stderr


def test_remote_bind_is_served_when_explicitly_allowed(make_daemon, tmp_path):
    port = free_port()
    cfg = tmp_path / "open.toml"
    cfg.write_text("allow_remote_without_auth = true  # trusted network\n")
    # The last --bind wins over the fixture's loopback one.
    d = make_daemon("--bind", f"tcp://0.0.0.0:{port}", shards=1, config=str(cfg), wait=False)
    d.endpoint = f"tcp://127.0.0.1:{port}"
    d.wait_ready()
    with Client(d.endpoint, timeout=30) as c:
        assert c.ping() == 1


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_runtime_dir_and_ipc_sockets_are_private(make_daemon, tmp_path):
    public = tmp_path / "public.sock"
    old_umask = os.umask(0)  # the daemon must not depend on a careful umask
    try:
        d = make_daemon("--bind", f"ipc://{public}", shards=2, wait=False)
    finally:
        os.umask(old_umask)
    d.endpoint = f"ipc://{public}"
    d.wait_ready()
    assert _mode(d.runtime_dir) == 0o700
    sockets = sorted(d.runtime_dir.glob("*.ipc"))
    assert {s.name for s in sockets} >= {"router.ipc", "shard-0.ipc", "shard-1.ipc"}
    for sock in sockets:
        assert stat.S_ISSOCK(os.stat(sock).st_mode)
        assert _mode(sock) == 0o600, (sock, oct(_mode(sock)))
    # The public ipc endpoint admits the daemon's group (to grant local clients access), never others.
    assert _mode(public) == 0o660, oct(_mode(public))
    with Client(d.endpoint, timeout=30) as c:
        assert c.ping() == 2


def test_world_writable_runtime_dir_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    r = _serve("--bind", f"tcp://127.0.0.1:{free_port()}", "--shards", "1", "--runtime-dir", str(shared))
    assert r.returncode == 3, r.stderr
    assert "writable by other users" in r.stderr
    assert list(shared.iterdir()) == []
