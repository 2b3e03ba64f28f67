"""What Client and AsyncClient share besides the commands: settings, ids, replies, pipelines.

The commands themselves are :mod:`shardd.commands`; the direct-mode policy is
:mod:`shardd.placement`; the socket is :mod:`shardd.transport_client`. What is left here is
the state and bookkeeping both clients keep identically around their I/O (:class:`ClientBase`);
what differs is only how they wait (blocking, or awaiting).

Rules
-----
Rule 1: request ids run 1 .. 2**64-1 and wrap to 1. Id 0 is never used: it is the id a
        server gives an error about a request whose id it could not read.
Rule 2: a reply frame that cannot be decoded raises ProtocolError; an error status raises
        its ServerError (or, in a pipeline, takes the result's place).
Rule 3: a pipeline's results are in call order; a slot with no reply by the deadline holds a
        Timeout; with ``raise_on_error`` the first error in call order is raised, after every
        reply has been collected.

No I/O here.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any, ClassVar, Self

import msgspec

from shardd import protocol
from shardd.commands import Codec, Commands, Convert
from shardd.errors import (
    ConnectionClosed,
    NotSent,
    ProtocolError,
    ServerError,
    SharddError,
    Timeout,
    error_for_status,
)
from shardd.near_cache import NearCache
from shardd.placement import REFRESH, Placement
from shardd.serde import Serde
from shardd.transport_client import Subscriber

DEFAULT_ENDPOINT = "tcp://127.0.0.1:7400"
DEFAULT_TIMEOUT = 1.0  # seconds; a local round trip is ~0.2 ms, so this only trips on trouble

U64 = (1 << 64) - 1
Call = tuple[protocol.Op, Convert]

UNANSWERED: Any = object()
"""Placeholder in a pipeline's result list for a request with no reply yet."""


def next_id(last: int) -> int:
    """The request id after ``last`` (Rule 1)."""
    return last % U64 + 1


def check_timeout(timeout: object) -> float:
    """A client timeout in seconds: a finite number > 0."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    if not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout}")
    return float(timeout)


def check_endpoint(endpoint: object) -> str:
    if not isinstance(endpoint, str):
        raise TypeError(f"endpoint must be a str such as {DEFAULT_ENDPOINT!r}")
    return endpoint


def decode(frame: bytes) -> protocol.Reply:
    """Decode one reply frame; a frame that is not a Reply raises ProtocolError (Rule 2)."""
    try:
        return protocol.decode_reply(frame)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable reply frame ({len(frame)} bytes): {exc}") from None


def server_error(reply: protocol.Reply) -> ServerError:
    value = reply.value
    return error_for_status(reply.status, value if isinstance(value, str) else repr(value))


def result(reply: protocol.Reply, convert: Convert) -> Any:
    """The converted value of ``reply``; an error status raises its ServerError."""
    if reply.status != protocol.OK:
        raise server_error(reply)
    return convert(reply.value)


def outcome(reply: protocol.Reply, convert: Convert) -> Any:
    """Like :func:`result`, but an error is returned instead of raised (for pipelines)."""
    if reply.status != protocol.OK:
        return server_error(reply)
    try:
        return convert(reply.value)
    except ProtocolError as exc:
        return exc


# How long a direct-mode client waits for a connection to a worker before it takes the router
# instead: a live connection queues at once (IMMEDIATE); a worker that restarted listens on a
# new port, which the client learns from the next topology.
WORKER_SEND_GRACE_S = 0.5


def not_sent_error(where: str | int, op: protocol.Op) -> NotSent:
    place = f"shard {where}" if type(where) is int else where
    return NotSent(f"no connection to {place} to send {op.__struct_config__.tag}; nothing was sent")


def timeout_error(where: str | int, timeout: float, op: protocol.Op) -> Timeout:
    """The Timeout for ``op`` sent to ``where``: an endpoint, or a shard number (direct mode)."""
    place = f"shard {where}" if type(where) is int else where
    return Timeout(f"no reply from {place} within {timeout:g} s to {op.__struct_config__.tag}")


def finish(results: list[Any], raise_on_error: bool, endpoint: str, timeout: float) -> list[Any]:
    """Pipeline results in call order, a Timeout in each unanswered slot (Rule 3)."""
    missing = results.count(UNANSWERED)
    if missing:
        text = (
            f"{missing} of {len(results)} pipelined requests got no reply"
            f" from {endpoint} within {timeout:g} s"
        )
        results = [Timeout(text) if r is UNANSWERED else r for r in results]
    if raise_on_error:
        for item in results:
            if isinstance(item, SharddError):
                raise item
    return results


class ClientBase(Commands):
    """What Client and AsyncClient hold alike: settings, collaborators and connections.

    ``context``: the ZeroMQ Context to create sockets in (``zmq.Context`` for Client,
    ``zmq.asyncio.Context`` for AsyncClient; default: the shared instance).
    ``curve``: keys from :func:`shardd.load_curve` for a daemon with authentication on.
    ``serde``: converts values to and from bytes (:mod:`shardd.serde`; default: values are bytes).
    ``placement``: the direct-mode policy (:mod:`shardd.placement`); ``direct=True`` is
    ``placement=Placement()``. Subclasses name their connection class as ``_dealer``.
    ``near_cache``: keep the daemon's hot keys in this client (:mod:`shardd.near_cache`,
    docs/near-cache.md): True (default) with the default bounds, a NearCache to choose them,
    False for none (every read then goes to the daemon: per-key linearizable reads).
    """

    _dealer: ClassVar[Callable[..., Any]]
    # The I/O each subclass provides, blocking or as coroutine functions:
    # _exchange(link, op, where) -> Reply, _scatter(steps) -> outcomes, _refresh_topology() -> None.
    _exchange: Callable[..., Any]
    _scatter: Callable[..., Any]
    _refresh_topology: Callable[..., Any]

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        timeout: float = DEFAULT_TIMEOUT,
        context: Any = None,
        direct: bool = False,
        curve: Any = None,
        *,
        serde: Serde | None = None,
        placement: Placement | None = None,
        near_cache: bool | NearCache = True,
    ) -> None:
        self.endpoint = check_endpoint(endpoint)
        self.timeout = check_timeout(timeout)
        self._codec = Codec(serde)
        self.serde = serde
        if placement is None and direct:
            placement = Placement()
        self.placement = placement
        self.direct = placement is not None
        self._context = context
        self._curve = curve
        self._link: Any = self._dealer(endpoint, curve, context)
        self._pid = os.getpid()
        self._last_id = 0
        self._workers: list[Any] = []          # a connection per shard id, as placement.endpoints
        self._worker_links: dict[str, Any] = {}  # endpoint → connection, kept across epochs
        if near_cache is True:
            near_cache = NearCache()
        elif near_cache is not False and not isinstance(near_cache, NearCache):
            raise TypeError(f"near_cache must be a bool or a NearCache, not {type(near_cache).__name__}")
        self._near: NearCache | None = None if near_cache is False else near_cache
        self._feed: Subscriber | None = None  # followed once the daemon has said where its feeds are
        self._near_retry_at = 0.0  # when to ask for the feeds (again): the first read, then at most 1/s
        self._feed_shards: dict[str, int] = {}  # feed endpoint -> shard, as the last topology said
        # When the feed was last seen with nothing waiting: what is drained later arrived after it. Messages
        # are stamped with it, not with the time they are read, so a heartbeat that sat in the socket while
        # its worker died does not count as heard just now (near_cache, Rule 2: silence).
        self._near_quiet_at = 0.0

    def __repr__(self) -> str:
        state = "closed" if self._link is None else "open"
        return f"<shardd.{type(self).__name__} {self.endpoint} timeout={self.timeout:g} {state}>"

    @property
    def closed(self) -> bool:
        """True once the client has been closed."""
        return self._link is None

    def _closed_error(self) -> ConnectionClosed:
        return ConnectionClosed(f"this {type(self).__name__} for {self.endpoint} is closed")

    def _check_process(self) -> None:
        if self._pid != os.getpid():
            raise RuntimeError(f"this {type(self).__name__} was created in process {self._pid};"
                               f" create a new one in each process")

    def _to(self, shard: int) -> Any:
        """The connection to ``shard`` (ROUTER, or below 0: the router)."""
        link = self._link if shard < 0 else self._workers[shard]
        if link is None:
            raise self._closed_error()
        return link

    def _step(self, step: Any) -> Any:
        """Do one step of a placement plan (shardd.placement): its outcome, or for AsyncClient,
        whose three I/O methods are coroutine functions, an awaitable of it."""
        if step is REFRESH:
            return self._refresh_topology()
        if type(step) is list:
            return self._scatter(step)
        shard, op = step
        return self._exchange(self._to(shard), op, self.endpoint if shard < 0 else shard)

    def _learn(self, topology: dict[str, Any]) -> None:
        """Take a topology as the placement and connect to every worker it names."""
        placement = self.placement
        assert placement is not None
        placement.learn(topology)
        self._near_learn(topology)
        links = self._worker_links
        workers: list[Any] = []
        for endpoint in placement.endpoints:
            link = links.get(endpoint) if endpoint else None
            if endpoint and link is None:
                link = links[endpoint] = self._dealer(endpoint, self._curve, self._context)
            workers.append(link)
        self._workers = workers

    # --- the near cache's bookkeeping around a read (the reads themselves are each client's) ---

    def near_cache_stats(self) -> dict[str, Any] | None:
        """The near cache's counters (hits, misses, entries, invalidations, ...), or None if it is off."""
        near = self._near
        if near is None:
            return None
        return {**near.stats(), "following": self._feed is not None}

    def _near_due(self, now: float) -> bool:
        """Whether to (re)read where the feeds are: a reply named a hot key from a feed this client
        does not follow (none yet, or a restarted worker's), and the last try was over a second ago."""
        near = self._near
        return near is not None and near.unfollowed and now >= self._near_retry_at

    def _near_learn(self, topology: dict[str, Any]) -> None:
        """Follow the feeds a topology names; a daemon that names none (older, or near_cache off):
        no near cache for this client."""
        near = self._near
        if near is None:
            return
        endpoints = topology.get("invalidations")
        if not isinstance(endpoints, list):
            self._near_off()
            return
        feed = self._feed
        if feed is None:
            feed = self._feed = Subscriber(self._curve, self._context)
        elif feed.pending():  # what came before the new connections, stamped as it arrived
            self._drain(feed, near, self._near_quiet_at)
        shards = {e: shard for shard, e in enumerate(endpoints) if isinstance(e, str) and e}
        feed.follow(set(shards))
        self._feed_shards = shards
        near.unfollowed = False
        self._near_quiet_at = time.monotonic()  # anything from the new connections arrives after this

    def _near_off(self) -> None:
        """No near cache for this client from now on (the daemon has none)."""
        self._near = None
        if self._feed is not None:
            self._feed.close()
            self._feed = None

    def _near_lookup(self, key: bytes, now: float) -> Any:
        """A copy to serve, or MISS; the feed is drained first (near_cache, Rule 3)."""
        feed = self._feed
        near = self._near
        assert feed is not None and near is not None
        if feed.pending():
            self._drain(feed, near, self._near_quiet_at)
        self._near_quiet_at = now
        return near.lookup(key, now)

    def _near_admit(self, key: bytes, reply: protocol.Reply, sent_at: float, writes_then: int) -> Any:
        """The value of a near_get reply, kept if near_cache's Rule 1 allows; an error status raises."""
        if reply.status != protocol.OK:
            raise server_error(reply)
        answer = reply.value
        if type(answer) is list and len(answer) == 5 and answer[1] == -1:  # a daemon with near caches off
            self._near_off()
            return answer[0]
        feed, near = self._feed, self._near
        assert near is not None
        if feed is not None and feed.pending():
            self._drain(feed, near, self._near_quiet_at)
            self._near_quiet_at = max(self._near_quiet_at, sent_at)  # empty now, at some time after sent_at
        return near.admit(key, reply.value, sent_at, writes_then)  # no feed followed yet: refused, unfollowed

    def _drain(self, feed: Subscriber, near: NearCache, now: float) -> None:
        take, on_message = feed.take, near.on_message
        taken = 0
        while (frame := take()) is not None:
            on_message(frame, now)
            taken += 1
        if taken >= Subscriber.HWM // 2:
            # So far behind that the feed may have dropped messages past its high-water mark, and the
            # message that would reveal the gap may not have come yet: drop every copy now.
            near.reset_all()
        for endpoint in feed.lost():  # its worker died or restarted: a new one listens elsewhere
            shard = self._feed_shards.get(endpoint)
            if shard is not None:
                near.feed_lost(shard)

    def _close_links(self, link: Any) -> None:
        """Close ``link`` and every worker connection, unless inherited through fork (the parent's)."""
        if self._pid == os.getpid():
            link.close()
            for worker in self._worker_links.values():
                worker.close()
            if self._feed is not None:
                self._feed.close()
        self._feed = None
        self._worker_links.clear()
        self._workers = []


class PipelineBase(Commands):
    """Queues commands for one round of sends; subclasses add ``execute``.

    Each command checks its arguments at once, queues the request and returns the pipeline,
    so calls chain. Nothing is sent until ``execute``. A pipeline always goes through the
    router, in direct mode too.
    """

    __slots__ = ("_calls", "_client", "_codec")

    def __init__(self, client: Any) -> None:
        self._client = client
        self._codec: Codec = client._codec
        self._calls: list[Call] = []

    def _call(self, op: protocol.Op, convert: Convert) -> Self:  # type: ignore[override]
        self._calls.append((op, convert))
        return self

    def __len__(self) -> int:
        return len(self._calls)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.reset()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.reset()

    def reset(self) -> None:
        """Drop every queued command without sending it."""
        self._calls = []

    def _take(self) -> list[Call]:
        calls, self._calls = self._calls, []
        return calls
