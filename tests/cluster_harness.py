"""A real cluster on one machine for tests and bench scripts: one etcd and N shardd nodes.

Every node is a whole ``shardd serve`` process tree (tests.conftest.Daemon) on its own free
port, configured with ``cluster_etcd``. Waits are on states read from the nodes (the map they
installed), never on bare sleeps; every timeout is a deadline against a hang.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil

from shardd.client import Client
from shardd.errors import SharddError
from shardd.slots import SlotMap
from tests.conftest import Daemon

__all__ = ["Cluster"]


class Cluster:
    """``add()`` starts a node; ``settled(nodes)`` waits until the map has exactly those nodes,
    no handoff pending, and every one of them serves that epoch."""

    def __init__(self, tmp: Path, etcd_endpoint: str, ttl: int = 3, shards: int = 2, leave_timeout: float = 60,
                 auth_dir: str | None = None, replicas: int = 0) -> None:
        self.tmp = tmp
        self.replicas = replicas
        self.auth_dir = auth_dir  # CURVE on (every node shares the keys); the harness talks as admin
        self.curve: Any = None
        if auth_dir is not None:
            from shardd import load_curve

            self.curve = load_curve(auth_dir, "admin")
        self.etcd = etcd_endpoint
        self.ttl = ttl
        self.shards = shards
        self.leave_timeout = leave_timeout
        self.nodes: list[Daemon] = []

    def add(self, wait: bool = True) -> Daemon:
        path = self.tmp / f"node{len(self.nodes)}"
        path.mkdir()
        config = path / "cluster.toml"
        config.write_text(f'cluster_etcd = ["{self.etcd}"]\ncluster_name = "test"\n'
                          f"cluster_lease_ttl = {self.ttl}\ncluster_leave_timeout = {self.leave_timeout}\n"
                          f"pin_cpus = false\ncluster_replicas = {self.replicas}\n")
        args = ("--auth-dir", self.auth_dir) if self.auth_dir else ()
        node = Daemon(path, *args, shards=self.shards, config=str(config))
        self.nodes.append(node)
        return node.start(wait=wait)

    @property
    def live(self) -> list[Daemon]:
        return [node for node in self.nodes if node.proc is not None and node.proc.poll() is None]

    def map_of(self, node: Daemon, timeout: float = 2.0) -> SlotMap | None:
        """The map ``node`` has installed (None if it has none or does not answer)."""
        try:
            with Client(node.endpoint, timeout=timeout, curve=self.curve) as client:
                cluster = client.topology().get("cluster") or {}
        except SharddError:
            return None
        raw = cluster.get("map")
        return SlotMap.from_wire(raw) if raw is not None else None

    def settled(self, nodes: list[Daemon] | None = None, timeout: float = 90.0) -> SlotMap:
        """Wait until every node in ``nodes`` (default: the live ones) has installed one map naming
        exactly them, with every slot owned and no handoff pending; return it."""
        nodes = self.live if nodes is None else nodes
        want = {node.endpoint for node in nodes}
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            maps = [self.map_of(node) for node in nodes]
            last = [(m.epoch, sorted(n.id for n in m.nodes), len(m.handoff)) if m else None for m in maps]
            if all(m is not None for m in maps):
                epochs = {m.epoch for m in maps}  # type: ignore[union-attr]
                first = maps[0]
                assert first is not None
                if (len(epochs) == 1 and {n.id for n in first.nodes} == want and not first.handoff
                        and -1 not in first.owners and self._serving(nodes)):
                    return first
            if time.monotonic() > deadline:
                logs = "\n".join(node.log()[-3000:] for node in nodes)
                raise AssertionError(f"cluster not settled on {sorted(want)} in {timeout}s: {last}\n{logs}")
            time.sleep(0.05)

    def _serving(self, nodes: list[Daemon]) -> bool:
        """Every node has a live lease (its router's cluster stats)."""
        for node in nodes:
            try:
                with Client(node.endpoint, timeout=2.0, curve=self.curve) as client:
                    if client.stats()["router"]["cluster"]["lease_left_s"] <= 0:
                        return False
            except SharddError:
                return False
        return True

    def keys_per_node(self) -> dict[str, int]:
        counts = {}
        for node in self.live:
            with Client(node.endpoint, timeout=5.0, curve=self.curve) as client:
                counts[node.endpoint] = client.stats()["total"]["keys"]
        return counts

    @staticmethod
    def tree(node: Daemon) -> list[psutil.Process]:
        """Every process of a node: the supervisor and its descendants."""
        assert node.proc is not None
        return [psutil.Process(node.proc.pid), *node.children()]

    def freeze(self, node: Daemon) -> list[psutil.Process]:
        procs = self.tree(node)
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                os.kill(proc.pid, signal.SIGSTOP)
        return procs

    @staticmethod
    def thaw(procs: list[psutil.Process]) -> None:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)

    def close(self) -> None:
        for node in self.nodes:
            try:
                if node.proc is not None and node.proc.poll() is None:
                    self.thaw(self.tree(node))
                    node.stop(timeout=self.leave_timeout + 30)
            except (AssertionError, psutil.NoSuchProcess):
                pass
            finally:
                node.kill_all()
