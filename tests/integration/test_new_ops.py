"""append, getdel and touch against a real daemon, in raw frames: through the router and on a worker's
own endpoint (direct mode), with maintenance mode and the value size limit."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
import zmq

from shardd import protocol as proto
from tests.helpers import keys_on_shard

enc = msgspec.msgpack.encode


class Raw:
    """One DEALER socket: send [1, id, op], get the one reply decoded."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.s = ctx.socket(zmq.DEALER)
        self.s.linger = 0
        self.s.connect(endpoint)
        self.next_id = 1

    def call(self, *op: Any) -> proto.Reply:
        self.next_id += 1
        self.s.send(enc([1, self.next_id, list(op)]))
        assert self.s.poll(10_000), "no reply"
        reply = proto.decode_reply(self.s.recv())
        assert reply.id == self.next_id
        return reply

    def ok(self, *op: Any) -> Any:
        reply = self.call(*op)
        assert reply.status == proto.OK, reply
        return reply.value


@pytest.fixture
def raw(daemon) -> Iterator[Callable[[str], Raw]]:
    """raw("router") or raw("worker0") / raw("worker1"): a DEALER on that endpoint."""
    ctx = zmq.Context()
    sockets: list[Raw] = []
    router = Raw(ctx, daemon.endpoint)
    sockets.append(router)
    router.ok("flush")
    endpoints = router.ok("topology")["endpoints"]

    def make(where: str) -> Raw:
        if where == "router":
            return router
        sockets.append(Raw(ctx, endpoints[int(where.removeprefix("worker"))]))
        return sockets[-1]

    yield make
    router.ok("maintenance", False)
    for r in sockets:
        r.s.close()
    ctx.term()


@pytest.mark.parametrize("where", ["router", "worker0"])
def test_append_getdel_touch(raw, where: str) -> None:
    c = raw(where)
    key = keys_on_shard(0, 2, 1, prefix="new-ops-")[0]
    assert c.ok("append", key, b"ab") == 2  # created
    assert c.ok("append", key, b"cd") == 4
    assert c.ok("get", key) == b"abcd"
    assert c.ok("ttl", key) == -1
    _, version = c.ok("gets", key)
    assert c.ok("touch", key) is True
    assert c.ok("ttl", key) == -1  # nil ttl_ms: the TTL is left as it is
    assert c.ok("touch", key, 60_000) is True
    assert 59_000 < c.ok("ttl", key) <= 60_000
    assert c.ok("gets", key) == [b"abcd", version]  # touch keeps the version
    assert c.ok("append", key, b"e") == 5
    assert c.ok("gets", key)[1] != version  # append makes a new one
    assert 59_000 < c.ok("ttl", key) <= 60_000  # and keeps the TTL
    assert c.ok("getdel", key) == b"abcde"
    assert c.ok("getdel", key) is None
    assert c.ok("exists", key) is False
    assert c.ok("touch", key, 1000) is False
    assert c.ok("exists", key) is False  # touch creates nothing


def test_direct_requests_for_another_shards_key_are_moved(raw) -> None:
    key = keys_on_shard(1, 2, 1, prefix="new-ops-")[0]
    w0 = raw("worker0")
    for op in (["append", key, b"x"], ["getdel", key], ["touch", key], ["touch", key, 5000]):
        reply = w0.call(*op)
        assert reply.status == proto.MOVED and reply.value["shard"] == 1, (op, reply)
    assert raw("worker1").ok("append", key, b"x") == 1


@pytest.mark.parametrize("where", ["router", "worker1"])
def test_append_past_max_value_bytes_is_too_large_and_changes_nothing(raw, where: str) -> None:
    c = raw(where)
    key = keys_on_shard(1, 2, 1, prefix="big-")[0]
    half = b"x" * (600 * 1024)
    assert c.ok("append", key, half) == len(half)
    reply = c.call("append", key, half)
    assert reply.status == proto.TOO_LARGE and "max_value_bytes" in reply.value
    assert c.ok("get", key) == half
    assert c.call("append", key, b"x" * (1024 * 1024 + 1)).status == proto.TOO_LARGE  # the argument alone


def test_writes_among_them_are_refused_in_maintenance_mode(raw) -> None:
    c = raw("router")
    key = b"maint-key"
    c.ok("set", key, b"v")
    assert c.ok("maintenance", True) is True
    for op in (["append", key, b"x"], ["getdel", key], ["touch", key, 1000]):
        reply = c.call(*op)
        assert reply.status == proto.MAINTENANCE, (op, reply)
    assert c.ok("touch", key) is True  # without a TTL it only reads
    assert c.ok("maintenance", False) is False
    assert c.ok("getdel", key) == b"v"


def test_bad_arguments_are_bad_requests(raw) -> None:
    c = raw("router")
    for op in (["touch", b"k", 0], ["touch", b"k", -5], ["append", b"k"], ["getdel"], ["touch", b"k", 1, 2],
               ["append", b"k", "not bytes"]):
        assert c.call(*op).status == proto.BAD_REQUEST, op
