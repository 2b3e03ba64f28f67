"""Client-side ZeroMQ: the one module the client library uses to reach a daemon.

It owns the client end of the transport: which socket a client uses (a DEALER), its
options and why, CURVE keys, and how a blocking client sends and waits with a deadline.
:mod:`shardd.transport` owns the server end; the two meet only on the wire.

Invariants
----------
1. Nothing else in the client library imports zmq: ``Client``, ``AsyncClient``, the CLI and
   the supervisor's control client reach the daemon only through :class:`Dealer` and
   :class:`AsyncDealer`, and see transport failures as shardd exceptions
   (:class:`~shardd.errors.BadEndpoint` for an address that cannot be used).
2. A dealer only queues a request once a connection exists (``IMMEDIATE``), so a request
   that timed out while the daemon was unreachable is never delivered later; it lingers 0 ms,
   so closing never blocks.
3. ``Dealer.send`` and ``Dealer.recv`` never wait past the deadline they are given and never
   raise for "not yet": the hot path has no exception and no poll it does not need (a failed
   non-blocking recv costs ~2.5 µs, a poll ~1.4 µs: docs/design.md, "Where the time goes").
4. The Context is shared (``Context.instance()`` unless one is passed in) and never terminated
   here: a dealer owns only its socket.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import time
from typing import Any

import zmq
import zmq.asyncio

from shardd.errors import BadEndpoint

__all__ = ["AsyncDealer", "Curve", "Dealer", "Subscriber", "load_curve"]

Curve = tuple[bytes, bytes, bytes]  # server public key, client public key, client secret key

# Plain ints: enum arithmetic and enum-typed flags cost ~0.5 µs per call (docs/design.md).
_NOBLOCK = int(zmq.NOBLOCK)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_EVENTS = int(zmq.EVENTS)
_Again = zmq.Again
_monotonic = time.monotonic
_ceil = math.ceil


def load_curve(auth_dir: str, name: str = "admin") -> Curve:
    """The keys a client needs for a daemon with ``auth_dir`` (see ``shardd keys generate``)."""
    import zmq.auth

    server_public, _ = zmq.auth.load_certificate(os.path.join(auth_dir, "server.key"))
    public, secret = zmq.auth.load_certificate(os.path.join(auth_dir, f"{name}.key_secret"))
    if secret is None:
        raise ValueError(f"{auth_dir}/{name}.key_secret holds no secret key")
    return server_public, public, secret


def _connect(ctx: Any, endpoint: str, curve: Curve | None) -> Any:
    """A DEALER to ``endpoint`` with Invariant 2's options (zmq and zmq.asyncio contexts alike)."""
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        if curve is not None:  # a CURVE client of the daemon: keys before connecting
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise BadEndpoint(f"bad endpoint {endpoint!r}: {exc.strerror}", exc.strerror) from None
    except BaseException:
        sock.close(0)
        raise
    return sock


class Dealer:
    """One blocking client connection: send a frame by a deadline, receive one by a deadline."""

    __slots__ = ("_sock",)

    def __init__(self, endpoint: str, curve: Curve | None = None, context: Any = None) -> None:
        ctx = context if context is not None else zmq.Context.instance()
        self._sock = _connect(ctx, endpoint, curve)

    def send(self, frame: bytes, deadline: float) -> bool:
        """Queue ``frame`` by ``deadline`` (a ``time.monotonic()`` value); False if it could not be."""
        sock = self._sock
        while True:
            try:
                sock.send(frame, _NOBLOCK)
                return True
            except _Again:  # no connection yet (IMMEDIATE), or the queue is full: wait for room
                if not sock.poll(_ms(deadline - _monotonic()), _POLLOUT):
                    return False

    def recv(self, deadline: float) -> bytes | None:
        """The next frame received by ``deadline``, or None once it has passed."""
        sock = self._sock
        while sock.poll(_ms(deadline - _monotonic()), _POLLIN):
            try:
                return sock.recv(_NOBLOCK)
            except _Again:
                continue
        return None

    def close(self) -> None:
        self._sock.close(0)


class AsyncDealer:
    """One asyncio client connection: ``await send(frame)``, ``await recv()``; deadlines are the caller's.

    ``send`` and ``recv`` are the socket's own bound methods, so a call costs no extra coroutine.
    """

    __slots__ = ("_sock", "recv", "send")

    def __init__(self, endpoint: str, curve: Curve | None = None, context: Any = None) -> None:
        ctx = context if context is not None else zmq.asyncio.Context.instance()
        self._sock = sock = _connect(ctx, endpoint, curve)
        self.send = sock.send
        self.recv = sock.recv

    def close(self) -> None:
        self._sock.close(0)


class Subscriber:
    """A near-cache client's subscription to the workers' invalidation feeds (shardd.near_cache).

    Never waited on: the client drains it before each read. ``pending`` is one ``epoll`` of the
    sockets' ZMQ_FDs (~0.5 µs; a ZMQ_EVENTS query costs 2-3.5 µs here, a failed recv ~2.5 µs).
    ZMQ_FD is edge-like: it signals when a socket has commands to process, e.g. when an empty
    pipe gets a message. So after it signals, ``take`` asks ZMQ_EVENTS (which processes the
    commands, unthrottled, unlike a non-blocking recv) and reads until there is nothing left,
    which re-arms the signal for the next message (zmq_getsockopt(3), ZMQ_FD).
    A blocking socket even for AsyncClient: it is only read without blocking, so it needs no
    event loop (its Context shadows the client's, or is the shared one).
    """

    __slots__ = ("_dirty", "_epoll", "_monitor", "_sock", "endpoints")

    # Far more than a client falls behind between two reads; past it the feed drops messages,
    # the client sees the sequence number jump and drops that shard's copies (near_cache, Rule 2).
    HWM = 10_000

    def __init__(self, curve: Curve | None = None, context: Any = None) -> None:
        if context is None:
            ctx = zmq.Context.instance()
        elif isinstance(context, zmq.asyncio.Context):
            ctx = zmq.Context.shadow(context.underlying)
        else:
            ctx = context
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self.HWM)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        if curve is not None:
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve
        self._sock = sock
        # A worker that dies closes its feed's connection at once: the client hears it here and drops
        # that shard's copies then, not when the feed has been silent for a while (near_cache, Rule 2).
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._epoll = select.epoll()
        for s in (sock, self._monitor):
            self._epoll.register(s.getsockopt(zmq.FD), select.EPOLLIN)
        self.endpoints: set[str] = set()
        # True after anything that may have processed the socket's commands (connect, disconnect)
        # and so consumed a signal: the next ``pending`` says yes, and ``take`` reads until empty.
        self._dirty = False

    def follow(self, endpoints: set[str]) -> None:
        """Be connected to exactly these feeds."""
        sock = self._sock
        for endpoint in self.endpoints - endpoints:
            with contextlib.suppress(zmq.ZMQError):
                sock.disconnect(endpoint)
        for endpoint in endpoints - self.endpoints:
            try:
                sock.connect(endpoint)
            except zmq.ZMQError as exc:
                raise BadEndpoint(f"bad endpoint {endpoint!r}: {exc.strerror}", exc.strerror) from None
        self.endpoints = set(endpoints)
        self._dirty = True

    def pending(self) -> bool:
        """Whether a message or a lost connection may be waiting (then drain with ``take`` and ``lost``)."""
        return self._dirty or bool(self._epoll.poll(0))

    def take(self) -> bytes | None:
        """The next waiting message, or None."""
        sock = self._sock
        if sock.getsockopt(_EVENTS) & _POLLIN:
            try:
                return sock.recv(_NOBLOCK)
            except _Again:
                pass
        self._dirty = False  # read until empty: the next message signals ZMQ_FD again
        return None

    def lost(self) -> list[str]:
        """The feeds whose connection dropped since the last call."""
        from zmq.utils.monitor import recv_monitor_message

        gone = []
        while self._monitor.getsockopt(_EVENTS) & _POLLIN:
            event = recv_monitor_message(self._monitor, _NOBLOCK)
            endpoint = event.get("endpoint")
            gone.append(endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint))
        return gone

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a message (for tests and benchmarks, not the read path)."""
        return bool(self._sock.poll(_ms(timeout), _POLLIN))

    def close(self) -> None:
        self._epoll.close()
        self._sock.disable_monitor()
        self._monitor.close(0)
        self._sock.close(0)


def _ms(seconds: float) -> int:
    """A poll timeout in whole milliseconds, rounded up so a poll never wakes early."""
    return _ceil(seconds * 1000) if seconds > 0 else 0
