"""The README's Python example runs as written against a real daemon.

Only the endpoint is changed (the test daemon has a port of its own), and the shown results
that the block itself can check are checked.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _block(marker: str) -> str:
    """The README's Python block that contains ``marker``."""
    (code,) = [block for block in _python_blocks() if marker in block]
    return code


def test_readme_python_example_runs(make_daemon):
    blocks = _python_blocks()
    assert len(blocks) == 3, "three Python examples expected (a daemon, Redis clients, a cluster): update this test"
    code = _block("shardd.Client(")
    assert '"tcp://127.0.0.1:7400"' in code
    d = make_daemon(shards=2)
    namespace: dict = {}
    exec(compile(code.replace('"tcp://127.0.0.1:7400"', repr(d.endpoint)), str(README), "exec"), namespace)
    assert namespace["results"] == [True, b"1"]  # as the comment in the README says
    assert namespace["value"] == b"v1"

    import shardd

    with shardd.Client(d.endpoint, timeout=1.0) as cache:
        assert cache.get("cfg") == b"v2"  # the example's CAS stored
        assert cache.get("hits") == b"-1"


def test_readme_cluster_example_runs(tmp_path, etcd_server):
    """The "Run a cluster" example, against two real nodes with the README's CURVE set-up."""
    from tests.cluster_harness import Cluster
    from tests.helpers import run_cli

    code = _block("ClusterClient")
    keys = tmp_path / "keys"
    assert run_cli(None, "keys", "generate", str(keys)).returncode == 0
    assert run_cli(None, "keys", "generate", str(keys), "--name", "app", "--client").returncode == 0
    cluster = Cluster(tmp_path, etcd_server.endpoint, auth_dir=str(keys))
    try:
        a, b = cluster.add(), cluster.add()
        cluster.settled()
        code = (code.replace('"tcp://10.0.0.1:7400"', repr(a.endpoint))
                .replace('"tcp://10.0.0.2:7400"', repr(b.endpoint))
                .replace('"/etc/shardd/keys"', repr(str(keys))))
        namespace: dict = {}
        exec(compile(code, str(README), "exec"), namespace)
        assert namespace["client"].get("user:1") == b"alice"
        namespace["client"].close()
    finally:
        cluster.close()


def test_readme_redis_client_example_runs(make_daemon, tmp_path):
    """"Use it from any Redis client": the redis-py block, against a daemon with resp_bind."""

    from tests.conftest import free_port
    from tests.resp_support import wait_resp

    code = _block("redis.Redis(")
    port = free_port()
    config = tmp_path / "resp.toml"
    config.write_text(f'resp_bind = "tcp://127.0.0.1:{port}"\n')
    d = make_daemon(shards=2, config=str(config))
    wait_resp(port)
    assert "port=6380" in code
    namespace: dict = {}
    exec(compile(code.replace("port=6380", f"port={port}"), str(README), "exec"), namespace)
    cache = namespace["cache"]
    assert cache.mget("user:42", "nope") == [b"...", None]  # as the comment in the README says
    assert 0 < cache.ttl("user:42") <= 60
    import shardd

    with shardd.Client(d.endpoint, timeout=1.0) as native:  # the same keys through the native endpoint
        assert native.get("user:42") == b"..."
    cache.close()
