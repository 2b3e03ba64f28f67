"""Helpers for the near-cache tests (docs/near-cache.md): a one-shard fake daemon whose invalidation
feed the test controls, and small waits on a client's near cache.

The fake is a ROUTER socket in a thread whose requests a real ``shardd.worker.Shard`` applies
(so replies, leases and the invalidations a write owes are the worker's own), and an XPUB feed
on which it publishes what the shard owes before each reply and a heartbeat every 20 ms, as a
worker does. The test can hold invalidations back (``publish = False``), stop the heartbeats
(``silent = True``), restart the feed as a new incarnation on a new port, or have the fake be a
daemon that predates near caches (``old = True``: no feed in its topology, and ``near_get`` is an
op it cannot decode) or only refuse ``near_get`` (``refuse_near_get = True``).
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import zmq

from shardd import protocol as p
from shardd.config import build_config
from shardd.hot_marks import HotMarks
from shardd.store import Store
from shardd.worker import Shard
from tests import helpers

WAIT = 30.0  # seconds: a deadline against a hang, never a bound a test asserts on
HEARTBEAT_S = 0.02


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class FakeDaemon:
    """One shard behind a ROUTER socket, with an invalidation feed (see the module docstring)."""

    def __init__(self, near: bool = True, old: bool = False, refuse_near_get: bool = False,
                 lease_ms: int = 10_000) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        config = build_config({"shards": 1, "near_cache": near, "near_cache_lease_ms": lease_ms,
                               "hot_key_min_rate": 1e9})  # nothing is marked but what the test marks
        self.store = Store(monotonic_ms)
        self.shard = Shard(self.store, config, 0, None)
        self.refuse_near_get = old or refuse_near_get
        self.publish = True
        self.silent = False
        self.received: list[str] = []  # the op tags in arrival order
        self.topologies = 0
        self.lock = threading.Lock()  # the shard and the feed belong to the thread; tests borrow them
        self.feed: zmq.Socket | None = None
        self.feed_endpoint: str | None = None
        if near and not old:
            self._bind_feed()
        self._next_heartbeat = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake near daemon", daemon=True)
        self._thread.start()

    @property
    def near(self) -> HotMarks:
        assert self.shard.near is not None
        return self.shard.near

    def _bind_feed(self) -> None:
        feed = self.ctx.socket(zmq.XPUB)
        feed.setsockopt(zmq.LINGER, 0)
        feed.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.feed_endpoint = f"tcp://127.0.0.1:{feed.bind_to_random_port('tcp://127.0.0.1')}"
        self.feed = feed

    def mark(self, *keys: bytes) -> None:
        with self.lock:
            self.near.evaluate([(key, 1e12) for key in sorted(self.near.marked | set(keys))], 0.0, 0.0)

    def put(self, key: bytes, value: bytes) -> None:
        """A write by some other client (through the shard: it owes the key's invalidation)."""
        with self.lock:
            self.shard.run(p.Set(key, value), False)
            self._publish()

    def restart_feed(self) -> None:
        """What a restarted worker looks like to clients: a new incarnation on a new port, an empty store."""
        with self.lock:
            assert self.feed is not None
            self.feed.close(0)
            self.shard.near = HotMarks(0, 0.01, 1e9, 64, self.near.lease_ms)
            self.store.vanishing = self.shard.near.touched
            self.store.flush()
            self._bind_feed()

    def tags(self) -> list[str]:
        with self.lock:
            return list(self.received)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "fake daemon thread did not stop"
        self.sock.close(0)
        if self.feed is not None:
            self.feed.close(0)
        self.ctx.term()

    def _publish(self) -> None:
        near = self.shard.near
        if self.feed is not None and near is not None and self.publish and (near.pending or near.all_pending):
            self.feed.send(near.take())

    def _topology(self) -> dict[str, Any]:
        topology: dict[str, Any] = {"epoch": 1, "shards": 1, "endpoints": [None], "resizing": None,
                                    "pending_resize": None}
        if self.feed_endpoint is not None:
            topology["invalidations"] = [self.feed_endpoint]
        return topology

    def _serve(self) -> None:
        limits = p.Limits()
        while not self._stop.is_set():
            with self.lock:
                feed = self.feed
                if feed is not None:
                    while feed.poll(0):
                        if feed.recv()[:1] == b"\x01" and not self.silent:  # greet a new subscriber
                            feed.send(self.near.heartbeat())
                    now = time.monotonic()
                    if now >= self._next_heartbeat and not self.silent:
                        self._publish()
                        feed.send(self.near.heartbeat())
                        self._next_heartbeat = now + HEARTBEAT_S
            if not self.sock.poll(5, zmq.POLLIN):
                continue
            ident, frame = self.sock.recv_multipart()
            env = p.decode_envelope(frame, limits)
            assert isinstance(env, p.Envelope), p.decode_reply(env)
            tag = env.op.__struct_config__.tag
            with self.lock:
                self.received.append(tag)
                if type(env.op) is p.Topology:
                    self.topologies += 1
                    reply = p.encode_reply(env.id, p.OK, self._topology())
                elif type(env.op) is p.NearGet and self.refuse_near_get:
                    # What a daemon that predates near_get answers: it cannot decode the op.
                    reply = p.encode_reply(env.id, p.BAD_REQUEST, "unknown op 'near_get'")
                else:
                    reply = self.shard.apply(frame)
                    self._publish()  # before the reply, as a worker does (hot_marks, Rule 2)
            self.sock.send_multipart([ident, reply])


@contextmanager
def fake_daemon(**kwargs: Any) -> Iterator[FakeDaemon]:
    fake = FakeDaemon(**kwargs)
    try:
        yield fake
    finally:
        fake.stop()


def wait_until(condition: Any, timeout: float = WAIT, what: str = "the condition") -> Any:
    """tests.helpers.wait_until with this module's deadline and a finer poll (a near-cache read is µs)."""
    return helpers.wait_until(condition, timeout, 0.002, what)


def stat(client: Any, name: str) -> int:
    stats = client.near_cache_stats()
    assert stats is not None, "the client's near cache is off"
    return stats[name]


def read_until_held(client: Any, key: bytes | str, timeout: float = WAIT) -> Any:
    """Read ``key`` until the client answered it from its near cache (a hit): it holds a copy now."""

    def held() -> bool:
        hits = stat(client, "hits")
        client.get(key)
        return stat(client, "hits") > hits

    wait_until(held, timeout, what=f"{key!r} served from the near cache")
    return client.get(key)


class Peeking:
    """Stands in for a client's feed (its ``_feed``, a transport_client.Subscriber) so that a test
    can wait until a message has reached the client's socket without the client having read it.

    ``wait_for`` moves messages from the socket into a stash until one matches; the client then
    takes the stash first, in order, exactly as it would have read them from the socket. With
    ``late`` set the client sees none of them, as if the feed were slow.
    """

    def __init__(self, subscriber: Any) -> None:
        self.subscriber = subscriber
        self.stash: list[bytes] = []
        self.late = False  # True: the client sees no message (they wait, as if still on their way)

    def pending(self) -> bool:
        return not self.late and (bool(self.stash) or self.subscriber.pending())

    def take(self) -> bytes | None:
        if self.late:
            return None
        return self.stash.pop(0) if self.stash else self.subscriber.take()

    def wait_for(self, match: Any, timeout: float = WAIT) -> p.Invalidation:
        """The first message, stashed or arriving, for which ``match(message)`` is true."""
        for frame in self.stash:
            message = p.decode_invalidation(frame)
            if match(message):
                return message
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.subscriber.wait(0.05):
                continue
            frame = self.subscriber.take()
            if frame is None:
                continue
            self.stash.append(frame)
            message = p.decode_invalidation(frame)
            if match(message):
                return message
        raise AssertionError(f"no matching message on the feed within {timeout} s")

    def __getattr__(self, name: str) -> Any:  # follow, close, endpoints, wait
        return getattr(self.subscriber, name)


def peek(client: Any) -> Peeking:
    """Put a Peeking in front of ``client``'s feed (it must follow one already)."""
    feed = client._feed
    assert feed is not None, "the client follows no feed yet"
    if not isinstance(feed, Peeking):
        feed = client._feed = Peeking(feed)
    return feed


def hold_and_peek(readers: list[Any], *keys: bytes) -> list[Peeking]:
    """Have every reader hold a copy of each key, then put a Peeking in front of each one's feed."""
    feeds = []
    for reader in readers:
        for key in keys:
            read_until_held(reader, key)
        feeds.append(peek(reader))
    return feeds


def keys_in(message: p.Invalidation) -> set[bytes]:
    return set(message.keys)


class Blocking:
    """An AsyncClient driven from a blocking test, one call at a time on its own event loop, so
    that one test body serves Client and AsyncClient alike (``near_cache_stats`` and the other
    plain methods pass through; ``_feed`` and ``_reply`` too, for peek and hooks)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from shardd.aclient import AsyncClient

        self.loop = asyncio.new_event_loop()
        self.client = AsyncClient(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            result = attr(*args, **kwargs)
            return self.loop.run_until_complete(result) if inspect.isawaitable(result) else result

        return call

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("loop", "client"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.client, name, value)

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()
