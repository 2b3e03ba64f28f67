"""Hostile and malformed input against a real daemon: error replies, no crash, no collateral."""

from __future__ import annotations

import random
import threading

import msgspec
import zmq

from shardd import protocol as proto
from shardd.client import Client


def _raw(endpoint: str, kind: int = zmq.DEALER) -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    s = ctx.socket(kind)
    s.linger = 0
    s.connect(endpoint)
    return ctx, s


def _reply(s: zmq.Socket) -> proto.Reply:
    assert s.poll(30_000), "no reply"
    frames = s.recv_multipart()
    return proto.decode_reply(frames[-1])


CASES: list[tuple[str, list[bytes], int, str]] = [
    ("not msgpack", [b"\xc1\xc1\xc1"], proto.BAD_REQUEST, "malformed"),
    ("empty frame", [b""], proto.BAD_REQUEST, "malformed"),
    ("a map", [msgspec.msgpack.encode({"op": "get"})], proto.BAD_REQUEST, "array"),
    ("unknown op", [msgspec.msgpack.encode([1, 5, ["explode", b"k"]])], proto.BAD_REQUEST, "explode"),
    ("future version", [msgspec.msgpack.encode([9, 6, ["get", b"k"]])], proto.UNSUPPORTED_VERSION, "version 9"),
    ("str key", [msgspec.msgpack.encode([1, 7, ["get", "k"]])], proto.BAD_REQUEST, "bytes"),
    ("missing arg", [msgspec.msgpack.encode([1, 8, ["set", b"k"]])], proto.BAD_REQUEST, "malformed"),
    ("bad ttl", [msgspec.msgpack.encode([1, 9, ["set", b"k", b"v", 0]])], proto.BAD_REQUEST, "ttl_ms"),
    ("bad cond", [msgspec.msgpack.encode([1, 10, ["set", b"k", b"v", None, 7]])], proto.BAD_REQUEST, "malformed"),
    ("huge key", [proto.encode_request(11, proto.Get(b"k" * 5000))], proto.TOO_LARGE, "max_key_bytes"),
    ("two frames", [proto.encode_request(12, proto.Get(b"k")), b"extra"], proto.BAD_REQUEST, "one frame"),
    ("oversized message", [proto.encode_request(13, proto.Set(b"k", b"v" * (17 * 1024 * 1024)))],
     proto.TOO_LARGE, "max_message_bytes"),
    ("debug op disabled", [proto.encode_request(14, proto.DebugSleep(0, 1))], proto.BAD_REQUEST, "disabled"),
]


def test_each_malformed_request_gets_an_error_naming_the_problem(make_daemon):
    d = make_daemon(shards=2)
    ctx, s = _raw(d.endpoint)
    try:
        for name, frames, status, text in CASES:
            s.send_multipart(frames)
            r = _reply(s)
            assert r.status == status, (name, r)
            assert text in r.value, (name, r.value)
        # ids are salvaged where the frame carries one
        s.send(msgspec.msgpack.encode([9, 4242, ["get", b"k"]]))
        assert _reply(s).id == 4242
    finally:
        s.close()
        ctx.term()
    with Client(d.endpoint) as c:
        assert c.ping() == 2


def test_req_socket_works(make_daemon):
    d = make_daemon(shards=1)
    ctx, s = _raw(d.endpoint, zmq.REQ)
    try:
        s.send(proto.encode_request(1, proto.Set(b"r", b"eq")))
        assert _reply(s).value is True
        s.send(proto.encode_request(2, proto.Get(b"r")))
        assert _reply(s).value == b"eq"
    finally:
        s.close()
        ctx.term()


def test_garbage_flood_does_not_disturb_a_well_behaved_client(make_daemon):
    d = make_daemon(shards=2)
    stop = threading.Event()
    errors: list[BaseException] = []
    done = [0]

    def good_client() -> None:
        try:
            with Client(d.endpoint, timeout=30) as c:  # a deadline against a hang
                i = 0
                while not stop.is_set():
                    key = f"good{i % 50}"
                    value = str(i).encode()
                    assert c.set(key, value) is True
                    assert c.get(key) == value
                    i += 1
                done[0] = i
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=good_client)
    t.start()
    rng = random.Random(1234)
    ctx, s = _raw(d.endpoint)
    replies = 0
    try:
        valid = proto.encode_request(1, proto.SetMany([(b"a", b"b")] * 3))
        for i in range(3000):
            kind = i % 3
            if kind == 0:
                frame = rng.randbytes(rng.randrange(0, 64))
            elif kind == 1:  # mutate a valid request
                b = bytearray(valid)
                for _ in range(rng.randrange(1, 4)):
                    b[rng.randrange(len(b))] = rng.randrange(256)
                frame = bytes(b)
            else:  # truncate a valid request
                frame = valid[: rng.randrange(len(valid))]
            s.send(frame)
            while s.poll(0):
                s.recv()
                replies += 1
        while replies < 3000 and s.poll(30_000):
            s.recv()
            replies += 1
    finally:
        stop.set()
        t.join(30)
        s.close()
        ctx.term()
    assert errors == []
    assert done[0] > 0
    assert replies == 3000  # every frame, however broken, got exactly one reply
    with Client(d.endpoint) as c:
        assert c.ping() == 2
        assert all(row["status"] == "up" for row in c.stats()["shards"])
    assert "Traceback" not in d.log()
