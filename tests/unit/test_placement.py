"""The direct-mode policy (shardd.placement) as a unit: its plans driven by hand, no sockets.

Each test plays the client: it answers each step a plan yields (REFRESH, one exchange, a
scatter) and checks what the policy asks for next and what it returns.
"""

from __future__ import annotations

from typing import Any

import pytest

from shardd import protocol
from shardd.errors import NotSent, ProtocolError, Timeout
from shardd.hashing import shard_for
from shardd.placement import PLAN, REFRESH, ROUTER, Placement, merge_split, split_by_shard

OK, MOVED, TRYAGAIN = protocol.OK, protocol.MOVED, protocol.TRYAGAIN


def topology(shards: int, endpoints: int | None = None, missing: tuple[int, ...] = ()) -> dict[str, Any]:
    n = shards if endpoints is None else endpoints
    return {"epoch": 1, "shards": shards,
            "endpoints": ["" if i in missing else f"tcp://127.0.0.1:{9000 + i}" for i in range(n)]}


def reply(status: int = OK, value: Any = None) -> protocol.Reply:
    return protocol.Reply(7, status, value)


class Driver:
    """Answers a plan's steps from scripted outcomes and records the steps."""

    def __init__(self, placement: Placement, topologies: list[dict[str, Any]]) -> None:
        self.placement = placement
        self.topologies = topologies
        self.steps: list[Any] = []

    def run(self, plan: Any, answers: list[Any]) -> Any:
        answers = list(answers)
        try:
            step = next(plan)
            while True:
                self.steps.append(step)
                if step is REFRESH:
                    self.placement.learn(self.topologies.pop(0))
                    step = plan.send(None)
                    continue
                answer = answers.pop(0)
                step = plan.throw(answer) if isinstance(answer, Timeout) else plan.send(answer)
        except StopIteration as stop:
            assert not answers, f"unused answers {answers}"
            return stop.value


def key_on(shard: int, shards: int) -> bytes:
    return next(k for i in range(10_000) if shard_for(k := f"k{i}".encode(), shards) == shard)


def test_route_places_keyed_ops_and_leaves_the_rest_to_the_router_or_a_plan() -> None:
    p = Placement()
    assert p.route(protocol.Get(b"k")) == PLAN  # no topology yet
    assert p.route(protocol.Stats()) == ROUTER
    p.learn(topology(4))
    for key in (b"a", b"b", b"c"):
        assert p.route(protocol.Get(key)) == shard_for(key, 4)
        assert p.route(protocol.Touch(key)) == shard_for(key, 4)
    assert p.route(protocol.GetMany([b"a"])) == PLAN
    assert p.route(protocol.Flush()) == ROUTER and p.route(protocol.Resize(2)) == ROUTER


def test_a_topology_with_a_missing_endpoint_is_not_used() -> None:
    p = Placement()
    p.learn(topology(3, missing=(1,)))
    assert p.shards == 0 and p.route(protocol.Get(b"k")) == PLAN
    assert Driver(p, [topology(3, missing=(1,))]).run(p.plan(protocol.Get(b"k")), []) is None  # → the router
    with pytest.raises(ProtocolError):
        p.learn({"shards": 2})


def test_moved_refreshes_and_retries_at_the_new_owner() -> None:
    p = Placement()
    p.learn(topology(2))
    key = key_on(0, 2)
    d = Driver(p, [topology(3)])
    out = d.run(p.plan(protocol.Get(key), 0, reply(MOVED, {"epoch": 2, "shard": 2})), [reply(OK, b"v")])
    assert out == reply(OK, b"v")
    assert d.steps == [REFRESH, (2, protocol.Get(key))]


def test_moved_retries_are_bounded_then_the_router_answers() -> None:
    p = Placement(moved_retries=2)
    p.learn(topology(2))
    d = Driver(p, [topology(2)] * 3)
    moved = reply(MOVED, {"epoch": 2, "shard": 1})
    assert d.run(p.plan(protocol.Get(b"k")), [moved, moved]) is None
    assert d.steps.count(REFRESH) == 2


def test_tryagain_goes_through_the_router() -> None:
    p = Placement()
    p.learn(topology(2))
    assert Driver(p, []).run(p.plan(protocol.Set(b"k", b"v"), 1, reply(TRYAGAIN, "resizing")), []) is None


def test_a_timeout_is_retried_only_when_a_shrink_removed_the_shard() -> None:
    p = Placement()
    p.learn(topology(3))
    timeout = Timeout("no reply from shard 2")
    assert Driver(p, [topology(2)]).run(p.plan(protocol.Get(b"k"), 2, timeout), []) is None  # removed: router
    p.learn(topology(3))
    with pytest.raises(Timeout):
        Driver(p, [topology(3)]).run(p.plan(protocol.Get(b"k"), 2, timeout), [])  # still there: it may have applied


def test_a_request_never_sent_goes_through_the_router_even_when_its_shard_is_still_there() -> None:
    # A worker that restarted listens on a new port: the old connection cannot take the request,
    # which therefore applied nothing anywhere. Waiting out the timeout and failing would be wrong.
    p = Placement()
    p.learn(topology(3))
    d = Driver(p, [topology(3)])
    assert d.run(p.plan(protocol.Set(b"k", b"v"), 2, NotSent("no connection to shard 2")), []) is None
    assert d.steps == [REFRESH]
    keys = [f"k{i}".encode() for i in range(10)]
    op = protocol.GetMany(keys)
    parts = split_by_shard(op, 3)
    outcomes = [NotSent("no connection") if shard == 0 else reply(OK, [b"d"] * len(sub.keys))
                for shard, (sub, _) in parts.items()]
    routed = reply(OK, [b"r"] * len(parts[0][0].keys))
    merged = Driver(p, []).run(p.plan(op), [outcomes, routed])
    assert merged.status == OK and sorted(set(merged.value)) == [b"d", b"r"]


def test_a_multi_key_op_is_scattered_and_merged_and_a_moved_part_uses_the_router() -> None:
    p = Placement()
    p.learn(topology(2))
    keys = [f"k{i}".encode() for i in range(10)]
    op = protocol.GetMany(keys)
    parts = split_by_shard(op, 2)
    assert set(parts) == {0, 1}
    direct = {0: reply(OK, [b"d:" + k for k in parts[0][0].keys]), 1: reply(MOVED, {"epoch": 2, "shard": 2})}
    d = Driver(p, [])
    out = d.run(p.plan(op), [[direct[shard] for shard in parts], reply(OK, [b"r:" + k for k in parts[1][0].keys])])
    assert d.steps == [[(shard, sub) for shard, (sub, _) in parts.items()], (ROUTER, parts[1][0])]
    assert out.value == [(b"d:" if shard_for(k, 2) == 0 else b"r:") + k for k in keys]
    assert p.shards == 0  # the next direct op re-learns the topology first


def test_an_error_from_a_part_is_the_answer() -> None:
    p = Placement()
    p.learn(topology(2))
    op = protocol.DeleteMany([f"k{i}".encode() for i in range(10)])
    busy = reply(protocol.BUSY, "mailbox full")
    assert Driver(p, []).run(p.plan(op), [[busy, reply(OK, 3)]]) == busy


def test_split_and_merge_agree_with_the_router_shape() -> None:
    items = [(f"k{i}".encode(), b"%d" % i) for i in range(20)]
    op = protocol.SetMany(items, 1000)
    parts = split_by_shard(op, 3)
    assert sorted(i for _, positions in parts.values() for i in positions) == list(range(20))
    assert all(sub.ttl_ms == 1000 for sub, _ in parts.values())
    merged = merge_split(op, {shard: (len(sub.items), positions) for shard, (sub, positions) in parts.items()})
    assert merged == protocol.Reply(0, OK, 20)
    get = protocol.GetMany([k for k, _ in items])
    parts = split_by_shard(get, 3)
    merged = merge_split(get, {s: ([b"v" + k for k in sub.keys], pos) for s, (sub, pos) in parts.items()})
    assert merged.value == [b"v" + k for k, _ in items]


def test_a_custom_hasher_is_used_for_every_placement() -> None:
    p = Placement(hasher=lambda key, shards: shards - 1)
    p.learn(topology(4))
    assert p.route(protocol.Get(b"anything")) == 3
    assert set(split_by_shard(protocol.GetMany([b"a", b"b"]), 4, p.hasher)) == {3}
    with pytest.raises(ValueError):
        Placement(moved_retries=0)
