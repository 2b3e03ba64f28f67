"""The cluster client: its sans-IO policy (shardd.cluster_routing) driven by hand with a fake
clock, and ClusterClient / AsyncClusterClient over fake node connections.

Only the per-node I/O is fake. :class:`FakeCluster` plays the nodes as docs/cluster.md says
they behave (each serves the slots its own map gives it and answers MOVED for the others,
``topology`` returns its map); a test scripts the rest (TRYAGAIN, ask, UNAVAILABLE, a dead
node) per node. The policy and the real Client / AsyncClient request handling run unchanged:
the fake replaces only the sockets (``_dealer``) of the node clients; the last test puts the
fake nodes behind real ZeroMQ sockets and runs the unmodified classes.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest

from shardd import errors, protocol
from shardd.aclient import AsyncClient
from shardd.client import Client
from shardd.cluster_client import AsyncClusterClient, AsyncClusterPipeline, ClusterClient, ClusterPipeline
from shardd.cluster_routing import MAX_BACKOFF_S, MAX_REDIRECTS, ClusterRouting, Send, Sleep, backoff, needs_plan
from shardd.commands import COMMANDS
from shardd.slots import SLOTS, Node, SlotMap, slot_of

OK, MOVED, TRYAGAIN, UNAVAILABLE = protocol.OK, protocol.MOVED, protocol.TRYAGAIN, protocol.UNAVAILABLE
TIMEOUT = 0.5    # the fake clock's cost of a node that does not answer (sans-IO tests)
IO_TIMEOUT = 0.25  # the clients' I/O timeout here: a dead node costs this much (0.05 s failed beside a 2nd suite)
SILENT = object()  # a rule's answer: the node does not reply


def ep(name: str) -> str:
    return f"tcp://{name}:7400"


def make_map(epoch: int, names: list[str], owner: Callable[[int], int] | None = None,
             addr: Callable[[str], str] = ep) -> SlotMap:
    nodes = [Node(name, addr(name), 2) for name in sorted(names)]
    owners = [owner(s) if owner else s % len(nodes) for s in range(SLOTS)]
    return SlotMap(epoch, nodes, owners)


def moved_map(old: SlotMap, slots: set[int], to: str) -> SlotMap:
    """``old`` with ``slots`` given to node ``to``, one epoch later."""
    index = old.index_of(to)
    return SlotMap(old.epoch + 1, list(old.nodes), [index if s in slots else o for s, o in enumerate(old.owners)])


def without(old: SlotMap, dead: str) -> SlotMap:
    """The next map after node ``dead`` is gone: its slots to the next node, which starts empty."""
    nodes = [n for n in old.nodes if n.id != dead]
    index = {n.id: i for i, n in enumerate(nodes)}
    owners = [index[old.nodes[o].id] if old.nodes[o].id != dead else s % len(nodes) for s, o in enumerate(old.owners)]
    return SlotMap(old.epoch + 1, nodes, owners)


def key_on(smap: SlotMap, name: str, skip: int = 0) -> bytes:
    """A key whose slot ``smap`` gives to node ``name`` (the ``skip``-th such key)."""
    for i in range(100_000):
        key = f"k{i}".encode()
        owner = smap.owner_of(slot_of(key))
        if owner is not None and owner.id == name:
            if not skip:
                return key
            skip -= 1
    raise AssertionError(name)


class FakeNode:
    """One cluster node: its own map, its data, and rules a test adds to override its answers."""

    def __init__(self, name: str, smap: SlotMap, cluster: str = "c") -> None:
        self.name, self.map, self.cluster = name, smap, cluster
        self.data: dict[bytes, bytes] = {}
        self.dead = False  # requests get no reply (SIGKILLed, or unreachable)
        self.rules: list[Callable[[Any], Any]] = []  # each: op -> (status, value), SILENT or None (no opinion)
        self.received: list[Any] = []
        self.maintenance = False

    def answer(self, op: Any) -> Any:
        self.received.append(op)
        if self.dead:
            return SILENT
        for rule in self.rules:
            out = rule(op)
            if out is not None:
                return out
        keys = [op.key] if hasattr(op, "key") else list(op.keys) if hasattr(op, "keys") else \
            [k for k, _ in op.items] if hasattr(op, "items") else []
        for key in keys:
            slot = slot_of(key)
            owner = self.map.owner_of(slot)
            if owner is None or owner.id != self.name:
                return MOVED, {"epoch": self.map.epoch, "slot": slot, "node": owner.id if owner else None,
                               "endpoint": owner.endpoint if owner else None}
        return OK, self.apply(op)

    def apply(self, op: Any) -> Any:
        t, data = type(op), self.data
        if t is protocol.Get:
            return data.get(op.key)
        if t is protocol.Set:
            data[op.key] = op.value
            return True
        if t is protocol.Delete:
            return data.pop(op.key, None) is not None
        if t is protocol.Incr:
            value = int(data.get(op.key, b"0")) + op.delta
            data[op.key] = str(value).encode()
            return value
        if t is protocol.GetMany:
            return [data.get(k) for k in op.keys]
        if t is protocol.SetMany:
            data.update(op.items)
            return len(op.items)
        if t is protocol.DeleteMany:
            return sum(data.pop(k, None) is not None for k in op.keys)
        if t in (protocol.Ping, protocol.Tune):
            return 2
        if t is protocol.Flush:
            n = len(data)
            data.clear()
            return n
        if t is protocol.Stats:
            return {"keys": len(data)}
        if t is protocol.Health:
            return {"shards": ["ok", "ok"]}
        if t is protocol.Hotkeys:
            return {"window_s": 1.0, "keys": []}
        if t is protocol.Maintenance:
            if op.on is not None:
                self.maintenance = op.on
            return self.maintenance
        if t is protocol.Resize:
            return {"from": 2, "to": op.shards}
        if t is protocol.Topology:
            return {"shards": 2, "epoch": 1, "endpoints": ["ipc://w0", "ipc://w1"],
                    "cluster": {"name": self.cluster, "node": self.name, "map": self.map.to_wire()}}
        raise AssertionError(op)


class FakeCluster:
    """Nodes by endpoint. ``publish`` installs a new map on every live node (as the agents would)."""

    def __init__(self, names: tuple[str, ...] = ("a", "b", "c"), smap: SlotMap | None = None,
                 addr: Callable[[str], str] = ep) -> None:
        self.map = smap or make_map(1, list(names), addr=addr)
        self.addr = addr
        self.nodes = {addr(n): FakeNode(n, self.map) for n in names}

    def node(self, name: str) -> FakeNode:
        return self.nodes[self.addr(name)]

    def publish(self, smap: SlotMap) -> None:
        self.map = smap
        for node in self.nodes.values():
            if not node.dead:
                node.map = smap

    def exchange(self, endpoint: str, op: Any) -> Any:
        """(status, value), or SILENT."""
        node = self.nodes.get(endpoint)
        return SILENT if node is None else node.answer(op)

    def sent_to(self, name: str, cls: type) -> int:
        return sum(type(op) is cls for op in self.node(name).received)


def map_changes_after(cluster: FakeCluster, fetches: int, smap: SlotMap) -> Callable[[Any], Any]:
    """A rule: publish ``smap`` once ``fetches`` topology requests have been answered (lease expiry)."""
    seen = [0]

    def rule(op: Any) -> Any:
        if type(op) is protocol.Topology:
            seen[0] += 1
            if seen[0] > fetches and cluster.map.epoch < smap.epoch:
                cluster.publish(smap)
        return None

    return rule


def drop_after(cluster: FakeCluster, fetches: int, smap: SlotMap) -> None:
    """Every live node publishes ``smap`` once the nodes together have answered ``fetches`` topologies."""
    rule = map_changes_after(cluster, fetches, smap)
    for node in cluster.nodes.values():
        if not node.dead:
            node.rules.append(rule)


# --- the sans-IO policy, driven by hand -------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Driver:
    """Plays the client: does each step of a plan against a FakeCluster on a fake clock."""

    def __init__(self, cluster: FakeCluster, seeds: tuple[str, ...] = ("a",), failover_timeout: float = 10.0) -> None:
        self.cluster = cluster
        self.clock = Clock()
        self.routing = ClusterRouting([ep(s) for s in seeds], failover_timeout, clock=self.clock)
        self.steps: list[Any] = []

    def send(self, endpoint: str, op: Any) -> Any:
        out = self.cluster.exchange(endpoint, op)
        if out is SILENT:
            self.clock.now += TIMEOUT
            return errors.Timeout(f"no reply from {endpoint}")
        return protocol.Reply(1, *out)

    def drive(self, plan: Any) -> Any:
        try:
            step = next(plan)
            while True:
                self.steps.append(step)
                if type(step) is Send:
                    out = self.send(*step)
                elif type(step) is list:
                    out = [self.send(*s) for s in step]
                else:
                    assert type(step) is Sleep and step.seconds >= 0
                    self.clock.now += step.seconds
                    out = None
                step = plan.send(out)
        except StopIteration as stop:
            return stop.value

    def call(self, op: Any) -> protocol.Reply:
        """As the clients' _call: route()'s fast path, then a plan if needed."""
        endpoint = self.routing.route(op)
        if endpoint is None:
            return self.drive(self.routing.plan(op))
        self.steps.append(Send(endpoint, op))
        out = self.send(endpoint, op)
        if isinstance(out, protocol.Reply) and not needs_plan(out):
            return out
        return self.drive(self.routing.plan(op, endpoint, out))

    def sleeps(self) -> list[float]:
        return [s.seconds for s in self.steps if type(s) is Sleep]

    def sends(self, cls: type = object) -> list[str]:
        flat = [s for step in self.steps for s in (step if type(step) is list else [step]) if type(s) is Send]
        return [s.endpoint for s in flat if isinstance(s.op, cls)]


def ready(cluster: FakeCluster, **kwargs: Any) -> Driver:
    d = Driver(cluster, **kwargs)
    assert d.call(protocol.Ping()).value == 2 * len(cluster.nodes)  # learns the map from the seed
    d.steps.clear()
    return d


def test_backoff_schedule_doubles_from_1ms_and_is_capped() -> None:
    assert [backoff(i) for i in range(5)] == [0.001, 0.002, 0.004, 0.008, 0.016]
    assert backoff(6) == backoff(1000) == MAX_BACKOFF_S == 0.05


def test_needs_plan_only_for_the_replies_a_cluster_node_adds() -> None:
    assert not needs_plan(protocol.Reply(1, OK, None))
    assert needs_plan(protocol.Reply(1, MOVED, {})) and needs_plan(protocol.Reply(1, TRYAGAIN, "frozen"))
    assert needs_plan(protocol.Reply(1, UNAVAILABLE, "cluster: no lease"))
    assert not needs_plan(protocol.Reply(1, UNAVAILABLE, "shard 1 is down"))
    assert not needs_plan(protocol.Reply(1, protocol.BUSY, "full"))


def test_first_call_learns_the_map_from_a_seed_and_places_keys_by_slot() -> None:
    cluster = FakeCluster()
    d = Driver(cluster, seeds=("b",))
    key = key_on(cluster.map, "c")
    assert d.routing.route(protocol.Get(key)) is None  # no map yet
    assert d.call(protocol.Set(key, b"v")).value is True
    assert d.sends() == [ep("b"), ep("c")]  # topology from the seed, then the owner
    assert d.routing.map == cluster.map and d.routing.name == "c" and d.routing.refreshes == 1
    for name in ("a", "b", "c"):
        for skip in range(5):
            k = key_on(cluster.map, name, skip)
            assert d.routing.route(protocol.Get(k)) == ep(name)
    assert d.routing.route(protocol.GetMany([key])) is None and d.routing.route(protocol.Ping()) is None
    assert cluster.node("c").data == {key: b"v"} and d.routing.redirects == d.routing.retries == 0


def test_moved_with_a_higher_epoch_refreshes_from_that_node_and_resends() -> None:
    cluster = FakeCluster()
    d = ready(cluster)
    key = key_on(cluster.map, "a")
    cluster.publish(moved_map(cluster.map, {slot_of(key)}, "b"))
    assert d.call(protocol.Set(key, b"v")).value is True
    # the old owner, the map from the node that said MOVED, then the new owner
    assert [(type(s.op), s.endpoint) for s in d.steps] == [
        (protocol.Set, ep("a")), (protocol.Topology, ep("a")), (protocol.Set, ep("b"))]
    assert d.routing.map.epoch == 2 and d.routing.route(protocol.Get(key)) == ep("b")
    assert (d.routing.redirects, d.routing.refreshes, d.routing.retries) == (1, 2, 0)
    assert cluster.node("b").data == {key: b"v"} and not cluster.node("a").data


def test_a_stale_client_reaches_the_right_node_after_exactly_one_moved() -> None:
    cluster = FakeCluster()
    d = ready(cluster)
    keys = [key_on(cluster.map, "a", i) for i in range(3)]
    cluster.publish(make_map(5, ["a", "b", "c"], lambda s: 2))  # several epochs later, "c" owns every slot
    assert d.call(protocol.Get(keys[0])).status == OK
    assert d.routing.redirects == 1 and d.routing.map.epoch == 5
    assert d.sends(protocol.Get) == [ep("a"), ep("c")]
    for key in keys[1:]:  # the map is current: no more MOVED
        d.call(protocol.Get(key))
    assert d.routing.redirects == 1 and d.routing.refreshes == 2 and d.sends(protocol.Get)[2:] == [ep("c")] * 2


def test_ask_sends_one_request_to_the_handoff_source_and_keeps_the_map() -> None:
    cluster = FakeCluster()
    d = ready(cluster)
    key = key_on(cluster.map, "b")
    before = d.routing.map
    ask = {"epoch": 1, "slot": slot_of(key), "node": "c", "endpoint": ep("c"), "ask": True}
    cluster.node("b").rules.append(lambda op: (MOVED, ask) if type(op) is protocol.Get else None)
    cluster.node("c").rules.append(lambda op: (OK, b"from c") if type(op) is protocol.Get else None)
    assert d.call(protocol.Get(key)).value == b"from c"
    assert d.sends() == [ep("b"), ep("c")] and d.routing.map is before
    assert d.routing.redirects == 1 and d.routing.refreshes == 1  # the bootstrap's only
    assert d.routing.route(protocol.Get(key)) == ep("b")  # the next request goes to the map's owner again


def test_tryagain_backs_off_1_2_4_ms_and_retries_at_the_owner() -> None:
    cluster = FakeCluster()
    d = ready(cluster)
    key = key_on(cluster.map, "b")
    frozen = [3]

    def freeze(op: Any) -> Any:
        if type(op) is protocol.Set and frozen[0]:
            frozen[0] -= 1
            return TRYAGAIN, "slot frozen"
        return None

    cluster.node("b").rules.append(freeze)
    assert d.call(protocol.Set(key, b"v")).value is True
    assert d.sleeps() == [0.001, 0.002, 0.004] and d.sends() == [ep("b")] * 4
    assert d.routing.retries == 3 and d.routing.refreshes == 1


def test_tryagain_until_the_budget_is_spent_raises_tryagain() -> None:
    cluster = FakeCluster()
    d = ready(cluster, failover_timeout=0.3)
    key = key_on(cluster.map, "b")
    cluster.node("b").rules.append(lambda op: (TRYAGAIN, "slot frozen"))
    reply = d.call(protocol.Get(key))
    assert reply.status == TRYAGAIN
    assert sum(d.sleeps()) == pytest.approx(0.3) and max(d.sleeps()) == MAX_BACKOFF_S


def test_unavailable_cluster_refreshes_from_another_node_and_retries() -> None:
    cluster = FakeCluster()
    d = ready(cluster)
    key = key_on(cluster.map, "a")
    lapsed = cluster.node("a")
    lapsed.rules.append(lambda op: (UNAVAILABLE, "cluster: lease lapsed") if type(op) is not protocol.Ping else None)
    cluster.publish(without(cluster.map, "a"))  # the others moved on; "a" is fenced
    assert d.call(protocol.Set(key, b"v")).value is True
    topology_from = d.sends(protocol.Topology)
    assert topology_from and ep("a") not in topology_from
    new_owner = d.routing.map.owner_of(slot_of(key)).endpoint
    assert d.sends(protocol.Set) == [ep("a"), new_owner] and d.routing.retries == 1
    assert d.routing.map.epoch == 2 and not lapsed.data


def test_unavailable_other_than_cluster_is_the_callers() -> None:
    cluster = FakeCluster()
    d = ready(cluster)
    key = key_on(cluster.map, "a")
    cluster.node("a").rules.append(lambda op: (UNAVAILABLE, "shard 1 is down"))
    assert d.call(protocol.Get(key)).status == UNAVAILABLE and d.routing.retries == 0


def test_multi_key_ops_split_by_node_and_merge_in_the_callers_order() -> None:
    cluster = FakeCluster()
    d = ready(cluster)
    keys = [key_on(cluster.map, name, i) for i in range(3) for name in ("a", "b", "c")]
    items = [(k, b"v" + k) for k in keys]
    assert d.drive(d.routing.plan(protocol.SetMany(items))).value == 9
    assert len(d.steps) == 1 and sorted(s.endpoint for s in d.steps[0]) == [ep("a"), ep("b"), ep("c")]
    for name in ("a", "b", "c"):
        assert set(cluster.node(name).data) == {k for k in keys if cluster.map.owner_of(slot_of(k)).id == name}
    wanted = [*reversed(keys), b"missing"]
    assert d.drive(d.routing.plan(protocol.GetMany(wanted))).value == [b"v" + k for k in reversed(keys)] + [None]
    assert d.drive(d.routing.plan(protocol.DeleteMany(keys[:4]))).value == 4
    assert d.drive(d.routing.plan(protocol.GetMany([]))).value == []


def test_multi_key_part_answered_moved_is_split_again_and_merged() -> None:
    cluster = FakeCluster()
    d = ready(cluster)
    a_keys = [key_on(cluster.map, "a", i) for i in range(4)]
    b_keys = [key_on(cluster.map, "b", i) for i in range(2)]
    for k in a_keys + b_keys:
        cluster.nodes[d.routing.route(protocol.Get(k))].data[k] = b"v" + k
    # Two of a's slots move to c (epoch 2); c has their entries now.
    moving = {slot_of(a_keys[0]), slot_of(a_keys[2])}
    cluster.publish(moved_map(cluster.map, moving, "c"))
    for k in (a_keys[0], a_keys[2]):
        cluster.node("c").data[k] = cluster.node("a").data.pop(k)
    order = [a_keys[0], b_keys[0], a_keys[1], a_keys[2], b_keys[1], a_keys[3]]
    reply = d.drive(d.routing.plan(protocol.GetMany(order)))
    assert reply.value == [b"v" + k for k in order]
    # round 1: a and b; a's part is MOVED (nothing served), refresh from a; round 2: c and a again
    rounds = [sorted(s.endpoint for s in step) for step in d.steps if type(step) is list]
    assert rounds == [[ep("a"), ep("b")], [ep("a"), ep("c")]]
    assert d.routing.map.epoch == 2 and d.routing.redirects == 1
    assert cluster.node("c").received[-1] == protocol.GetMany([a_keys[0], a_keys[2]])


def test_multi_key_ask_sends_only_the_asked_slot_to_the_source() -> None:
    cluster = FakeCluster()
    d = ready(cluster)
    k1, k2 = key_on(cluster.map, "b", 0), key_on(cluster.map, "b", 1)
    assert slot_of(k1) != slot_of(k2)
    ask = {"epoch": 1, "slot": slot_of(k1), "node": "c", "endpoint": ep("c"), "ask": True}
    cluster.node("b").rules.append(lambda op: (MOVED, ask) if type(op) is protocol.DeleteMany and k1 in op.keys
                                   else None)
    cluster.node("c").rules.append(lambda op: (OK, 1) if type(op) is protocol.DeleteMany else None)
    cluster.node("b").data[k2] = b"x"
    assert d.drive(d.routing.plan(protocol.DeleteMany([k1, k2]))).value == 2
    assert cluster.node("c").received[-1] == protocol.DeleteMany([k1])
    assert cluster.node("b").received[-1] == protocol.DeleteMany([k2]) and d.routing.map.epoch == 1


def test_a_dead_node_is_retried_on_its_new_owner_once_the_map_changes() -> None:
    cluster = FakeCluster()
    d = ready(cluster)
    key = key_on(cluster.map, "b")
    cluster.node("b").dead = True
    after = without(cluster.map, "b")
    drop_after(cluster, 3, after)  # the cluster drops "b" after a few refreshes (its lease expires)
    started = d.clock.now
    assert d.call(protocol.Set(key, b"v")).value is True
    new_owner = after.owner_of(slot_of(key)).id
    assert cluster.node(new_owner).data == {key: b"v"}
    assert ep("b") not in d.sends(protocol.Topology)  # never asked the dead node for the map
    assert d.sends(protocol.Set) == [ep("b"), ep(new_owner)]  # and never resent to it
    assert d.routing.map.epoch == 2 and d.routing.retries == 1 and d.routing.refreshes == 1 + 4
    assert d.sleeps() == [0.001, 0.002, 0.004] and d.clock.now - started < 1.0


def test_a_dead_node_past_the_failover_budget_raises_its_timeout() -> None:
    cluster = FakeCluster()
    d = ready(cluster, failover_timeout=2.0)
    key = key_on(cluster.map, "b")
    cluster.node("b").dead = True  # and the map never changes
    started = d.clock.now
    with pytest.raises(errors.Timeout, match="tcp://b:7400"):
        d.call(protocol.Get(key))
    assert TIMEOUT + 2.0 <= d.clock.now - started <= TIMEOUT + 2.0 + 0.001
    assert d.sends(protocol.Get) == [ep("b")] and d.routing.retries == 1
    assert len(d.sends(protocol.Topology)) > 20  # it kept looking for a new map until the end


def test_every_node_unreachable_raises_the_timeout() -> None:
    cluster = FakeCluster()
    d = ready(cluster, failover_timeout=1.0)
    for node in cluster.nodes.values():
        node.dead = True
    started = d.clock.now
    with pytest.raises(errors.Timeout):
        d.call(protocol.Get(b"k"))
    # the first exchange, the budget, and at most one map fetch begun just before its end
    assert d.clock.now - started <= TIMEOUT + 1.0 + TIMEOUT


def test_a_lower_epoch_map_is_never_adopted() -> None:
    cluster = FakeCluster()
    d = ready(cluster)
    newer = moved_map(cluster.map, set(range(100)), "a")
    cluster.publish(newer)
    d.call(protocol.Topology())
    assert d.routing.map.epoch == 2
    old = make_map(1, ["a", "b", "c"])
    stale_topology = {"cluster": {"name": "c", "node": "b", "map": old.to_wire()}}
    assert d.routing.adopt(stale_topology) is False and d.routing.map == newer
    same = {"cluster": {"name": "c", "node": "b", "map": newer.to_wire()}}
    assert d.routing.adopt(same) is False
    foreign = {"cluster": {"name": "other", "node": "x", "map": make_map(9, ["x"]).to_wire()}}
    assert d.routing.adopt(foreign) is False and d.routing.map == newer


def test_moved_from_a_node_behind_our_map_is_not_followed() -> None:
    """It answers MOVED with its old epoch: back off and retry at our map's owner until it catches up."""
    old = make_map(1, ["a", "b", "c"])
    key = key_on(old, "c")
    newer = moved_map(old, {slot_of(key)}, "b")
    cluster = FakeCluster(smap=newer)
    d = ready(cluster)
    lagging = cluster.node("b")
    lagging.map = old
    answered = [0]

    def catch_up(op: Any) -> Any:
        answered[0] += 1
        if answered[0] > 2:
            lagging.map = newer
        return None

    lagging.rules.append(catch_up)
    assert d.call(protocol.Get(key)).status == OK
    assert d.routing.map == newer and d.sends(protocol.Get) == [ep("b")] * 3 and not d.sends(protocol.Topology)
    assert d.sleeps() == [0.001, 0.002] and d.routing.redirects == 0 and d.routing.retries == 2


def test_moved_naming_no_owner_backs_off_until_one_is_named() -> None:
    cluster = FakeCluster()
    d = ready(cluster)
    key = key_on(cluster.map, "c")
    nowhere = [2]

    def no_owner(op: Any) -> Any:
        if type(op) is protocol.Get and nowhere[0]:
            nowhere[0] -= 1
            return MOVED, {"epoch": 1, "slot": slot_of(key), "node": None, "endpoint": None}
        return None

    cluster.node("c").rules.append(no_owner)
    assert d.call(protocol.Get(key)).status == OK
    assert d.sends(protocol.Get) == [ep("c")] * 3 and d.sleeps() == [0.001, 0.002] and d.routing.redirects == 0


def test_a_single_daemon_seed_is_refused_clearly() -> None:
    cluster = FakeCluster(("a",))
    cluster.node("a").rules.append(
        lambda op: (OK, {"shards": 2, "endpoints": []}) if type(op) is protocol.Topology else None)
    d = Driver(cluster)
    with pytest.raises(errors.ConfigError, match=r"tcp://a:7400 is not a cluster node"):
        d.call(protocol.Get(b"k"))


def test_malformed_maps_and_moved_values_are_protocol_errors() -> None:
    routing = ClusterRouting([ep("a")])
    with pytest.raises(errors.ProtocolError):
        routing.adopt({"cluster": {"name": "c", "map": {"epoch": 1, "nodes": [], "owners": [0]}}})
    with pytest.raises(errors.ConfigError):
        routing.adopt({"shards": 1})
    cluster = FakeCluster()
    d = ready(cluster)
    key = key_on(cluster.map, "a")
    cluster.node("a").rules.append(lambda op: (MOVED, {"epoch": 1, "shard": 3}))
    with pytest.raises(errors.ProtocolError, match="cluster MOVED"):
        d.call(protocol.Get(key))


def test_nodes_that_keep_redirecting_raise_moved() -> None:
    cluster = FakeCluster()
    d = ready(cluster)
    key = key_on(cluster.map, "a")
    for here, there in (("a", "b"), ("b", "a")):
        to = {"epoch": 1, "slot": slot_of(key), "node": there, "endpoint": ep(there)}
        cluster.node(here).rules.append(lambda op, to=to: (MOVED, to))
    reply = d.call(protocol.Get(key))
    limit = MAX_REDIRECTS + 2  # one slot: a MOVED and an ask more than the base budget
    assert reply.status == MOVED and f"after {limit} redirects" in reply.value
    assert len(d.sends(protocol.Get)) == limit + 1


def test_a_slot_without_owner_waits_for_one_then_raises_unavailable() -> None:
    cluster = FakeCluster(("a", "b"), make_map(1, ["a", "b"], lambda s: -1 if s == 7 else s % 2))
    d = ready(cluster, failover_timeout=0.5)
    key = next(k for i in range(100_000) if slot_of(k := f"x{i}".encode()) == 7)
    reply = d.call(protocol.Get(key))
    assert reply.status == UNAVAILABLE and reply.value.startswith("cluster: slot 7 has no owner")
    assert sum(d.sleeps()) == pytest.approx(0.5)


def test_fan_out_ops_go_to_every_node_and_combine() -> None:
    cluster = FakeCluster()
    d = ready(cluster)
    for node in cluster.nodes.values():
        node.data[b"x" + node.name.encode()] = b"1"
    assert d.call(protocol.Ping()).value == 6
    stats = d.call(protocol.Stats()).value
    assert stats == {"cluster": "c", "epoch": 1, "nodes": {n: {"keys": 1} for n in "abc"}}
    assert d.call(protocol.Flush()).value == 3 and d.call(protocol.Tune({"max_memory": 1})).value == 6
    assert d.call(protocol.Maintenance(True)).value is True
    cluster.node("b").maintenance = False
    assert d.call(protocol.Maintenance(None)).value is False  # not every node is in maintenance
    assert d.call(protocol.Resize(4)).value == {"nodes": {n: {"from": 2, "to": 4} for n in "abc"}}
    cluster.node("c").dead = True
    health = d.call(protocol.Health()).value["nodes"]
    assert health["a"] == {"shards": ["ok", "ok"]} and "tcp://c:7400" in health["c"]["error"]
    with pytest.raises(errors.Timeout):
        d.call(protocol.Ping())
    cluster.node("c").dead = False
    cluster.node("a").rules.append(lambda op: (protocol.FORBIDDEN, "admin only") if type(op) is protocol.Flush
                                   else None)
    assert d.call(protocol.Flush()).status == protocol.FORBIDDEN


def test_topology_refreshes_and_describes_the_map() -> None:
    cluster = FakeCluster()
    d = ready(cluster)
    cluster.publish(moved_map(cluster.map, set(range(SLOTS)), "a"))
    described = d.call(protocol.Topology()).value
    assert described["epoch"] == 2 and described["shards"] == 6
    assert described["nodes"]["a"] == {"endpoint": ep("a"), "shards": 2, "slots": SLOTS}
    assert SlotMap.from_wire(described["cluster"]["map"]) == cluster.map and described["cluster"]["name"] == "c"


def test_a_batch_sends_keyed_ops_in_one_round_and_plans_the_rest() -> None:
    cluster = FakeCluster()
    d = ready(cluster)
    ka, kb = key_on(cluster.map, "a"), key_on(cluster.map, "b")
    cluster.publish(moved_map(cluster.map, {slot_of(kb)}, "c"))
    ops = [protocol.Set(ka, b"1"), protocol.Set(kb, b"2"), protocol.GetMany([ka, kb]), protocol.Incr(ka, 1),
           protocol.Ping()]
    out = d.drive(d.routing.plan_batch(ops))
    # One round in call order: 2 sets, get_many's 2 parts, incr, 3 pings
    assert [(s.endpoint, type(s.op)) for s in d.steps[0]] == [
        (ep("a"), protocol.Set), (ep("b"), protocol.Set), (ep("a"), protocol.GetMany), (ep("b"), protocol.GetMany),
        (ep("a"), protocol.Incr), (ep("a"), protocol.Ping), (ep("b"), protocol.Ping), (ep("c"), protocol.Ping)]
    assert [o.status for o in out] == [OK] * 5
    assert out[2].value == [b"1", b"2"] and out[3].value == 2 and out[4].value == 6
    assert d.routing.redirects == 2  # the set and get_many's part sent to b, each answered MOVED once
    assert cluster.node("c").data[kb] == b"2" and d.routing.refreshes == 2


def test_concurrent_calls_fetch_the_map_one_at_a_time() -> None:
    """Rule 9: a call waits for a fetch under way, and skips its own if a map came since its trouble."""
    cluster = FakeCluster()
    d = ready(cluster)
    k1, k2 = key_on(cluster.map, "b", 0), key_on(cluster.map, "b", 1)
    cluster.node("b").dead = True
    p1 = d.routing.plan(protocol.Get(k1), ep("b"), errors.Timeout("no reply from tcp://b:7400"))
    p2 = d.routing.plan(protocol.Get(k2), ep("b"), errors.Timeout("no reply from tcp://b:7400"))
    s1 = next(p1)
    assert type(s1.op) is protocol.Topology
    assert next(p2) == Sleep(0.001)  # p1's fetch is under way: wait for it
    assert type(p1.send(d.send(*s1))) is Sleep  # still epoch 1, b still the owner: p1 waits for a change
    assert type(p2.send(None)) is Sleep  # a map came since p2's trouble: no fetch of its own; still b: wait
    cluster.publish(without(cluster.map, "b"))
    s1 = p1.send(None)
    assert type(s1.op) is protocol.Topology
    assert type(p2.send(None)) is Sleep  # p1 is fetching
    s1 = p1.send(d.send(*s1))
    s2 = p2.send(None)
    assert type(s1.op) is type(s2.op) is protocol.Get and ep("b") not in (s1.endpoint, s2.endpoint)
    assert d.routing.map.epoch == 2 and d.routing.refreshes == 1 + 2
    p1.close()
    p2.close()
    assert d.routing._fetching == 0


def test_a_call_closed_mid_fetch_does_not_hold_up_the_others() -> None:
    cluster = FakeCluster()
    d = ready(cluster)
    p1 = d.routing.plan(protocol.Topology())
    assert type(next(p1).op) is protocol.Topology and d.routing._fetching == 1
    p1.close()  # e.g. its coroutine was cancelled
    assert d.routing._fetching == 0


# --- ClusterClient and AsyncClusterClient over fake node connections ---------------------------


class SyncDealer:
    """Client's connection, answered at once by a FakeCluster; a silent node times out at once."""

    cluster: FakeCluster

    def __init__(self, endpoint: str, curve: Any = None, context: Any = None) -> None:
        self.endpoint = endpoint
        self.replies: deque[bytes] = deque()

    def send(self, frame: bytes, deadline: float) -> bool:
        env = protocol.decode_envelope(frame, protocol.Limits())
        out = self.cluster.exchange(self.endpoint, env.op)
        if out is not SILENT:
            self.replies.append(protocol.encode_reply(env.id, *out))
        return True

    def recv(self, deadline: float) -> bytes | None:
        return self.replies.popleft() if self.replies else None

    def close(self) -> None:
        pass


class AsyncDealer:
    """AsyncClient's connection; a silent node's requests time out after the client's timeout."""

    cluster: FakeCluster

    def __init__(self, endpoint: str, curve: Any = None, context: Any = None) -> None:
        self.endpoint = endpoint
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    async def send(self, frame: bytes) -> None:
        env = protocol.decode_envelope(frame, protocol.Limits())
        out = self.cluster.exchange(self.endpoint, env.op)
        if out is not SILENT:
            self.replies.put_nowait(protocol.encode_reply(env.id, *out))

    async def recv(self) -> bytes:
        return await self.replies.get()

    def close(self) -> None:
        pass


def sync_client(cluster: FakeCluster, seeds: Any = None, **kwargs: Any) -> ClusterClient:
    dealer = type("Dealer", (SyncDealer,), {"cluster": cluster})
    node = type("NodeClient", (Client,), {"_dealer": dealer})
    cls = type("FakeClusterClient", (ClusterClient,), {"_node_client": node})
    kwargs.setdefault("direct", False)  # a fake node is its router only (direct mode: tests/integration)
    return cls(seeds or [ep("a"), ep("b")], timeout=IO_TIMEOUT, **kwargs)


def async_client(cluster: FakeCluster, seeds: Any = None, **kwargs: Any) -> AsyncClusterClient:
    dealer = type("Dealer", (AsyncDealer,), {"cluster": cluster})
    node = type("NodeClient", (AsyncClient,), {"_dealer": dealer})
    cls = type("FakeAsyncClusterClient", (AsyncClusterClient,), {"_node_client": node})
    kwargs.setdefault("direct", False)  # a fake node is its router only (direct mode: tests/integration)
    return cls(seeds or [ep("a"), ep("b")], timeout=IO_TIMEOUT, **kwargs)


class Either:
    """One scenario, run by ClusterClient or by AsyncClusterClient: ``do(lambda c: c.get(k))``."""

    def __init__(self, kind: str, cluster: FakeCluster, **kwargs: Any) -> None:
        self.kind = kind
        self.client: Any = (sync_client if kind == "sync" else async_client)(cluster, **kwargs)
        self.loop = asyncio.new_event_loop() if kind == "async" else None

    def do(self, fn: Callable[[Any], Any]) -> Any:
        out = fn(self.client)
        if self.loop is None:
            return out
        assert inspect.isawaitable(out)
        return self.loop.run_until_complete(out)

    def close(self) -> None:
        if self.loop is None:
            self.client.close()
        else:
            self.loop.run_until_complete(self.client.aclose())
            self.loop.close()


@pytest.fixture(params=["sync", "async"])
def kind(request: Any) -> str:
    return request.param


@pytest.fixture
def cluster() -> FakeCluster:
    return FakeCluster()


@pytest.fixture
def either(kind: str, cluster: FakeCluster) -> Any:
    client = Either(kind, cluster)
    yield client
    client.close()


def test_cluster_clients_have_every_command() -> None:
    for cls in (ClusterClient, AsyncClusterClient, ClusterPipeline, AsyncClusterPipeline):
        assert all(callable(getattr(cls, name)) for name in COMMANDS), cls
    assert ClusterClient.get is Client.get and AsyncClusterClient.set_many is AsyncClient.set_many
    import shardd
    assert shardd.ClusterClient is ClusterClient and shardd.AsyncClusterClient is AsyncClusterClient
    assert {"ClusterClient", "AsyncClusterClient"} <= set(shardd.__all__)


def test_the_cluster_client_never_imports_daemon_modules_or_zmq_itself() -> None:
    import ast
    import subprocess
    import sys
    from pathlib import Path

    import shardd

    code = (
        "import sys, shardd.cluster_client\n"
        "bad = {'config', 'store', 'worker', 'router', 'supervisor', 'transport'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'shardd' and m.split('.')[-1] in bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
    for name in ("cluster_client", "cluster_routing"):
        tree = ast.parse((Path(shardd.__file__).parent / f"{name}.py").read_text())
        imported = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert not {m for m in imported if m.split(".")[0] in ("zmq", "asyncio" if name == "cluster_routing" else "")}


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="seed"):
        ClusterClient([])
    with pytest.raises(TypeError):
        ClusterClient(7)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="failover_timeout"):
        ClusterClient("tcp://a:1", failover_timeout=-1)
    c = ClusterClient("tcp://a:1, tcp://b:2")
    assert c.seeds == ["tcp://a:1", "tcp://b:2"] and c.cluster_map is None and c.failover_timeout == 10.0
    c.close()


def test_commands_reach_the_owner_of_each_key(either: Either, cluster: FakeCluster) -> None:
    keys = {name: key_on(cluster.map, name) for name in ("a", "b", "c")}
    for name, key in keys.items():
        assert either.do(lambda c, key=key: c.set(key, b"v" + key)) is True
        assert cluster.node(name).data == {key: b"v" + key}
    assert either.do(lambda c: c.get(keys["b"])) == b"v" + keys["b"]
    assert either.do(lambda c: c.incr(keys["c"] + b"n", 5)) == 5
    assert either.do(lambda c: c.get_many([keys["c"], "nope", keys["a"]])) == {keys["c"]: b"v" + keys["c"],
                                                                                  keys["a"]: b"v" + keys["a"]}
    assert either.do(lambda c: c.set_many({k: b"w" for k in keys.values()})) == 3
    assert either.do(lambda c: c.delete_many(list(keys.values()))) == 3
    assert either.do(lambda c: c.ping()) == 6 and either.do(lambda c: c.delete(keys["a"])) is False
    client = either.client
    assert client.cluster_map == cluster.map and (client.redirects, client.retries, client.refreshes) == (0, 0, 1)
    assert set(client._nodes) == {ep("a"), ep("b"), ep("c")}  # one connection per node, made on first use


def test_clients_follow_moved_to_a_new_epoch(either: Either, cluster: FakeCluster) -> None:
    key = key_on(cluster.map, "a")
    either.do(lambda c: c.set(key, b"1"))
    cluster.publish(moved_map(cluster.map, {slot_of(key)}, "c"))
    cluster.node("c").data[key] = cluster.node("a").data.pop(key)
    assert either.do(lambda c: c.get(key)) == b"1"
    assert either.client.redirects == 1 and either.client.cluster_map.epoch == 2
    links = dict(either.client._nodes)
    assert either.do(lambda c: c.get(key)) == b"1" and either.client.redirects == 1
    assert either.client._nodes == links  # connections kept across epochs


def test_clients_wait_out_tryagain(either: Either, cluster: FakeCluster) -> None:
    key = key_on(cluster.map, "b")
    frozen = [2]

    def freeze(op: Any) -> Any:
        if type(op) is protocol.Get and frozen[0]:
            frozen[0] -= 1
            return TRYAGAIN, "slot frozen"
        return None

    cluster.node("b").rules.append(freeze)
    assert either.do(lambda c: c.get(key)) is None and either.client.retries == 2


def test_clients_survive_a_dead_node(kind: str, cluster: FakeCluster) -> None:
    either = Either(kind, cluster, failover_timeout=5.0)
    try:
        key = key_on(cluster.map, "b")
        other = key_on(cluster.map, "a")
        either.do(lambda c: c.ping())
        cluster.node("b").dead = True
        after = without(cluster.map, "b")
        drop_after(cluster, 2, after)
        assert either.do(lambda c: c.set(key, b"v")) is True
        assert cluster.node(after.owner_of(slot_of(key)).id).data == {key: b"v"}
        assert either.do(lambda c: c.get_many([key, other])) == {key: b"v"}
        assert either.client.cluster_map.epoch == 2 and either.client.retries == 1
    finally:
        either.close()


def test_clients_raise_the_timeout_when_the_map_never_changes(kind: str, cluster: FakeCluster) -> None:
    either = Either(kind, cluster, failover_timeout=0.2)
    try:
        key = key_on(cluster.map, "b")
        either.do(lambda c: c.ping())
        cluster.node("b").dead = True
        with pytest.raises(errors.Timeout, match="tcp://b:7400"):
            either.do(lambda c: c.get(key))
        with pytest.raises(errors.Timeout):
            either.do(lambda c: c.delete_many([key]))
        assert either.do(lambda c: c.get(key_on(cluster.map, "a"))) is None  # the other nodes still serve
    finally:
        either.close()


def test_clients_refuse_a_single_daemon(kind: str) -> None:
    cluster = FakeCluster(("a",))
    cluster.node("a").rules.append(lambda op: (OK, {"shards": 1, "endpoints": [""]}))
    either = Either(kind, cluster, seeds=[ep("a")])
    try:
        with pytest.raises(errors.ConfigError, match="is not a cluster node"):
            either.do(lambda c: c.get(b"k"))
    finally:
        either.close()


def test_clients_use_their_serde_once(kind: str, cluster: FakeCluster) -> None:
    from shardd.serde import MsgpackSerde

    either = Either(kind, cluster, serde=MsgpackSerde())
    try:
        key = key_on(cluster.map, "c")
        assert either.do(lambda c: c.set(key, {"n": [1, 2]})) is True
        assert either.do(lambda c: c.get(key)) == {"n": [1, 2]}
        assert either.do(lambda c: c.get_many([key, b"x"])) == {key: {"n": [1, 2]}}
    finally:
        either.close()


def test_pipelines_split_per_node_and_keep_call_order(either: Either, cluster: FakeCluster) -> None:
    ka, kb, kc = (key_on(cluster.map, n) for n in "abc")
    either.do(lambda c: c.ping())
    cluster.publish(moved_map(cluster.map, {slot_of(kb)}, "c"))

    def run(c: Any) -> Any:
        pipe = c.pipeline()
        pipe.set(ka, b"1").set(kb, b"2").get_many([ka, kb, kc]).incr(kc, 2).ping().get(kb)
        return pipe.execute()

    assert either.do(run) == [True, True, {ka: b"1", kb: b"2"}, 2, 6, b"2"]
    # kb's three requests of the first round each met one MOVED; then the map was current
    assert cluster.node("c").data[kb] == b"2" and either.client.redirects == 3
    assert either.do(lambda c: c.pipeline().execute()) == []
    cluster.node("a").rules.append(lambda op: (protocol.NOT_INTEGER, "not an integer")
                                   if type(op) is protocol.Incr else None)

    def failing(c: Any) -> Any:
        return c.pipeline().incr(ka).get(ka).execute(raise_on_error=False)

    out = either.do(failing)
    assert isinstance(out[0], errors.NotInteger) and out[1] == b"1"


def test_fan_out_and_topology_through_the_clients(either: Either, cluster: FakeCluster) -> None:
    assert either.do(lambda c: c.stats())["nodes"] == {n: {"keys": 0} for n in "abc"}
    assert either.do(lambda c: c.flush()) == 0 and either.do(lambda c: c.maintenance()) is False
    cluster.publish(moved_map(cluster.map, {0, 1, 2}, "a"))
    described = either.do(lambda c: c.topology())
    assert described["epoch"] == 2 and either.client.cluster_map == cluster.map
    assert sum(node["slots"] for node in described["nodes"].values()) == SLOTS


def test_close_closes_every_node_and_refuses_use(kind: str, cluster: FakeCluster) -> None:
    either = Either(kind, cluster)
    either.do(lambda c: c.ping())
    nodes = list(either.client._nodes.values())
    either.close()
    assert either.client.closed and all(node.closed for node in nodes) and not either.client._nodes
    with pytest.raises(errors.ConnectionClosed):
        fn = either.client.get
        out = fn(b"k")
        if inspect.isawaitable(out):
            asyncio.run(out)


def test_async_calls_run_concurrently_through_one_failover(cluster: FakeCluster) -> None:
    async def main() -> None:
        async with async_client(cluster, failover_timeout=5.0) as c:
            await c.ping()
            keys = [key_on(cluster.map, "b", i) for i in range(20)]
            cluster.node("b").dead = True
            after = without(cluster.map, "b")
            drop_after(cluster, 3, after)
            assert await asyncio.gather(*(c.set(k, b"v") for k in keys)) == [True] * 20
            assert c.cluster_map.epoch == 2 and c.retries == 20
            # Rule 9: 20 calls waiting on one dead node did not each poll for the map
            assert c.refreshes <= 6  # the bootstrap and 4 fetches are needed; 20 callers, one fetch at a time

    asyncio.run(main())


# --- the same classes over real sockets ----------------------------------------------------------


class SocketNodes:
    """FakeCluster's nodes behind real ZeroMQ ROUTER sockets on loopback, served by one thread."""

    def __init__(self, names: tuple[str, ...] = ("a", "b", "c")) -> None:
        import threading

        import zmq

        self.ctx = zmq.Context()
        self.socks: dict[str, Any] = {}
        for name in names:
            sock = self.ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            port = sock.bind_to_random_port("tcp://127.0.0.1")
            self.socks[name] = (sock, f"tcp://127.0.0.1:{port}")
        self.cluster = FakeCluster(names, addr=lambda name: self.socks[name][1])
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        import zmq

        poller = zmq.Poller()
        by_sock = {}
        for sock, endpoint in self.socks.values():
            poller.register(sock, zmq.POLLIN)
            by_sock[sock] = endpoint
        while not self.stop.is_set():
            for sock, _ in poller.poll(10):
                ident, frame = sock.recv_multipart()
                env = protocol.decode_envelope(frame, protocol.Limits())
                out = self.cluster.exchange(by_sock[sock], env.op)
                if out is not SILENT:
                    sock.send_multipart([ident, protocol.encode_reply(env.id, *out)])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        for sock, _ in self.socks.values():
            sock.close(0)
        self.ctx.term()


def test_real_sockets_moved_and_failover(kind: str) -> None:
    """The unfaked classes (real Client / AsyncClient and sockets) against fake nodes on loopback."""
    nodes = SocketNodes()
    cluster = nodes.cluster
    cls = ClusterClient if kind == "sync" else AsyncClusterClient
    client = cls(nodes.socks["b"][1], timeout=0.2, failover_timeout=5.0)

    async def scenario() -> None:
        async def do(fn: Callable[[Any], Any]) -> Any:
            out = fn(client)
            return await out if inspect.isawaitable(out) else out  # a sync client just blocks the loop

        keys = [key_on(cluster.map, name, i) for name in "abc" for i in range(3)]
        assert await do(lambda c: c.set_many({k: k for k in keys})) == 9
        assert await do(lambda c: c.get_many(keys)) == {k: k for k in keys}
        kb = key_on(cluster.map, "b")
        cluster.publish(moved_map(cluster.map, {slot_of(kb)}, "c"))
        cluster.node("c").data[kb] = cluster.node("b").data.pop(kb)
        assert await do(lambda c: c.get(kb)) == kb and client.redirects == 1
        cluster.node("a").dead = True
        drop_after(cluster, 2, without(cluster.map, "a"))
        ka = key_on(cluster.map, "a")
        assert await do(lambda c: c.set(ka, b"new")) is True
        assert await do(lambda c: c.get(ka)) == b"new" and client.cluster_map.epoch == 3
        assert await do(lambda c: c.ping()) == 4
        await do(lambda c: c.close() if kind == "sync" else c.aclose())

    try:
        asyncio.run(scenario())
        assert client.closed
    finally:
        nodes.close()


def test_an_ask_to_a_dead_handoff_source_backs_off_until_the_map_drops_it() -> None:
    # a SIGKILLed source keeps its lease for a while; until the map drops its handoff, the owner
    # answers "ask the source": the client must wait (failover budget), not burn its redirects
    cluster = FakeCluster()
    d = ready(cluster, failover_timeout=30.0)
    key = key_on(cluster.map, "a")
    cluster.node("b").dead = True
    ask = {"epoch": 1, "slot": slot_of(key), "node": "b", "endpoint": ep("b"), "ask": True}
    asked = []

    def handing_over(op: Any) -> Any:
        if type(op) is protocol.Get and len(asked) < 40:
            asked.append(op)
            return (MOVED, ask)
        return None

    cluster.node("a").rules.append(handing_over)
    reply = d.call(protocol.Get(key))
    assert reply.status == protocol.OK  # the owner answered once the handoff was over
    assert len(asked) == 40 and sum(d.sleeps()) > 0  # backed off instead of raising Moved


def test_a_wide_multi_key_op_rides_out_many_slots_in_handoff() -> None:
    cluster = FakeCluster()
    d = ready(cluster)
    keys = [key_on(cluster.map, "a", skip=i) for i in range(30)]  # 30 keys of node a, ~30 slots
    slots_seen: set[int] = set()

    def one_slot_at_a_time(op: Any) -> Any:
        # like a node mid-rebalance: MOVED (to itself, same epoch) for the first key not yet "moved"
        if type(op) is protocol.GetMany:
            for key in op.keys:
                if slot_of(key) not in slots_seen:
                    slots_seen.add(slot_of(key))
                    return (MOVED, {"epoch": 1, "slot": slot_of(key), "node": "a", "endpoint": ep("a")})
        return None

    cluster.node("a").rules.append(one_slot_at_a_time)
    reply = d.call(protocol.GetMany(keys))
    assert reply.status == protocol.OK and len({slot_of(k) for k in keys}) > MAX_REDIRECTS
