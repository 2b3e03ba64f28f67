"""Live fuzzing: random, structured and mutated frames against a running daemon, for a bounded time.

test_bad_input.py checks named malformed cases one by one; this throws a seeded stream of
generated input at both kinds of client-facing socket, the router's public endpoint and each
worker's direct endpoint, while well-behaved clients (one through the router, one direct)
check every reply they get. Afterwards every shard must be healthy, worker RSS bounded and
the well-behaved clients must have seen no error.

Time: ``SHARDD_FUZZ_SECONDS`` (default 4, at most 10 in CI); seed: ``SHARDD_FUZZ_SEED``.
Ops that legitimately disturb other clients (flush, maintenance, resize, tune) are never
generated well-formed: the public endpoint has no authentication, so they would be
honoured, and the point here is input the daemon must refuse, not admin ops it must obey.
"""

from __future__ import annotations

import os
import random
import threading
import time
from typing import Any

import msgspec
import psutil
import zmq

from shardd import protocol as proto
from shardd.client import Client

_SAFE_OPS = ["get", "set", "delete", "exists", "expire", "ttl", "persist", "incr", "gets", "cas", "get_many",
             "set_many", "delete_many", "ping", "stats", "health", "hotkeys", "topology", "debug_sleep",
             # control-only and router→worker ops: must be refused on both client-facing sockets
             "configure", "drain", "snapshot", "resize_start", "migrate", "migrate_out", "migrate_in",
             "migrate_done", "set_maintenance", "set_topology", "describe"]
_DISRUPTIVE = {"flush", "maintenance", "resize", "tune"}
_INFLIGHT = 200          # per fuzzing socket: stay far below the router's 10 000 per-peer HWM
_RSS_GROWTH = 96 << 20   # per worker; the generated writes are at most a few MiB in total


class Fuzzer:
    """Seeded generator of hostile frames: raw bytes, random msgpack, op-shaped envelopes, mutants."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.templates = [
            proto.encode_request(1, op) for op in (
                proto.Get(b"fz:a"), proto.Set(b"fz:b", b"v" * 20, 5000, 1), proto.Incr(b"fz:c", -3),
                proto.Cas(b"fz:d", b"x", 7, 100), proto.GetMany([b"fz:a", b"fz:b", b"fz:e"]),
                proto.SetMany([(b"fz:f", b"1"), (b"fz:g", b"2")], 1000), proto.DeleteMany([b"fz:a"]),
                proto.Expire(b"fz:b", 10), proto.Hotkeys(5), proto.Health(50), proto.Ping(), proto.Stats())
        ]

    def value(self, depth: int = 0) -> Any:
        r = self.rng
        kind = r.randrange(12 if depth < 3 else 8)
        if kind == 0:
            return None
        if kind == 1:
            return r.random() < 0.5
        if kind == 2:
            return r.choice([0, 1, -1, 127, 128, 255, 256, 2**31, 2**32, 2**63 - 1, -(2**63), 2**64 - 1,
                             r.randrange(-(2**63), 2**64)])
        if kind == 3:
            return r.choice([0.0, -1.5, float("inf"), float("nan"), r.random() * 1e9])
        if kind == 4:
            return "".join(chr(r.randrange(32, 0x2FF)) for _ in range(r.randrange(12)))
        if kind in (5, 6):
            return r.randbytes(r.choice([0, 1, 8, 16, r.randrange(300), r.randrange(1100)]))
        if kind == 7:
            return msgspec.msgpack.Ext(r.randrange(-128, 128), r.randbytes(r.randrange(9)))
        if kind in (8, 9, 10):
            return [self.value(depth + 1) for _ in range(r.randrange(6))]
        return {self.key_like(): self.value(depth + 1) for _ in range(r.randrange(4))}

    def key_like(self) -> Any:
        r = self.rng.random()
        if r < 0.6:
            return b"fz:" + self.rng.randbytes(self.rng.randrange(6))
        return self.rng.choice(["mailbox_limit", "max_memory", "log_level", "", "x" * 40])

    def arg(self) -> Any:
        r = self.rng.random()
        if r < 0.35:
            return self.key_like()
        if r < 0.5:
            return [self.key_like() for _ in range(self.rng.randrange(5))]
        if r < 0.6:
            return [[self.key_like(), self.value(2)] for _ in range(self.rng.randrange(4))]
        return self.value(1)

    def edge_int(self) -> int:
        r = self.rng
        return r.choice([0, 1, 2, -1, 10, 1000, 60000, 60001, 2**63 - 1, 2**63, 2**64 - 1, -(2**63),
                         r.randrange(-1000, 100000)])

    def typed(self) -> list[Any]:
        """A well-typed op with edge-case arguments: gets past decoding into op application."""
        r = self.rng
        key = lambda: b"fz:" + r.randbytes(r.randrange(6))  # noqa: E731
        value = lambda: r.randbytes(r.choice([0, 1, 10, 100, r.randrange(4096)]))  # noqa: E731
        opt = lambda make: [make()] if r.random() < 0.5 else []  # noqa: E731 - trailing optional argument
        name = r.choice(["get", "delete", "exists", "ttl", "persist", "gets", "set", "expire", "incr", "cas",
                         "get_many", "delete_many", "set_many", "hotkeys", "health", "ping", "stats"])
        if name in ("get", "delete", "exists", "ttl", "persist", "gets"):
            return [name, key()]
        if name == "set":
            return [name, key(), value(), *([self.edge_int(), r.randrange(4)] if r.random() < 0.5 else [])]
        if name == "expire":
            return [name, key(), self.edge_int()]
        if name == "incr":
            return [name, key(), *opt(self.edge_int)]
        if name == "cas":
            return [name, key(), value(), self.edge_int(), *opt(self.edge_int)]
        if name in ("get_many", "delete_many"):
            return [name, [key() for _ in range(r.randrange(8))]]
        if name == "set_many":
            return [name, [[key(), value()] for _ in range(r.randrange(6))], *opt(self.edge_int)]
        if name in ("hotkeys", "health"):
            return [name, *opt(self.edge_int)]
        return [name]

    def envelope(self) -> bytes:
        r = self.rng
        if r.random() < 0.4:
            return msgspec.msgpack.encode([1, r.randrange(1, 2**64), self.typed()])
        name = r.choice(_SAFE_OPS) if r.random() < 0.9 else "".join(r.choice("abcdefgh_") for _ in range(6))
        op = [name, *(self.arg() for _ in range(r.choice([0, 1, 2, 3, 4, 6])))]
        if name in _DISRUPTIVE:  # a random name can collide with one
            op[0] = "get"
        version = 1 if r.random() < 0.9 else self.value(2)
        request_id = r.choice([1, 2**64 - 1, 0, -5, r.randrange(2**64)]) if r.random() < 0.9 else self.value(2)
        shape = [version, request_id, op] if r.random() < 0.9 else [version, request_id, op, self.value(2)][
            : r.randrange(5)]
        return msgspec.msgpack.encode(shape)

    def mutant(self) -> bytes:
        r = self.rng
        b = bytearray(r.choice(self.templates) if r.random() < 0.6 else self.envelope())
        for _ in range(r.randrange(1, 5)):
            action = r.randrange(6)
            pos = r.randrange(len(b) + 1)
            if action == 0 and b:
                b[min(pos, len(b) - 1)] ^= 1 << r.randrange(8)
            elif action == 1 and b:
                b[min(pos, len(b) - 1)] = r.choice([0x00, 0x7F, 0x80, 0x90, 0xC0, 0xC1, 0xC4, 0xD9, 0xDC, 0xDD,
                                                    0xDE, 0xDF, 0xFF, r.randrange(256)])
            elif action == 2:
                b[pos:pos] = r.randbytes(r.randrange(1, 9))
            elif action == 3:
                del b[pos: pos + r.randrange(1, 9)]
            elif action == 4:
                del b[pos:]
            else:
                chunk = b[pos: pos + r.randrange(1, 16)]
                b[pos:pos] = chunk * r.randrange(1, 4)
        return bytes(b)

    def message(self) -> list[bytes]:
        """One message to send: usually a single frame; sometimes REQ-style or extra frames."""
        r = self.rng
        kind = r.random()
        if kind < 0.15:
            body = r.randbytes(r.choice([0, 1, 2, 5, r.randrange(200)]))
        elif kind < 0.6:
            body = self.envelope()
        else:
            body = self.mutant()
        shape = r.random()
        if shape < 0.9:
            return [body]
        if shape < 0.95:
            return [b"", body]  # REQ-style delimiter
        return [body, *(r.randbytes(r.randrange(20)) for _ in range(r.randrange(1, 4)))]


def _well_behaved(endpoint: str, direct: bool, name: str, stop: threading.Event,
                  errors: list[str], counts: dict[str, int]) -> None:
    done = 0
    try:
        with Client(endpoint, timeout=30.0, direct=direct) as c:
            while not stop.is_set():
                key = f"wb:{name}:{done % 64}"
                value = f"{name}-{done}".encode()
                if c.set(key, value) is not True:
                    errors.append(f"{name}: set {key} was not stored")
                got = c.get(key)
                if got != value:
                    errors.append(f"{name}: get {key} = {got!r}, expected {value!r}")
                if c.incr(f"wb:{name}:n") != done + 1:
                    errors.append(f"{name}: incr out of step at {done}")
                done += 1
    except Exception as exc:
        errors.append(f"{name}: {exc!r}")
    counts[name] = done


def _workers_rss(c: Client) -> dict[int, int]:
    return {row["shard"]: psutil.Process(row["pid"]).memory_info().rss for row in c.stats()["shards"]}


def test_live_fuzz_leaves_every_shard_healthy_and_clients_undisturbed(make_daemon, capsys):
    seconds = min(float(os.environ.get("SHARDD_FUZZ_SECONDS", "4")), 600.0)
    seed = int(os.environ.get("SHARDD_FUZZ_SEED", str(random.randrange(2**32))))
    d = make_daemon(shards=2)
    with Client(d.endpoint, timeout=30.0) as admin:
        topology = admin.topology()
        rss_before = _workers_rss(admin)
    targets = [("public", d.endpoint)] + [(f"direct-{i}", ep) for i, ep in enumerate(topology["endpoints"])]
    assert all(ep for _, ep in targets), topology

    stop = threading.Event()
    errors: list[str] = []
    counts: dict[str, int] = {}
    good = [threading.Thread(target=_well_behaved, args=(d.endpoint, direct, name, stop, errors, counts))
            for name, direct in (("routed", False), ("direct", True))]
    for t in good:
        t.start()

    fuzzer = Fuzzer(seed)
    ctx = zmq.Context()
    socks = []
    for _, endpoint in targets:
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(endpoint)
        socks.append(s)
    sent = [0] * len(socks)
    received = [0] * len(socks)
    statuses: dict[int, int] = {}
    tried = 0

    def take(i: int) -> None:
        status = proto.decode_reply(socks[i].recv_multipart()[-1]).status
        statuses[status] = statuses.get(status, 0) + 1
        received[i] += 1

    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for i, s in enumerate(socks):
                for _ in range(20):
                    s.send_multipart(fuzzer.message())
                    sent[i] += 1
                    tried += 1
                while s.poll(0 if sent[i] - received[i] < _INFLIGHT else 2000):
                    take(i)
                    if sent[i] - received[i] < _INFLIGHT // 2:
                        break
        for i, s in enumerate(socks):  # every message, however broken, gets exactly one reply
            while received[i] < sent[i] and s.poll(30_000):
                take(i)
    finally:
        stop.set()
        for t in good:
            t.join(30)
        for s in socks:
            s.close()
        ctx.term()

    with capsys.disabled():
        print(f"\nlive fuzz: {tried} inputs in {seconds:g} s (seed {seed}) to {', '.join(n for n, _ in targets)}; "
              f"replies by status {dict(sorted(statuses.items()))}; well-behaved ops: {counts}")
    assert errors == [], f"seed {seed}: {errors[:5]}"
    assert all(counts.get(name, 0) > 0 for name in ("routed", "direct")), counts
    assert received == sent, f"seed {seed}: replies {received} for messages {sent}"
    with Client(d.endpoint, timeout=30.0) as admin:
        health = admin.health()
        assert health["ok"] and not health["maintenance"], health
        assert admin.topology()["shards"] == 2
        # Every request was answered once: the router tracks nothing in flight but this stats call (Rule 5).
        assert admin.stats()["router"]["clients_in_flight"] == 1
        rss_after = _workers_rss(admin)
    for shard, rss in rss_after.items():
        assert rss - rss_before[shard] < _RSS_GROWTH, (shard, rss_before, rss_after)
    assert "Traceback" not in d.log() and "internal error" not in d.log()


def test_direct_endpoint_cuts_off_frames_past_twice_the_message_limit(make_daemon, tmp_path):
    """Like the public endpoint (docs/protocol.md, transport): the worker never buffers such a frame."""
    cfg = tmp_path / "small.toml"
    cfg.write_text('max_value_bytes = "64KiB"\nmax_message_bytes = "128KiB"\n')
    d = make_daemon(shards=1, config=str(cfg))
    with Client(d.endpoint, timeout=30.0) as c:
        endpoint = c.topology()["endpoints"][0]
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(endpoint)
    try:
        s.send(proto.encode_request(1, proto.Set(b"k", b"v" * (200 << 10))))  # over 1x: answered
        assert s.poll(30_000)
        reply = proto.decode_reply(s.recv())
        assert (reply.id, reply.status) == (1, proto.TOO_LARGE), reply
        s.send(proto.encode_request(2, proto.Set(b"k", b"v" * (1 << 20))))  # over 2x: connection cut
        assert not s.poll(1000)
    finally:
        s.close()
        ctx.term()
    with Client(d.endpoint, timeout=30.0, direct=True) as c:
        assert c.set(b"k", b"fine") is True and c.get(b"k") == b"fine"
