"""Client, AsyncClient and their pipelines against a one-shard daemon in a thread.

The fake's replies come from the daemon's own op implementation (``shardd.worker.Shard`` over a
``shardd.store.Store``); it can also be told to stay silent, hold replies back, answer a batch
of requests in reverse order, or answer a key with an error status, a strange value or a
garbage frame.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from shardd import errors, protocol
from shardd.aclient import AsyncClient, AsyncPipeline
from shardd.client import Client, Pipeline
from shardd.commands import COMMANDS
from shardd.config import build_config
from shardd.control import ControlClient
from shardd.serde import MsgpackSerde, Serde, Utf8Serde
from shardd.store import Store
from shardd.worker import Shard

WAIT = 30.0  # seconds: the deadline on every wait that should succeed at once (against a hang only)
FAST = 0.2  # seconds: the client timeout in tests that expect a Timeout
# seconds: the client timeout when one reply must time out while others arrive first; long,
# because on a busy machine "first" may take a while
MIXED = 2.0


CONFIG = build_config({"shards": 1})
NOW_MS = 1_000_000  # the fake's store clock stands still: TTLs read back exactly as set
PING = 1  # a ping answered by one shard


class FakeServer:
    """A one-shard daemon in a thread: a ROUTER socket whose requests a real Shard applies.

    Replies come from ``shardd.worker.Shard.apply`` over a real ``shardd.store.Store``, so the
    client tests exercise the daemon's own op semantics. The knobs below only decide *whether*
    and *when* a reply is sent, or replace it with a misbehaving server's.
    """

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.store = Store(lambda: NOW_MS)
        self.shard = Shard(self.store, CONFIG, 0, None, clock=lambda: NOW_MS / 1000)
        self.lock = threading.Lock()  # the store belongs to the serving thread; put() borrows it
        self.received: list[protocol.Envelope] = []
        self.silent = False  # drop every request
        self.hold_keys: set[bytes] = set()  # hold replies for these keys while they are in it
        self.gather = 0  # > 0: collect this many requests, then answer them in reverse order
        self.errors: dict[bytes, tuple[int, Any]] = {}  # key -> (status, value) to answer with
        self.values: dict[bytes | str, Any] = {}  # key or op name -> OK value to answer with
        self.garbage: set[bytes] = set()  # keys answered with an undecodable frame
        self._held: list[tuple[set[bytes], bytes, bytes]] = []
        self._gathered: list[tuple[bytes, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake shardd", daemon=True)
        self._thread.start()

    def put(self, key: bytes, value: bytes) -> None:
        """Store a key directly, as an earlier client would have."""
        with self.lock:
            self.store.set(key, value, None, protocol.ALWAYS)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "fake server thread did not stop"
        self.sock.close(0)
        self.ctx.term()

    def _serve(self) -> None:
        sock, limits = self.sock, protocol.Limits()
        while not self._stop.is_set():
            if not sock.poll(20, zmq.POLLIN):
                continue
            ident, frame = sock.recv_multipart()
            env = protocol.decode_envelope(frame, limits)
            assert isinstance(env, protocol.Envelope), protocol.decode_reply(env)
            self.received.append(env)
            if self.silent:
                continue
            answer, keys = self._answer(env, frame), self._keys(env.op)
            # Release held replies whose keys are no longer held before answering, so a
            # late reply reaches the client just ahead of the reply it must not be taken for.
            still_held = []
            for held in self._held:
                if held[0] & self.hold_keys:
                    still_held.append(held)
                else:
                    sock.send_multipart(held[1:])
            self._held = still_held
            if keys & self.hold_keys:
                self._held.append((keys, ident, answer))
                continue
            if self.gather:
                self._gathered.append((ident, answer))
                if len(self._gathered) >= self.gather:
                    for out in reversed(self._gathered):
                        sock.send_multipart(out)
                    self._gathered.clear()
                continue
            sock.send_multipart([ident, answer])

    @staticmethod
    def _keys(op: Any) -> set[bytes]:
        if hasattr(op, "key"):
            return {op.key}
        if hasattr(op, "keys"):
            return set(op.keys)
        if hasattr(op, "items"):
            return {k for k, _ in op.items}
        return set()

    def _answer(self, env: protocol.Envelope, frame: bytes) -> bytes:
        tag = env.op.__struct_config__.tag
        if tag in self.values:
            return protocol.encode_reply(env.id, protocol.OK, self.values[tag])
        for key in self._keys(env.op):
            if key in self.garbage:
                return b"\xc1 not msgpack"
            if key in self.errors:
                return protocol.encode_reply(env.id, *self.errors[key])
            if key in self.values:
                return protocol.encode_reply(env.id, protocol.OK, self.values[key])
        with self.lock:
            return self.shard.apply(frame)


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    yield fake
    fake.stop()


@pytest.fixture
def client(server: FakeServer) -> Iterator[Client]:
    with Client(server.endpoint, timeout=WAIT) as c:
        yield c


def run(coro_fn: Callable[[AsyncClient], Any], endpoint: str, timeout: float = WAIT) -> Any:
    """Run ``coro_fn(client)`` in a fresh loop with a fresh AsyncClient, closed at the end."""

    async def main() -> Any:
        async with AsyncClient(endpoint, timeout=timeout) as ac:
            return await asyncio.wait_for(coro_fn(ac), WAIT * 2)

    return asyncio.run(main())


# --- one scenario table, run by Client, AsyncClient and both pipelines --------------------

class Like:
    """An expected result that only has to pass ``check`` (for replies too large to spell out)."""

    def __init__(self, check: Callable[[Any], bool], text: str) -> None:
        self.check, self.text = check, text

    def __eq__(self, other: object) -> bool:
        return self.check(other)

    def __repr__(self) -> str:
        return self.text


# (method, args, kwargs, expected result); run in order against one empty fake.
SCENARIO: list[tuple[str, tuple[Any, ...], dict[str, Any], Any]] = [
    ("ping", (), {}, PING),
    ("get", ("k",), {}, None),
    ("set", ("k", b"v1"), {}, True),
    ("get", ("k",), {}, b"v1"),
    ("get", (b"k",), {}, b"v1"),
    ("set", ("k", bytearray(b"v2")), {"nx": True}, False),
    ("set", ("absent", b"x"), {"xx": True}, False),
    ("set", ("k", memoryview(b"v2")), {"xx": True}, True),
    ("get", ("k",), {}, b"v2"),
    ("exists", ("k",), {}, True),
    ("exists", ("nope",), {}, False),
    ("ttl", ("k",), {}, math.inf),
    ("ttl", ("nope",), {}, None),
    ("expire", ("k", 2.5), {}, True),
    ("ttl", ("k",), {}, 2.5),
    ("expire", ("nope", 1), {}, False),
    ("persist", ("k",), {}, True),
    ("ttl", ("k",), {}, math.inf),
    ("persist", ("nope",), {}, False),
    ("incr", ("n",), {}, 1),
    ("incr", ("n", 10), {}, 11),
    ("decr", ("n",), {}, 10),
    ("decr", ("n", 20), {}, -10),
    ("delete", ("k",), {}, True),
    ("delete", ("k",), {}, False),
    ("gets", ("nope",), {}, None),
    ("cas", ("nope", b"x", 1), {}, None),
    ("set", ("c", b"one"), {}, True),
    ("cas", ("c", b"two", 10**6), {}, False),
    ("get", ("c",), {}, b"one"),
    ("append", ("s", b"ab"), {}, 2),
    ("append", ("s", bytearray(b"cd")), {}, 4),
    ("get", ("s",), {}, b"abcd"),
    ("touch", ("s",), {}, True),
    ("touch", ("nope",), {}, False),
    ("ttl", ("s",), {}, math.inf),
    ("touch", ("s", 5), {}, True),
    ("ttl", ("s",), {}, 5.0),
    ("touch", ("nope", 5), {}, False),
    ("getdel", ("s",), {}, b"abcd"),
    ("getdel", ("s",), {}, None),
    ("exists", ("s",), {}, False),
    ("set_many", ({"a": b"A", b"b": b"B"},), {}, 2),
    ("set_many", ([("d", bytearray(b"D"))],), {"ttl": 60}, 1),
    ("get_many", (["a", b"b", "zz", "d"],), {}, {"a": b"A", b"b": b"B", "d": b"D"}),
    ("get_many", ([],), {}, {}),
    ("delete_many", (["a", "b", "zz"],), {}, 2),
    ("stats", (), {}, Like(lambda stats: stats["keys"] == 3, "stats with 3 keys")),
    ("flush", (), {}, 3),
    ("get", ("c",), {}, None),
]


def test_every_method_converts_its_reply(client: Client) -> None:
    for name, args, kwargs, expected in SCENARIO:
        assert getattr(client, name)(*args, **kwargs) == expected, (name, args, kwargs)


def test_every_method_async(server: FakeServer) -> None:
    async def body(ac: AsyncClient) -> None:
        for name, args, kwargs, expected in SCENARIO:
            assert await getattr(ac, name)(*args, **kwargs) == expected, (name, args, kwargs)

    run(body, server.endpoint)


def test_pipeline_runs_the_scenario_in_one_round(client: Client, server: FakeServer) -> None:
    pipe = client.pipeline()
    for name, args, kwargs, _ in SCENARIO:
        assert getattr(pipe, name)(*args, **kwargs) is pipe
    assert len(pipe) == len(SCENARIO)
    assert pipe.execute() == [expected for *_, expected in SCENARIO]
    assert len(pipe) == 0
    assert pipe.execute() == []


def test_async_pipeline_runs_the_scenario(server: FakeServer) -> None:
    async def body(ac: AsyncClient) -> list[Any]:
        pipe = ac.pipeline()
        for name, args, kwargs, _ in SCENARIO:
            getattr(pipe, name)(*args, **kwargs)
        return await pipe.execute()

    assert run(body, server.endpoint) == [expected for *_, expected in SCENARIO]


def test_gets_and_cas_round_trip(client: Client) -> None:
    client.set("c", b"one")
    value, version = client.gets("c")
    assert value == b"one" and isinstance(version, int)
    assert client.cas("c", b"two", version, ttl=5) is True
    assert client.cas("c", b"three", version) is False
    assert client.get("c") == b"two"


# --- wire mapping ---------------------------------------------------------------------


def test_wire_ops_and_str_keys(client: Client, server: FakeServer) -> None:
    client.set("ключ", b"v", ttl=1.5, nx=True)
    client.set(b"k", b"v", xx=True)
    client.set(b"k", b"v")
    client.incr("n", 5)
    client.decr("n", 5)
    client.get_many(("a", b"b"))
    client.delete_many(["a"])
    client.cas(b"k", b"v", 7)
    client.set_many([("x", b"1")], ttl=2)
    ops = [env.op for env in server.received]
    assert ops == [
        protocol.Set("ключ".encode(), b"v", 1500, protocol.IF_ABSENT),
        protocol.Set(b"k", b"v", None, protocol.IF_PRESENT),
        protocol.Set(b"k", b"v", None, protocol.ALWAYS),
        protocol.Incr(b"n", 5),
        protocol.Incr(b"n", -5),
        protocol.GetMany([b"a", b"b"]),
        protocol.DeleteMany([b"a"]),
        protocol.Cas(b"k", b"v", 7, None),
        protocol.SetMany([(b"x", b"1")], 2000),
    ]
    assert all(env.version == protocol.PROTOCOL_VERSION for env in server.received)


@pytest.mark.parametrize(
    ("ttl", "ms"),
    [(1, 1000), (2.5, 2500), (0.003, 3), (0.0015, 2), (0.0001, 1), (1e-12, 1), (86400, 86_400_000)],
)
def test_ttl_seconds_become_whole_milliseconds_rounded_up(client, server, ttl, ms) -> None:
    client.expire("k", ttl)
    assert server.received[-1].op == protocol.Expire(b"k", ms)


def test_a_ttl_past_the_protocol_maximum_is_refused_before_sending(client, server) -> None:
    limit_s = protocol.MAX_TTL_MS // 1000
    client.expire("k", limit_s)
    assert server.received[-1].op == protocol.Expire(b"k", limit_s * 1000)
    sent = len(server.received)
    with pytest.raises(ValueError, match="ttl is too large"):
        client.expire("k", limit_s + 1)
    assert len(server.received) == sent


def test_request_ids_count_up_and_wrap_past_zero(client: Client, server: FakeServer) -> None:
    client.ping()
    client.ping()
    client._last_id = 2**64 - 2
    client.ping()
    client.ping()
    client.ping()
    assert [env.id for env in server.received] == [1, 2, 2**64 - 1, 1, 2]


def test_get_many_keys_results_by_the_callers_key_objects(client: Client) -> None:
    client.set(b"k", b"v")
    assert client.get_many(["k", b"k"]) == {"k": b"v", b"k": b"v"}
    assert client.get_many(iter(["k"])) == {"k": b"v"}


# --- argument misuse ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "args", "kwargs", "exc"),
    [
        ("get", (1,), {}, TypeError),
        ("get", (None,), {}, TypeError),
        ("get", (bytearray(b"k"),), {}, TypeError),
        ("set", ("k", "text"), {}, TypeError),
        ("set", ("k", 5), {}, TypeError),
        ("set", ("k", b"v"), {"nx": True, "xx": True}, ValueError),
        ("set", ("k", b"v"), {"ttl": 0}, ValueError),
        ("set", ("k", b"v"), {"ttl": -1.5}, ValueError),
        ("set", ("k", b"v"), {"ttl": math.nan}, ValueError),
        ("set", ("k", b"v"), {"ttl": math.inf}, ValueError),
        ("set", ("k", b"v"), {"ttl": "10"}, TypeError),
        ("set", ("k", b"v"), {"ttl": True}, TypeError),
        ("expire", ("k", 0), {}, ValueError),
        ("expire", ("k", None), {}, TypeError),
        ("incr", ("k", 1.5), {}, TypeError),
        ("incr", ("k", 2**63), {}, ValueError),
        ("decr", ("k", -(2**63)), {}, ValueError),
        ("cas", ("k", b"v", -1), {}, ValueError),
        ("cas", ("k", b"v", "1"), {}, TypeError),
        ("get_many", ("abc",), {}, TypeError),
        ("get_many", ([b"a", 1],), {}, TypeError),
        ("delete_many", (b"abc",), {}, TypeError),
        ("set_many", ([b"ab"],), {}, TypeError),
        ("set_many", ({"k": "v"},), {}, TypeError),
    ],
)
def test_argument_misuse_raises_before_sending(client, server, method, args, kwargs, exc) -> None:
    with pytest.raises(exc):
        getattr(client, method)(*args, **kwargs)
    with pytest.raises(exc):
        getattr(client.pipeline(), method)(*args, **kwargs)
    assert client.ping() == PING
    assert len(server.received) == 1


@pytest.mark.parametrize("timeout", [0, -1, math.inf, math.nan])
def test_bad_timeout(timeout) -> None:
    with pytest.raises(ValueError):
        Client(timeout=timeout)


# --- errors from the daemon -----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (protocol.BAD_REQUEST, errors.BadRequest),
        (protocol.UNSUPPORTED_VERSION, errors.UnsupportedVersion),
        (protocol.TOO_LARGE, errors.TooLarge),
        (protocol.BUSY, errors.Busy),
        (protocol.UNAVAILABLE, errors.Unavailable),
        (protocol.NOT_INTEGER, errors.NotInteger),
        (protocol.INTERNAL_ERROR, errors.InternalError),
        (99, errors.ServerError),
    ],
)
def test_error_status_raises_its_exception(client: Client, server: FakeServer, status, cls) -> None:
    server.errors[b"bad"] = (status, "it went wrong")
    with pytest.raises(cls, match="it went wrong") as info:
        client.get("bad")
    assert type(info.value) is cls
    assert info.value.status == status
    assert client.get("good") is None  # the client is still usable


def test_not_integer_from_incr(client: Client) -> None:
    client.set("k", b"abc")
    with pytest.raises(errors.NotInteger):
        client.incr("k")


def test_garbage_frame_raises_protocol_error(client: Client, server: FakeServer) -> None:
    server.garbage.add(b"junk")
    with pytest.raises(errors.ProtocolError):
        client.get("junk")
    assert client.set("k", b"v") is True


@pytest.mark.parametrize(
    ("method", "args", "value"),
    [
        ("get", ("odd",), 5),
        ("set", ("odd", b"v"), 1),
        ("ttl", ("odd",), -3),
        ("ttl", ("odd",), b"1"),
        ("incr", ("odd",), True),
        ("gets", ("odd",), [b"v"]),
        ("cas", ("odd", b"v", 1), 0),
        ("get_many", (["odd", "b"],), [b"x"]),
        ("get_many", (["odd"],), [5]),
        ("stats", (), [1]),
    ],
)
def test_wrong_shaped_reply_raises_protocol_error(client, server, method, args, value) -> None:
    server.values[b"odd"] = value
    server.values["stats"] = value
    with pytest.raises(errors.ProtocolError):
        getattr(client, method)(*args)


# --- timeouts and late replies --------------------------------------------------------


def test_silent_server_times_out_with_endpoint_and_duration(server: FakeServer) -> None:
    server.silent = True
    with Client(server.endpoint, timeout=FAST) as c:
        start = time.monotonic()
        with pytest.raises(errors.Timeout, match=rf"{server.endpoint}.*0\.2 s.*get") as info:
            c.get("k")
        elapsed = time.monotonic() - start
    assert isinstance(info.value, TimeoutError)
    assert FAST * 0.9 <= elapsed < WAIT  # never early; the upper bound only catches a hang


def test_unreachable_endpoint_times_out() -> None:
    with Client("tcp://127.0.0.1:1", timeout=FAST) as c, pytest.raises(errors.Timeout):
        c.ping()


def test_late_reply_is_not_returned_by_the_next_call(server: FakeServer) -> None:
    server.put(b"a", b"A")
    server.put(b"b", b"B")
    server.hold_keys = {b"a"}
    with Client(server.endpoint, timeout=FAST) as c:
        with pytest.raises(errors.Timeout):
            c.get("a")
        c.timeout = WAIT  # the calls below must succeed, however busy the machine
        server.hold_keys = set()
        # The fake now sends the held reply for "a" first, then the one for "b".
        assert c.get("b") == b"B"
        assert c.get("a") == b"A"
        assert c.pipeline().get("b").get("a").execute() == [b"B", b"A"]


def test_late_reply_is_not_taken_by_a_pipeline(server: FakeServer) -> None:
    server.put(b"a", b"A")
    server.hold_keys = {b"a"}
    with Client(server.endpoint, timeout=FAST) as c:
        with pytest.raises(errors.Timeout):
            c.get("a")
        c.timeout = WAIT
        server.hold_keys = set()
        assert c.pipeline().get("b").exists("a").execute() == [None, True]


def test_pipeline_timeout(server: FakeServer) -> None:
    server.hold_keys = {b"slow"}
    with Client(server.endpoint, timeout=MIXED) as c:
        pipe = c.pipeline().set("k", b"v").get("slow").get("k")
        with pytest.raises(errors.Timeout, match="1 of 3"):
            pipe.execute()
        pipe.set("k", b"w").get("slow").get("k")
        first, second, third = pipe.execute(raise_on_error=False)
    assert first is True and third == b"w"
    assert isinstance(second, errors.Timeout)


# --- pipelines ------------------------------------------------------------------------


def test_pipeline_sends_everything_before_reading_and_matches_reversed_replies(
    client: Client, server: FakeServer
) -> None:
    server.gather = 5  # the fake answers only once it has all 5 requests, last first
    with client.pipeline() as pipe:
        pipe.set("a", b"1").incr("n").get("a").exists("zz").ttl("a")
        assert pipe.execute() == [True, 1, b"1", False, math.inf]
    assert [env.id for env in server.received] == [1, 2, 3, 4, 5]


def test_pipeline_errors_in_place_or_first_raised(client: Client, server: FakeServer) -> None:
    server.errors[b"busy"] = (protocol.BUSY, "mailbox full")
    server.errors[b"down"] = (protocol.UNAVAILABLE, "shard 1 is down")
    server.values[b"odd"] = 7
    pipe = client.pipeline().set("k", b"v").get("busy").get("odd").get("down").get("k")
    results = pipe.execute(raise_on_error=False)
    assert results[0] is True and results[4] == b"v"
    assert isinstance(results[1], errors.Busy)
    assert isinstance(results[2], errors.ProtocolError)
    assert isinstance(results[3], errors.Unavailable)
    pipe.get("down").get("busy").set("k2", b"v")
    with pytest.raises(errors.Unavailable):
        pipe.execute()
    # Every reply was collected before raising: the next call is not confused.
    assert client.get("k2") == b"v"


def test_pipeline_context_manager_resets_without_executing(client: Client, server: FakeServer) -> None:
    with client.pipeline() as pipe:
        pipe.set("k", b"v")
    assert len(pipe) == 0
    assert server.received == []
    pipe.set("k", b"v")
    pipe.reset()
    assert pipe.execute() == []
    assert server.received == []


# --- lifecycle ------------------------------------------------------------------------


def test_close_is_idempotent_and_use_after_close_raises(server: FakeServer) -> None:
    c = Client(server.endpoint, timeout=WAIT)
    pipe = c.pipeline().ping()
    assert c.ping() == PING
    c.close()
    c.close()
    assert c.closed
    with pytest.raises(errors.ConnectionClosed):
        c.get("k")
    with pytest.raises(errors.ConnectionClosed):
        pipe.execute()
    with Client(server.endpoint) as c2:
        assert not c2.closed
    assert c2.closed


def test_explicit_context_is_not_terminated(server: FakeServer) -> None:
    ctx = zmq.Context()
    try:
        with Client(server.endpoint, timeout=WAIT, context=ctx) as c:
            assert c.ping() == PING
        assert not ctx.closed
    finally:
        ctx.term()


def test_a_client_carried_across_fork_refuses_to_work(client: Client) -> None:
    import os
    import signal

    assert client.ping() == PING
    pid = os.fork()
    if pid == 0:  # child: touch no zmq, report through the exit code
        code = 1
        try:
            client.get("k")
        except RuntimeError:
            client.close()  # must not close the parent's socket
            code = 0
        except BaseException:
            code = 2
        os._exit(code)
    deadline = time.monotonic() + WAIT
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("forked child hung")
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert client.ping() == PING


def test_the_client_never_imports_daemon_modules() -> None:
    import subprocess
    import sys

    code = (
        "import sys, shardd.client, shardd.aclient\n"
        "bad = {'config', 'store', 'worker', 'router', 'supervisor', 'transport'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'shardd' and m.split('.')[-1] in bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


# --- AsyncClient ----------------------------------------------------------------------


def test_async_many_concurrent_coroutines(server: FakeServer) -> None:
    n = 300

    async def body(ac: AsyncClient) -> None:
        assert await ac.set_many({f"k{i}": str(i).encode() for i in range(n)}) == n
        server.gather = 50  # answer in reversed groups of 50
        values = await asyncio.gather(*(ac.get(f"k{i}") for i in range(n)))
        assert values == [str(i).encode() for i in range(n)]
        server.gather = 0
        counts = await asyncio.gather(*(ac.incr("counter") for _ in range(n)))
        assert sorted(counts) == list(range(1, n + 1))
        assert not ac._pending

    run(body, server.endpoint)


def test_async_concurrent_pipelines_and_calls(server: FakeServer) -> None:
    async def one(ac: AsyncClient, i: int) -> None:
        key = f"p{i}"
        assert await ac.pipeline().set(key, b"x").get(key).delete(key).execute() == [True, b"x", True]
        assert await ac.get(key) is None

    async def body(ac: AsyncClient) -> None:
        await asyncio.gather(*(one(ac, i) for i in range(50)))

    run(body, server.endpoint)


def test_async_error_statuses_and_garbage(server: FakeServer) -> None:
    server.errors[b"busy"] = (protocol.BUSY, "mailbox full")
    server.errors[b"weird"] = (42, "what")
    server.garbage.add(b"junk")

    async def body(ac: AsyncClient) -> None:
        with pytest.raises(errors.Busy, match="mailbox full"):
            await ac.get("busy")
        with pytest.raises(errors.ServerError) as info:
            await ac.get("weird")
        assert info.value.status == 42
        with pytest.raises(errors.ProtocolError):
            await ac.get("junk")
        with pytest.raises(TypeError):
            await ac.get(3)
        results = await ac.pipeline().get("busy").set("k", b"v").execute(raise_on_error=False)
        assert isinstance(results[0], errors.Busy) and results[1] is True
        assert await ac.get("k") == b"v"

    run(body, server.endpoint)


def test_async_timeout_and_late_reply_dropped(server: FakeServer) -> None:
    server.put(b"a", b"A")
    server.put(b"b", b"B")
    server.hold_keys = {b"a"}

    async def body(ac: AsyncClient) -> None:
        start = time.monotonic()
        with pytest.raises(errors.Timeout, match=server.endpoint):
            await ac.get("a")
        assert time.monotonic() - start >= FAST * 0.9
        assert not ac._pending
        ac.timeout = WAIT  # the calls below must succeed, however busy the machine
        server.hold_keys = set()
        assert await ac.get("b") == b"B"
        assert await ac.get("a") == b"A"

    run(body, server.endpoint, timeout=FAST)


def test_async_one_slow_key_does_not_delay_the_others(server: FakeServer) -> None:
    server.hold_keys = {b"slow"}

    async def body(ac: AsyncClient) -> None:
        slow = asyncio.ensure_future(ac.get("slow"))
        fast = await asyncio.gather(*(ac.set(f"f{i}", b"v") for i in range(20)))
        assert fast == [True] * 20
        assert not slow.done()
        with pytest.raises(errors.Timeout):
            await slow
        results = await ac.pipeline().get("slow").get("f1").execute(raise_on_error=False)
        assert isinstance(results[0], errors.Timeout) and results[1] == b"v"

    run(body, server.endpoint, timeout=MIXED)


def test_async_silent_server_times_out(server: FakeServer) -> None:
    server.silent = True

    async def body(ac: AsyncClient) -> None:
        results = await asyncio.gather(*(ac.ping() for _ in range(10)), return_exceptions=True)
        assert all(isinstance(r, errors.Timeout) for r in results)
        with pytest.raises(errors.Timeout, match="2 of 2"):
            await ac.pipeline().ping().ping().execute()

    run(body, server.endpoint, timeout=FAST)


def test_async_aclose_cancels_reader_and_fails_waiters(server: FakeServer) -> None:
    server.silent = True

    async def main() -> None:
        ac = AsyncClient(server.endpoint, timeout=WAIT)
        waiter = asyncio.ensure_future(ac.get("k"))
        deadline = time.monotonic() + WAIT
        while not server.received:  # readiness: the request is out, the reader waits for its reply
            assert time.monotonic() < deadline, "the request never reached the server"
            await asyncio.sleep(0.005)
        reader = ac._reader
        assert reader is not None and not reader.done()
        await ac.aclose()
        await ac.aclose()
        assert reader.done()
        with pytest.raises(errors.ConnectionClosed):
            await asyncio.wait_for(waiter, WAIT)
        with pytest.raises(errors.ConnectionClosed):
            await ac.get("k")
        with pytest.raises(errors.ConnectionClosed):
            await ac.pipeline().ping().execute()

    asyncio.run(main())


def test_async_client_survives_a_new_event_loop(server: FakeServer) -> None:
    ac = AsyncClient(server.endpoint, timeout=WAIT)
    assert asyncio.run(ac.ping()) == PING
    assert asyncio.run(ac.set("k", b"v")) is True

    async def finish() -> bytes | None:
        try:
            return await ac.get("k")
        finally:
            await ac.aclose()

    assert asyncio.run(finish()) == b"v"


# --- one command set, written once ----------------------------------------------------------

# What each class has besides the commands: lifecycle, not commands.
_NOT_COMMANDS = {
    Client: {"close", "pipeline", "closed", "near_cache_stats"},
    AsyncClient: {"aclose", "pipeline", "closed", "near_cache_stats"},
    Pipeline: {"execute", "reset"},
    AsyncPipeline: {"execute", "reset"},
}


def _public_methods(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")
            and (inspect.isfunction(getattr(cls, name)) or isinstance(getattr(cls, name), property))}


def test_clients_and_pipelines_expose_the_same_commands_written_once() -> None:
    commands = {cls: _public_methods(cls) - _NOT_COMMANDS[cls] for cls in _NOT_COMMANDS}
    for cls, names in commands.items():
        assert names == COMMANDS, (cls.__name__, sorted(names ^ COMMANDS))
    for name in COMMANDS:  # the very same function object: there is no second copy to drift
        assert len({getattr(cls, name) for cls in _NOT_COMMANDS}) == 1, name
    assert {"append", "getdel", "touch"} <= COMMANDS


def test_control_ops_are_only_on_the_control_client() -> None:
    control_only = {"resize_start", "drain", "snapshot", "configure"}
    for cls in _NOT_COMMANDS:
        assert not control_only & set(dir(cls)), cls.__name__
    assert control_only <= set(dir(ControlClient))


def test_the_client_library_does_not_import_zmq_but_through_transport_client() -> None:
    import ast

    import shardd

    root = Path(shardd.__file__).parent
    paths = [root / f"{name}.py" for name in ("client", "aclient", "commands", "client_common", "placement",
                                                 "serde", "control")]
    paths += sorted((root / "cli").glob("*.py")) if (root / "cli").is_dir() else [root / "cli.py"]
    for path in paths:
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not {m for m in imported if m.split(".")[0] == "zmq"}, path


def test_a_bad_endpoint_is_a_shardd_error_naming_it() -> None:
    with pytest.raises(errors.BadEndpoint, match="nonsense://x") as info:
        Client("nonsense://x")
    assert isinstance(info.value, ValueError) and info.value.reason


def test_new_and_admin_commands_send_their_wire_ops(client: Client, server: FakeServer) -> None:
    server.values.update({"topology": {"epoch": 1}, "resize": {"to": 2}, "tune": 1, "maintenance": False,
                          "health": {"shards": []}, "hotkeys": {"keys": []}})
    client.append("k", b"v")
    client.getdel(b"k")
    client.touch("k")
    client.touch("k", 1.5)
    assert client.topology() == {"epoch": 1}
    assert client.resize(2) == {"to": 2}
    assert client.tune(mailbox_limit=5) == 1
    assert client.maintenance() is False
    assert client.health(0.25) == {"shards": []}
    assert client.hotkeys(3) == {"keys": []}
    assert [env.op for env in server.received] == [
        protocol.Append(b"k", b"v"), protocol.GetDel(b"k"), protocol.Touch(b"k", None), protocol.Touch(b"k", 1500),
        protocol.Topology(), protocol.Resize(2), protocol.Tune({"mailbox_limit": 5}), protocol.Maintenance(None),
        protocol.Health(250), protocol.Hotkeys(3),
    ]


# --- serde: values as Python objects, bytes on the wire -------------------------------------


class JsonSerde:
    """A serde a user might write: JSON text as UTF-8."""

    def dumps(self, value: Any) -> bytes:
        return json.dumps(value).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


VALUES = [{"a": [1, 2.5, None]}, "text ✓", 42, [True, False], None]


@pytest.mark.parametrize("serde", [MsgpackSerde(), JsonSerde()], ids=["msgpack", "json"])
def test_a_serde_round_trips_values_through_every_value_command(server: FakeServer, serde: Serde) -> None:
    with Client(server.endpoint, timeout=WAIT, serde=serde) as c:
        for i, value in enumerate(VALUES):
            assert c.set(f"k{i}", value) is True
            assert c.get(f"k{i}") == value
            assert server.store.get(f"k{i}".encode()) == serde.dumps(value)  # bytes on the wire and in the store
        assert c.get("missing") is None
        stored, version = c.gets("k0")
        assert stored == VALUES[0]
        assert c.cas("k0", {"b": 2}, version) is True and c.get("k0") == {"b": 2}
        assert c.set_many({"m1": [1], "m2": "two"}) == 2
        assert c.get_many(["m1", "m2", "nope"]) == {"m1": [1], "m2": "two"}
        assert c.getdel("m1") == [1] and c.getdel("m1") is None
        assert c.pipeline().set("p", {"x": 1}).get("p").gets("p").execute()[:2] == [True, {"x": 1}]

    async def body(ac: AsyncClient) -> None:
        assert await ac.set("a", VALUES[0]) is True
        assert await ac.get("a") == VALUES[0]
        assert await ac.pipeline().get("a").get_many(["a"]).execute() == [VALUES[0], {"a": VALUES[0]}]

    async def main() -> None:
        async with AsyncClient(server.endpoint, timeout=WAIT, serde=serde) as ac:
            await asyncio.wait_for(body(ac), WAIT)

    asyncio.run(main())


def test_utf8_serde_and_append(client: Client, server: FakeServer) -> None:
    with Client(server.endpoint, timeout=WAIT, serde=Utf8Serde()) as c:
        assert c.set("s", "héllo") is True
        assert c.append("s", " wörld") == len("héllo wörld".encode())
        assert c.get("s") == "héllo wörld"
        with pytest.raises(TypeError, match="str"):
            c.set("s", b"bytes")
    assert client.get("s") == "héllo wörld".encode()  # a client without a serde sees the bytes


def test_serde_misuse_and_unreadable_values(server: FakeServer) -> None:
    class Wrong:
        def dumps(self, value: Any) -> Any:
            return "not bytes"

        def loads(self, data: bytes) -> Any:
            return data

    with Client(server.endpoint, timeout=WAIT, serde=Wrong()) as c, pytest.raises(TypeError, match="not bytes"):
        c.set("k", 1)
    server.put(b"raw", b"\xff not json")
    with Client(server.endpoint, timeout=WAIT, serde=JsonSerde()) as c:
        with pytest.raises(errors.ProtocolError, match="JsonSerde"):
            c.get("raw")
        with pytest.raises(TypeError):
            c.set("k", object())  # json cannot: raised before sending
        results = c.pipeline().get("raw").set("ok", 1).execute(raise_on_error=False)
        assert isinstance(results[0], errors.ProtocolError) and results[1] is True
    assert len([env for env in server.received if env.op == protocol.Set(b"k", b"1", None, 0)]) == 0
