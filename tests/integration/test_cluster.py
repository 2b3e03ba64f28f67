"""A cluster on one machine: a real etcd and real shardd nodes (docs/cluster.md).

Each test starts its own etcd (tests.etcd_server) and nodes (tests.cluster_harness); clients
talk to the nodes over real sockets. Failures are made on purpose (SIGKILL, SIGSTOP, etcd
restarted) and held open while the test looks; nothing here asserts a duration.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from shardd import Client, ClusterClient
from shardd import protocol as p
from shardd.errors import SharddError
from shardd.slots import slot_of
from tests.cluster_harness import Cluster
from tests.helpers import run_cli, wait_until


@pytest.fixture
def cluster(tmp_path: Path, etcd_server) -> Cluster:
    c = Cluster(tmp_path, etcd_server.endpoint, ttl=3)
    c.etcd_server = etcd_server  # type: ignore[attr-defined]
    yield c
    c.close()


def owner_of(smap, key: bytes) -> str:
    return smap.nodes[smap.owners[slot_of(key)]].id


class Traffic:
    """A client thread writing and reading its own keys until stopped: every acknowledged write
    is remembered with its value, every error counted (the client retries MOVED, TRYAGAIN and a
    dead node's timeouts itself: an error here is one the user would see)."""

    def __init__(self, seeds: list[str], prefix: str, keys: int = 300) -> None:
        self.seeds, self.prefix, self.keys = seeds, prefix, keys
        self.acked: dict[bytes, bytes] = {}
        self.errors: list[str] = []
        self.stale_reads = 0
        self.ops = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        wait_until(lambda: self.ops > 50, what="traffic to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        with ClusterClient(self.seeds, timeout=5.0, failover_timeout=30.0) as client:
            i = 0
            while not self._stop.is_set():
                key = f"{self.prefix}{i % self.keys}".encode()
                value = f"v{i}".encode()
                try:
                    client.set(key, value)
                    self.acked[key] = value
                    got = client.get(key)
                    if got != value:
                        self.stale_reads += 1
                except SharddError as exc:
                    self.errors.append(repr(exc))
                self.ops += 1
                i += 1


def load(seeds: list[str], n: int, prefix: str = "k") -> dict[bytes, bytes]:
    data = {f"{prefix}{i}".encode(): f"value-{i}".encode() for i in range(n)}
    with ClusterClient(seeds, timeout=10.0) as client:
        items = list(data.items())
        for at in range(0, len(items), 1000):
            client.set_many(items[at:at + 1000])
    return data


def test_join_moves_about_its_share_and_loses_nothing(cluster: Cluster) -> None:
    a = cluster.add()
    cluster.settled()
    data = load([a.endpoint], 20_000)
    with Traffic([a.endpoint], "t") as traffic:
        for n in (2, 3):
            before = cluster.keys_per_node()
            cluster.add()
            smap = cluster.settled()
            after = cluster.keys_per_node()
            moved = sum(before.values()) - sum(after[e] for e in before)
            # ~1/n of the keys move to the new node, and only to it (HRW); loose bounds: 20k keys
            assert 0.5 / n < moved / sum(before.values()) < 1.5 / n, (before, after)
            assert len(smap.nodes) == n
    assert traffic.errors == [] and traffic.stale_reads == 0
    with ClusterClient([a.endpoint], timeout=10.0) as client:
        keys = list(data)
        got = client.get_many(keys)
        assert got == data  # every key readable, with its value, on its new owner
        assert all(client.get(k) == v for k, v in traffic.acked.items())
    # each key is on its slot's owner: a node answers MOVED for keys it does not own
    smap = cluster.settled()
    key = next(k for k in data if owner_of(smap, k) != a.endpoint)
    with Client(a.endpoint, timeout=5.0) as raw, pytest.raises(SharddError) as moved:
        raw.get(key)
    assert moved.value.status == p.MOVED  # type: ignore[attr-defined]


def test_graceful_leave_under_load_loses_no_acknowledged_write(cluster: Cluster) -> None:
    nodes = [cluster.add() for _ in range(3)]
    cluster.settled()
    data = load([nodes[0].endpoint], 6_000)
    with Traffic([nodes[0].endpoint], "w") as traffic:
        assert nodes[2].stop(timeout=120) == 0  # SIGTERM: hand off, then stop
        smap = cluster.settled(nodes[:2])
        ops_after = traffic.ops
        wait_until(lambda: traffic.ops > ops_after + 50, what="traffic on two nodes")
    assert nodes[2].endpoint not in {n.id for n in smap.nodes}
    assert "left the cluster" in nodes[2].log()
    assert traffic.errors == [] and traffic.stale_reads == 0
    with ClusterClient([nodes[0].endpoint], timeout=10.0) as client:
        assert client.get_many(list(data)) == data
        assert client.get_many(list(traffic.acked)) == traffic.acked


def test_sigkill_a_node_its_slots_move_and_only_its_keys_are_lost(cluster: Cluster) -> None:
    nodes = [cluster.add() for _ in range(3)]
    smap = cluster.settled()
    data = load([nodes[0].endpoint], 3_000)
    # the victim is the controller: another node must take over to publish the next map
    victim = next(n for n in nodes if "this node is the cluster controller now" in n.log())
    survivors = [n for n in nodes if n is not victim]
    doomed = {k for k in data if owner_of(smap, k) == victim.endpoint}
    assert doomed and len(doomed) < len(data)
    errors: list[bytes] = []
    stop = threading.Event()

    def read_everything() -> None:
        # a short failover budget, so that errors show: they must be for the dead node's keys only
        with ClusterClient([survivors[0].endpoint], timeout=1.0, failover_timeout=0.3) as client:
            keys = list(data)
            i = 0
            while not stop.is_set():
                key = keys[i % len(keys)]
                i += 1
                try:
                    client.get(key)
                except SharddError:
                    errors.append(key)

    reader = threading.Thread(target=read_everything)
    reader.start()
    try:
        with ClusterClient([survivors[0].endpoint], timeout=1.0, failover_timeout=0.3) as probe:
            probe.get(next(iter(doomed)))  # (connected and mapped before the kill)
            victim.kill_all()  # SIGKILL the whole node: no handoff
            # Right after the kill its slots have an owner that is gone for at least a lease TTL
            # (3 s): a read of its key fails here, whatever the reader thread got to do on a busy box.
            try:
                probe.get(next(iter(doomed)))
            except SharddError:
                errors.append(next(iter(doomed)))
        after = cluster.settled(survivors)
    finally:
        stop.set()
        reader.join(60)
    assert victim.endpoint not in {n.id for n in after.nodes}
    # (the node is gone for at least a lease TTL, 3 s, ten times the reader's failover budget)
    assert errors, "reads of the dead node's keys should have failed while its slots had no owner"
    assert set(errors) <= doomed, "a key of a live node failed"
    assert any("this node is the cluster controller now" in n.log() for n in survivors)
    with ClusterClient([survivors[0].endpoint], timeout=10.0) as client:
        got = client.get_many(list(data))
    assert got == {k: v for k, v in data.items() if k not in doomed}  # only the dead node's keys miss
    # writes to the dead node's slots work again, on their new owners
    with ClusterClient([survivors[1].endpoint], timeout=10.0) as client:
        for key in list(doomed)[:50]:
            client.set(key, b"again")
            assert client.get(key) == b"again"


def test_a_stale_map_reaches_the_owner_after_one_moved(cluster: Cluster) -> None:
    a = cluster.add()
    cluster.settled()
    data = load([a.endpoint], 2_000)
    client = ClusterClient([a.endpoint], timeout=10.0)
    try:
        assert client.get(b"k1") == data[b"k1"]  # learns the one-node map
        old_epoch = client.cluster_map.epoch
        b = cluster.add()
        smap = cluster.settled()
        moved_key = next(k for k in data if owner_of(smap, k) == b.endpoint)
        redirects = client.redirects
        assert client.get(moved_key) == data[moved_key]
        assert client.redirects == redirects + 1  # exactly one MOVED, then the right node
        assert client.cluster_map.epoch > old_epoch
        # and without following it: the old owner's MOVED names the new owner and a newer epoch
        with Client(a.endpoint, timeout=5.0) as raw:
            reply = raw._exchange(raw._link, p.Get(moved_key), a.endpoint)
        assert reply.status == p.MOVED
        assert reply.value["endpoint"] == b.endpoint and reply.value["epoch"] >= smap.epoch
    finally:
        client.close()


def test_etcd_restarted_watches_resume_and_the_map_stays_right(cluster: Cluster) -> None:
    nodes = [cluster.add() for _ in range(2)]
    before = cluster.settled()
    data = load([nodes[0].endpoint], 2_000)
    cluster.etcd_server.restart()  # type: ignore[attr-defined]
    # the map survived; a node joining now is seen only if every agent's watch came back
    third = cluster.add()
    after = cluster.settled()
    assert after.epoch > before.epoch and third.endpoint in {n.id for n in after.nodes}
    with ClusterClient([nodes[1].endpoint], timeout=10.0) as client:
        assert client.get_many(list(data)) == data


def test_a_frozen_node_acknowledges_nothing_for_slots_it_lost(cluster: Cluster) -> None:
    a, b = cluster.add(), cluster.add()
    smap = cluster.settled()
    key = next(f"f{i}".encode() for i in range(10_000) if owner_of(smap, f"f{i}".encode()) == b.endpoint)
    with ClusterClient([a.endpoint], timeout=10.0) as client:
        client.set(key, b"before")
    raw = Client(b.endpoint, timeout=120.0)
    frozen = cluster.freeze(b)  # the whole node, agent included: its lease will lapse
    try:
        # A write sent to the frozen node waits in its socket while the cluster moves on.
        result: dict[str, object] = {}

        def stale_write() -> None:
            try:
                raw.set(key, b"stale")
                result["reply"] = "OK"
            except SharddError as exc:
                result["reply"] = exc

        writer = threading.Thread(target=stale_write)
        writer.start()
        wait_until(lambda: (m := cluster.map_of(a)) is not None and b.endpoint not in {n.id for n in m.nodes},
                   timeout=60, what="the cluster to drop the frozen node")
        with ClusterClient([a.endpoint], timeout=10.0) as client:
            client.set(key, b"fresh")  # on its new owner, a
    finally:
        cluster.thaw(frozen)
    writer.join(120)
    assert not writer.is_alive()
    reply = result["reply"]
    assert reply != "OK", "a node whose lease lapsed acknowledged a write"
    assert reply.status in (p.UNAVAILABLE, p.MOVED)  # type: ignore[union-attr]
    raw.close()
    # b comes back as a new incarnation: it serves nothing stale, and gets its slots back by handoff
    smap = cluster.settled([a, b])
    assert b.endpoint in {n.id for n in smap.nodes}
    with ClusterClient([a.endpoint], timeout=10.0) as client:
        assert client.get(key) == b"fresh"


def test_cluster_status_cli(cluster: Cluster) -> None:
    a, b = cluster.add(), cluster.add()
    cluster.settled()
    data = load([a.endpoint], 1_000)
    out = run_cli(a.endpoint, "cluster", "status", "--json")
    report = json.loads(out.stdout)
    assert report["epoch"] >= 1 and report["handoffs_pending"] == 0
    assert {row["id"] for row in report["nodes"]} == {a.endpoint, b.endpoint}
    assert sum(row["slots"] for row in report["nodes"]) == 4096
    assert sum(row["keys"] for row in report["nodes"]) == 1_000
    text = run_cli(a.endpoint, "cluster", "status").stdout
    assert "epoch" in text and a.endpoint[:28] in text
    # the data commands follow the map: a key owned by b, through a
    smap = cluster.settled()
    key = next(f"cli{i}" for i in range(10_000) if owner_of(smap, f"cli{i}".encode()) == b.endpoint)
    assert run_cli(a.endpoint, "set", key, "from-the-cli").returncode == 0
    assert run_cli(a.endpoint, "get", key).stdout == "from-the-cli\n"
    assert run_cli(b.endpoint, "get", key).stdout == "from-the-cli\n"
    assert run_cli(a.endpoint, "del", key).returncode == 0
    # leave through the CLI: the node hands its slots off and stops with exit code 0
    run_cli(b.endpoint, "cluster", "leave")
    assert b.proc.wait(120) == 0
    smap = cluster.settled([a])
    assert {n.id for n in smap.nodes} == {a.endpoint}
    with ClusterClient([a.endpoint], timeout=10.0) as client:
        assert client.get_many(list(data)) == data


def test_a_single_node_is_not_a_cluster(make_daemon) -> None:
    d = make_daemon()
    with pytest.raises(SharddError):
        ClusterClient([d.endpoint], timeout=2.0).get(b"k")
    out = run_cli(d.endpoint, "cluster", "status")
    assert out.returncode == 1 and "not a cluster node" in out.stderr


def test_curve_between_clients_and_nodes_and_between_nodes(tmp_path: Path, etcd_server) -> None:
    from shardd import load_curve

    keys = tmp_path / "keys"
    assert run_cli(None, "keys", "generate", str(keys)).returncode == 0
    assert run_cli(None, "keys", "generate", str(keys), "--name", "client", "--client").returncode == 0
    cluster = Cluster(tmp_path, etcd_server.endpoint, ttl=3, auth_dir=str(keys))
    try:
        a = cluster.add()
        cluster.settled()
        data = {f"c{i}".encode(): b"secret" for i in range(500)}
        client_key = load_curve(str(keys), "client")
        with ClusterClient([a.endpoint], timeout=10.0, curve=client_key) as client:
            client.set_many(list(data.items()))
        cluster.add()  # the handoff to it is node to node: only with the shared admin key
        smap = cluster.settled()
        assert len(smap.nodes) == 2 and sum(cluster.keys_per_node().values()) == 500
        with ClusterClient([a.endpoint], timeout=10.0, curve=client_key) as client:
            assert client.get_many(list(data)) == data
        # without a key nothing is answered (a CURVE server ignores a plain client)
        with pytest.raises(SharddError):
            ClusterClient([a.endpoint], timeout=1.0, failover_timeout=1.0).get(b"c1")
    finally:
        cluster.close()


def test_with_replicas_a_killed_nodes_keys_survive_on_its_replica(tmp_path: Path, etcd_server) -> None:
    cluster = Cluster(tmp_path, etcd_server.endpoint, ttl=3, replicas=1)
    try:
        nodes = [cluster.add() for _ in range(3)]
        smap = cluster.settled()
        pairs = zip(smap.replicas, smap.owners, strict=True)
        assert len(smap.replicas) == 4096 and all(r >= 0 and r != o for r, o in pairs)
        data = load([nodes[0].endpoint], 3_000)
        deleted = list(data)[:100]
        with ClusterClient([nodes[0].endpoint], timeout=10.0) as client:
            client.delete_many(deleted)  # deletes stream too
        for key in deleted:
            del data[key]
        # every key is on its owner and on its replica once the stream has caught up
        wait_until(lambda: sum(cluster.keys_per_node().values()) == 2 * len(data), timeout=60,
                   what="every key on two nodes")
        victim = nodes[2]
        doomed = {k for k in data if owner_of(smap, k) == victim.endpoint}
        assert doomed
        victim.kill_all()
        cluster.settled(nodes[:2])
        with ClusterClient([nodes[0].endpoint], timeout=10.0) as client:
            assert client.get_many(list(data)) == data  # the dead node's keys too: its replicas were promoted
            gone = [k for k in deleted if owner_of(smap, k) == victim.endpoint]
            assert gone and client.get_many(gone) == {}  # deleted on the dead owner: still deleted
        # the two survivors copy each other's slots again: two copies of every key
        wait_until(lambda: sum(cluster.keys_per_node().values()) == 2 * len(data), timeout=60,
                   what="replicas re-made after the failover")
    finally:
        cluster.close()


def test_a_node_whose_etcd_is_unreachable_serves_nothing_and_says_why(tmp_path: Path) -> None:
    from tests.conftest import free_port

    cluster = Cluster(tmp_path, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    try:
        node = cluster.add()  # the daemon starts (ping answers); its agent keeps trying etcd
        node.wait_for_log("cannot reach etcd")
        with Client(node.endpoint, timeout=5.0) as raw, pytest.raises(SharddError) as refused:
            raw.set(b"k", b"v")
        assert refused.value.status == p.UNAVAILABLE and "no slot map yet" in str(refused.value)  # type: ignore[attr-defined]
        out = run_cli(node.endpoint, "get", "k")
        assert out.returncode == 1 and "slot map" in out.stderr
        assert node.stop() == 0  # SIGTERM: a node that never joined leaves at once
    finally:
        cluster.close()


def test_keys_go_straight_to_the_owning_worker_of_the_owning_node(cluster: Cluster) -> None:
    a, b = cluster.add(), cluster.add()
    cluster.settled()

    def routed() -> int:
        total = 0
        for node in (a, b):
            with Client(node.endpoint, timeout=5.0) as raw:
                total += raw.stats()["router"]["requests"]
        return total

    with ClusterClient([a.endpoint], timeout=5.0) as client:
        client.set(b"warm-up", b"1")  # learns the map and each node's workers
        client.get(b"warm-up")
        before = routed()
        for i in range(200):
            client.set(f"d{i}".encode(), b"v")
            assert client.get(f"d{i}".encode()) == b"v"
        after = routed()
    # 400 keyed ops on two nodes; the routers saw only the stats calls and a topology or two
    assert after - before < 20, (before, after)
    with ClusterClient([a.endpoint], timeout=5.0, direct=False) as client:
        assert client.get(b"d7") == b"v"
