"""Protocol edges against a real daemon, in raw frames: what docs/protocol.md promises, byte for byte.

Each test sends msgpack frames on a plain ZeroMQ DEALER, as a client in another language
would, to the router's endpoint and to a worker's own endpoint (direct mode).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
import zmq

from shardd import protocol as proto
from shardd.client import Client
from tests.helpers import keys_on_shard

enc = msgspec.msgpack.encode
U64 = (1 << 64) - 1
I64_MAX = (1 << 63) - 1


class Raw:
    """One DEALER socket: send a frame, get the one reply frame decoded."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.s = ctx.socket(zmq.DEALER)
        self.s.linger = 0
        self.s.connect(endpoint)

    def ask(self, frame: bytes) -> proto.Reply:
        self.s.send(frame)
        assert self.s.poll(10_000), "no reply"
        return proto.decode_reply(self.s.recv())

    def call(self, request_id: int, args: list[Any]) -> proto.Reply:
        return self.ask(enc([1, request_id, args]))


@pytest.fixture
def raw(daemon) -> Iterator[Callable[[str], Raw]]:
    """raw("router") or raw("worker0") / raw("worker1"): a DEALER on that endpoint."""
    ctx = zmq.Context()
    sockets: list[Raw] = []
    with Client(daemon.endpoint) as c:
        endpoints = c.topology()["endpoints"]

    def make(where: str) -> Raw:
        endpoint = daemon.endpoint if where == "router" else endpoints[int(where.removeprefix("worker"))]
        sockets.append(Raw(ctx, endpoint))
        return sockets[-1]

    yield make
    for r in sockets:
        r.s.close()
    ctx.term()


def _ok(expected: Any) -> Callable[[Any], bool]:
    return lambda value: value == expected and type(value) is type(expected)


# --- item: nil for an optional argument means its default ----------------------------

K, N = keys_on_shard(0, 2, 2, prefix="nil:")  # shard 0: also reachable on worker 0's endpoint
A = keys_on_shard(0, 2, 1, prefix="nilmany:")[0]

# (request args, check of the OK value), applied in order. Every optional argument of every
# client op is sent as nil at least once, also between given arguments.
DATA_STEPS: list[tuple[list[Any], Callable[[Any], bool]]] = [
    (["delete", N], lambda v: type(v) is bool),  # the daemon is shared: start from a missing N
    (["set", K, b"1", 60_000], _ok(True)),  # give K a TTL first
    (["set", K, b"v", None, None], _ok(True)),
    (["ttl", K], _ok(-1)),  # nil ttl_ms is "no TTL": SET cleared it
    (["set", K, b"w", 5000, None], _ok(True)),  # nil cond is ALWAYS
    (["ttl", K], lambda v: type(v) is int and 0 < v <= 5000),
    (["set", K, b"x", None, proto.IF_ABSENT], _ok(False)),
    (["get", K], _ok(b"w")),
    (["incr", N, None], _ok(1)),
    (["incr", N, None], _ok(2)),
    (["cas", K, b"y", 0, None], _ok(False)),  # a stale version; nil ttl_ms accepted
    (["set_many", [[A, b"m"]], None], _ok(1)),
    (["ttl", A], _ok(-1)),
]
ADMIN_STEPS: list[tuple[list[Any], Callable[[Any], bool]]] = [
    (["maintenance", None], _ok(False)),
    (["health", None], lambda v: v["ok"] is True and len(v["shards"]) == 2),
    (["hotkeys", None], lambda v: isinstance(v["keys"], list)),
]


@pytest.mark.parametrize("where", ["router", "worker0"])
def test_nil_for_every_optional_argument_is_its_default(raw, where: str) -> None:
    r = raw(where)
    steps = DATA_STEPS + (ADMIN_STEPS if where == "router" else [])
    for i, (args, check) in enumerate(steps, start=1):
        reply = r.call(i, args)
        assert (reply.id, reply.status) == (i, proto.OK), (args, reply)
        assert check(reply.value), (args, reply.value)


# --- item: protocol edges -------------------------------------------------------------


@pytest.mark.parametrize("where", ["router", "worker0"])
@pytest.mark.parametrize("version", ["1", 1.0, True, None, 2])
def test_a_version_other_than_the_int_1_is_unsupported_version(raw, where: str, version: Any) -> None:
    reply = raw(where).ask(enc([version, 77, ["get", K]]))
    assert (reply.id, reply.status) == (77, proto.UNSUPPORTED_VERSION), reply
    assert isinstance(reply.value, str) and "version" in reply.value


@pytest.mark.parametrize("where", ["router", "worker0"])
def test_a_ttl_is_bounded_so_ttl_replies_stay_in_int64(raw, where: str) -> None:
    r = raw(where)
    assert r.call(1, ["set", K, b"v", proto.MAX_TTL_MS]).value is True
    ttl = r.call(2, ["ttl", K]).value
    assert type(ttl) is int and 0 < ttl <= proto.MAX_TTL_MS < I64_MAX
    for i, args in enumerate([["set", K, b"v", proto.MAX_TTL_MS + 1], ["set", K, b"v", U64],
                              ["expire", K, U64], ["cas", K, b"v", 1, 2**63], ["set_many", [[K, b"v"]], U64]],
                             start=3):
        reply = r.call(i, args)
        assert (reply.id, reply.status) == (i, proto.BAD_REQUEST), (args, reply)
        assert str(proto.MAX_TTL_MS) in reply.value
    after = r.call(9, ["ttl", K]).value  # the refused requests changed nothing
    assert type(after) is int and 0 < after <= ttl


def test_ping_on_a_worker_endpoint_answers_the_int_1(raw, daemon) -> None:
    for where in ("worker0", "worker1"):
        reply = raw(where).call(5, ["ping"])
        assert (reply.id, reply.status, reply.value) == (5, proto.OK, 1)
        assert type(reply.value) is int
    with Client(daemon.endpoint) as c:
        endpoint = c.topology()["endpoints"][1]
        assert c.ping() == 2
        assert c.health()["ok"] is True  # the router's health reads the workers' pings
    with Client(endpoint) as worker:  # the plain client pointed at one worker: an int, not true
        assert worker.ping() == 1


@pytest.mark.parametrize("where", ["router", "worker0"])
def test_id_zero_is_answered_like_any_id(raw, where: str) -> None:
    r = raw(where)
    reply = r.call(0, ["set", K, b"zero"])
    assert (reply.id, reply.status, reply.value) == (0, proto.OK, True)
    assert (r.call(0, ["get", K]).id, r.call(0, ["get", K]).value) == (0, b"zero")
    # and it is also the id of an error whose request id could not be read
    reply = r.ask(b"\xc1garbage")
    assert (reply.id, reply.status) == (0, proto.BAD_REQUEST)


@pytest.mark.parametrize("where", ["router", "worker0"])
def test_a_truncated_frame_is_answered_with_its_id_once_the_id_is_complete(raw, where: str) -> None:
    r = raw(where)
    request_id = 0x1_2345_6789  # uint 64: 9 bytes, so the id is complete from byte 11 on
    frame = proto.encode_request(request_id, proto.Set(K, b"value", 1000))
    id_end = 2 + 9
    for cut in (id_end, id_end + 1, len(frame) // 2, len(frame) - 1):
        reply = r.ask(frame[:cut])
        assert (reply.id, reply.status) == (request_id, proto.BAD_REQUEST), (cut, reply)
        assert "truncated" in reply.value
    for cut in (1, 2, id_end - 1):
        reply = r.ask(frame[:cut])
        assert (reply.id, reply.status) == (0, proto.BAD_REQUEST), (cut, reply)


def test_moved_is_the_one_error_whose_value_is_not_a_str(raw) -> None:
    r = raw("worker0")
    other = keys_on_shard(1, 2, 1, prefix="moved:")[0]
    moved = r.call(1, ["get", other])
    assert moved.status == proto.MOVED
    assert moved.value == {"epoch": 1, "shard": 1}
    errors = [r.call(2, ["get", "str key"]), r.call(3, ["stats"]), r.ask(enc(["1", 4, ["get", K]])),
              r.call(5, ["set", K, b"v", 0]), r.ask(b"\x93\x01")]
    assert [e.status for e in errors] == [proto.BAD_REQUEST, proto.BAD_REQUEST, proto.UNSUPPORTED_VERSION,
                                          proto.BAD_REQUEST, proto.BAD_REQUEST]
    assert all(isinstance(e.value, str) and e.value for e in errors)
