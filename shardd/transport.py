"""ZeroMQ plumbing: the only module of the daemon that imports zmq.

Owns socket options (each with its reason), framing, monitor events, reconnects, CURVE/ZAP and
what a failed send means. The router and the worker see only the server-side channels at the
bottom of this file (``Hub``, ``ClientInbox``, ``ShardChannel``, ``Publisher``); they never see a socket,
a flag or a zmq exception.

Frames are sent and received one at a time with plain-int flags: on this machine
``send_multipart`` costs ~5 µs against ~1 µs frame by frame, and ``zmq.SNDMORE | flags``
enum arithmetic ~0.5 µs (docs/design.md, "Where the time goes").
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import zmq

# Plain ints: enum arithmetic on the hot path costs more than the send itself.
SNDMORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)
POLLIN = int(zmq.POLLIN)
EVENTS = int(zmq.EVENTS)
RCVMORE = int(zmq.RCVMORE)


def new_context() -> zmq.Context:
    """A fresh Context for this process (never inherited: docs/design.md, decision 3)."""
    return zmq.Context(io_threads=1)


def client_facing_router(ctx: zmq.Context, max_message_bytes: int) -> zmq.Socket:
    """A ROUTER socket that clients connect to (the router's public one, a worker's own)."""
    sock = ctx.socket(zmq.ROUTER)
    # Linger bounds close(); replies to departed clients are worthless.
    sock.setsockopt(zmq.LINGER, 0)
    # A peer sending more than twice the message limit is cut off by libzmq before the bytes
    # are buffered; up to that size the router answers TOO_LARGE itself (a clearer error).
    sock.setsockopt(zmq.MAXMSGSIZE, 2 * max_message_bytes)
    # Fail sends to vanished peers instead of dropping silently, so we can count them.
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    # Bound what a client that sends without reading can make us hold (per peer).
    sock.setsockopt(zmq.SNDHWM, 10_000)
    sock.setsockopt(zmq.RCVHWM, 10_000)
    return sock


# ipc socket files: a local process that may write to one may talk to it. The internal
# sockets (workers, control) are the daemon user's alone; a public ipc endpoint also admits
# the daemon's group, the usual way to grant local clients access (Docker's socket, Redis's
# unixsocketperm). Never others: CURVE (below) is optional and covers tcp clients.
PRIVATE_IPC_MODE = 0o600
PUBLIC_IPC_MODE = 0o660


def bind(sock: zmq.Socket, endpoint: str, mode: int = PRIVATE_IPC_MODE) -> None:
    """Bind ``endpoint``; an ipc socket file is created with ``mode`` (never world-writable).

    libzmq creates the file with the process umask, so the umask is narrowed around the bind
    (which happens in this thread) and the mode set exactly afterwards.
    """
    if not endpoint.startswith("ipc://"):
        sock.bind(endpoint)
        return
    old = os.umask(0o177)
    try:
        sock.bind(endpoint)
    finally:
        os.umask(old)
    path = endpoint.removeprefix("ipc://")
    if not path.startswith("@"):  # Linux abstract sockets have no file, and no permissions
        os.chmod(path, mode)


# A failed connect to a missing ipc path costs one syscall: 100 a second per down shard is
# nothing, and bounds how long a restarted worker waits to be found.
SHARD_RECONNECT_MS = 10


def connect_shard_dealer(ctx: zmq.Context, endpoint: str,
                         identity: bytes | None = None) -> tuple[zmq.Socket, zmq.Socket]:
    """The router's DEALER to one worker, and a monitor socket reporting its connection state.

    The monitor is attached before connecting: a handshake that completed before it would
    never be reported, and the shard would stay "down" forever.
    """
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if identity is not None:  # how a worker tells a peer's batches from the router's (resp_worker)
        sock.setsockopt(zmq.IDENTITY, identity)
    # Queue only on a live connection: with no worker, a send fails at once (→ UNAVAILABLE)
    # instead of piling requests up for a worker that may never come back.
    sock.setsockopt(zmq.IMMEDIATE, 1)
    # A restarted worker binds the same path: retry every SHARD_RECONNECT_MS, never backing off,
    # so its shard is served again within that of the worker binding. libzmq's default doubling
    # (to 200 ms here before) left a restarted shard dark ~150 ms longer than it had to be.
    sock.setsockopt(zmq.RECONNECT_IVL, SHARD_RECONNECT_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 0)
    # In-flight work is bounded by the mailbox limit, not by the HWM; keep HWM out of the way.
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    monitor = sock.get_monitor_socket(int(zmq.EVENT_HANDSHAKE_SUCCEEDED) | int(zmq.EVENT_DISCONNECTED))
    sock.connect(endpoint)
    return sock, monitor


def close_shard_dealer(sock: zmq.Socket, monitor: zmq.Socket) -> None:
    """Close a socket made by :func:`connect_shard_dealer` and its monitor, in the only safe order.

    libzmq's I/O thread sends each monitor event with a blocking send on an internal PAIR
    socket. If our end of that pair is closed while monitoring is still on, the next event
    (the disconnect when the worker exits) blocks the I/O thread forever, and with it every
    socket of the context: the router stops moving any message (libzmq issue 3575). So
    monitoring is switched off first, which also unbinds its inproc endpoint.
    """
    sock.disable_monitor()
    monitor.close(linger=0)
    sock.close(linger=0)


def read_monitor_event(mon: zmq.Socket) -> str | None:
    """'up', 'down' or None for a monitor event frame pair."""
    from zmq.utils.monitor import recv_monitor_message

    event = recv_monitor_message(mon)["event"]
    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        return "up"
    if event == zmq.EVENT_DISCONNECTED:
        return "down"
    return None


def bind_worker_router(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    """A worker's own ROUTER socket on its ipc endpoint in the runtime directory."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    remove_ipc_file(endpoint)  # a crashed predecessor's socket file
    bind(sock, endpoint)
    return sock


def remove_ipc_file(endpoint: str) -> None:
    """libzmq leaves a bound ipc socket's file behind on close; the binder removes it."""
    if endpoint.startswith("ipc://"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(endpoint.removeprefix("ipc://"))


def signal_wakeup_pipe(signums: Iterable[int], handler) -> int:
    """Install ``handler`` for ``signums`` and return a fd that becomes readable on each signal.

    The fd goes into the zmq Poller, so a process blocked in poll wakes at once; the handler
    itself only records the signal (docs/design.md, habit 3).
    """
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    for signum in signums:
        signal.signal(signum, handler)
    return r


def drain_fd(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


# --- CURVE authentication (optional: auth_dir) -------------------------------------------
#
# Layout of an auth directory (made by `shardd keys generate`):
#   server.key, server.key_secret   the daemon's key pair
#   clients/<name>.key              public keys allowed to connect
#   admins/<name>.key               public keys also allowed admin ops (flush, resize, tune, …)
#   <name>.key, <name>.key_secret   a client's own pair, to hand to that client
# Every connection to a public endpoint (router or a worker's own) is encrypted and must
# present an allowed client key; a handshake with any other key fails, so the client only
# ever sees a timeout (ZeroMQ never tells an unauthenticated peer why).

class ServerAuth:
    """The daemon's CURVE keys and who is allowed in, loaded once at start-up."""

    def __init__(self, auth_dir: str) -> None:
        import zmq.auth

        self.auth_dir = auth_dir
        self.public, self.secret = zmq.auth.load_certificate(os.path.join(auth_dir, "server.key_secret"))
        self.clients_dir = os.path.join(auth_dir, "clients")
        admins = os.path.join(auth_dir, "admins")
        # The User-Id libzmq attaches to each message is the z85 public key (pyzmq's default).
        self.admin_ids = frozenset(zmq.auth.load_certificate(os.path.join(admins, name))[0].decode()
                                   for name in sorted(os.listdir(admins)) if name.endswith(".key"))


def secure(sock: zmq.Socket, auth: ServerAuth) -> None:
    """Make ``sock`` a CURVE server (before it binds)."""
    sock.curve_server = True
    sock.curve_publickey = auth.public
    sock.curve_secretkey = auth.secret
    sock.zap_domain = b"shardd"


def start_authenticator(ctx: zmq.Context, auth: ServerAuth):
    """A ZAP handler for ``ctx``, driven by the caller's poll loop (no thread): poll its
    ``zap_socket`` and call ``answer_zap`` when it is readable."""
    from zmq.auth.base import Authenticator

    authenticator = Authenticator(ctx)
    authenticator.start()
    authenticator.configure_curve(domain="shardd", location=auth.clients_dir)  # = zap_domain in secure()
    return authenticator


def answer_zap(authenticator) -> None:
    """Answer one ZAP request. pyzmq makes the handler a coroutine (for async callbacks); with
    keys from a directory it never suspends, so it is run to completion right here."""
    result = authenticator.handle_zap_message(authenticator.zap_socket.recv_multipart())
    if hasattr(result, "send"):
        try:
            result.send(None)
        except StopIteration:
            return
        result.close()
        raise RuntimeError("the ZAP handler wanted to wait; key checks must not")


def generate_keys(auth_dir: str, name: str, admin: bool) -> tuple[str, str]:
    """Create the server pair (once) and a client pair ``name``; allow it (and make it admin)."""
    import shutil

    import zmq.auth

    for sub in ("", "clients", "admins"):
        os.makedirs(os.path.join(auth_dir, sub), mode=0o700, exist_ok=True)
    if not os.path.exists(os.path.join(auth_dir, "server.key_secret")):
        zmq.auth.create_certificates(auth_dir, "server")
    public, secret = zmq.auth.create_certificates(auth_dir, name)
    shutil.copy(public, os.path.join(auth_dir, "clients", f"{name}.key"))
    if admin:
        shutil.copy(public, os.path.join(auth_dir, "admins", f"{name}.key"))
    for path in (secret, os.path.join(auth_dir, "server.key_secret")):
        os.chmod(path, 0o600)
    return public, secret


# ==========================================================================================
# Server side: the channels the router and the worker use instead of sockets.
#
# Rule 1: a send never blocks and never raises. ``ShardChannel.send`` returns False when no
#         worker is connected (the DEALER has IMMEDIATE set, so libzmq refuses instead of
#         queueing): the caller answers UNAVAILABLE. ``ClientInbox.send`` drops a reply to a
#         client that left or stopped reading (ROUTER_MANDATORY / HWM), and says so.
# Rule 2: a request is exactly one body frame. A REQ client's empty delimiter is stripped on
#         the way in and put back on the way out (its peer is a ``ReqPeer``); any other extra
#         frames are read, dropped and counted, so the caller can answer BAD_REQUEST.
# Rule 3: "up" means a completed handshake with the worker, "down" a disconnect (monitor
#         events); reconnecting is libzmq's, every SHARD_RECONNECT_MS.
# Rule 4: CURVE handshakes are answered by the Hub's own poll loop (ZAP over inproc, no
#         thread), so a secure inbox needs nothing from its owner but ``Hub.poll``.
# Hot paths read frame by frame with plain-int flags: no poll, exception or multipart call
# per message (docs/design.md, "Where the time goes").
# ==========================================================================================

_SNDMORE_NOBLOCK = SNDMORE | NOBLOCK


class BindError(Exception):
    """Raised when an endpoint cannot be bound (in use, bad address, no permission)."""


class ReqPeer(bytes):
    """The identity of a client on a REQ socket: equal to (and hashed as) its identity bytes,
    so callers may count per peer without unwrapping it; its replies get the empty delimiter."""

    __slots__ = ()


class ClientInbox:
    """A ROUTER socket clients connect to: requests in, replies out (Rules 1 and 2)."""

    __slots__ = ("_admin_ids", "_sock", "endpoint")

    def __init__(self, sock: zmq.Socket, admin_ids: frozenset[str] | None, endpoint: str = "") -> None:
        self._sock = sock
        self._admin_ids = admin_ids
        self.endpoint = endpoint

    def receive(self, limit: int) -> Iterator[tuple[bytes, bytes, int, bool]]:
        """Up to ``limit`` waiting requests as (peer, body frame, extra frames dropped, admin).

        ``admin`` is True when the sender authenticated with an admin key (always False
        without CURVE). The peer is bytes, or a ReqPeer; pass it back to ``send`` unchanged.
        """
        recv, getsockopt = self._sock.recv, self._sock.getsockopt
        admin_ids = self._admin_ids
        admin = False
        for _ in range(limit):
            if not getsockopt(EVENTS) & POLLIN:
                return
            peer = recv()
            if admin_ids is not None:  # the body frame carries the client's key as its User-Id
                message = recv(copy=False)
                frame = message.bytes
                admin = message.get("User-Id") in admin_ids
            else:
                frame = recv()
            extra = 0
            if getsockopt(RCVMORE):
                if not frame:  # REQ socket: empty delimiter, then the body
                    peer = ReqPeer(peer)
                    frame = recv()
                while getsockopt(RCVMORE):
                    recv()
                    extra += 1
            yield peer, frame, extra, admin

    def send(self, peer: bytes, frame: bytes) -> bool:
        """Send one reply without blocking; False if the peer left or is not reading."""
        send = self._sock.send
        try:
            send(peer, _SNDMORE_NOBLOCK)
            if type(peer) is not bytes:
                send(b"", _SNDMORE_NOBLOCK)
            send(frame, NOBLOCK)
        except zmq.ZMQError:
            return False
        return True


class ShardChannel:
    """The router's connection to one worker: batches out, batch replies in, up/down events."""

    __slots__ = ("_monitor", "_sock", "endpoint")

    def __init__(self, sock: zmq.Socket, monitor: zmq.Socket, endpoint: str) -> None:
        self._sock = sock
        self._monitor = monitor
        self.endpoint = endpoint

    def send(self, frame: bytes) -> bool:
        """Queue one frame to the worker; False if no worker is connected (Rule 1)."""
        try:
            self._sock.send(frame, NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def receive(self) -> Iterator[bytes]:
        """Every frame the worker has sent that is waiting now."""
        recv, getsockopt = self._sock.recv, self._sock.getsockopt
        while getsockopt(EVENTS) & POLLIN:
            yield recv()

    def event(self) -> str | None:
        """The connection's news: "up", "down" or None (Rule 3)."""
        return read_monitor_event(self._monitor)

    def close(self) -> None:
        """Close the socket and its monitor (monitoring off first: see close_shard_dealer)."""
        if not self._sock.closed:
            close_shard_dealer(self._sock, self._monitor)


class Publisher:
    """A worker's invalidation feed for near-cache clients (shardd.hot_marks): an XPUB on a free
    tcp port (``.endpoint``). XPUB rather than PUB so the worker hears each new subscription and
    can greet it at once with the feed's current sequence number (``on_subscribe``)."""

    # Per subscriber: far more than a client falls behind between two calls. Past it ZeroMQ drops
    # messages for that subscriber, which then sees the sequence number jump and drops its copies.
    HWM = 10_000

    def __init__(self, sock: zmq.Socket, endpoint: str) -> None:
        self._sock = sock
        self.endpoint = endpoint

    def send(self, frame: bytes) -> None:
        with contextlib.suppress(zmq.Again):  # an XPUB drops rather than blocks; never block the shard anyway
            self._sock.send(frame, NOBLOCK)

    def subscriptions(self) -> int:
        """Read the (un)subscription messages waiting; how many were subscriptions."""
        sock, joined = self._sock, 0
        while True:
            try:
                message = sock.recv(NOBLOCK)
            except zmq.Again:
                return joined
            joined += message[:1] == b"\x01"


class Hub:
    """One process's server-side transport: its Context, its CURVE authenticator (Rule 4) and
    the poll set of every inbox, channel and fd it waits on. Create it after the process has
    started (and pinned itself): the Context's I/O thread inherits the CPU mask."""

    def __init__(self, auth: ServerAuth | None = None) -> None:
        self._ctx = new_context()
        self._auth = auth
        self._authenticator: Any = None
        self._poller = zmq.Poller()
        self._handlers: dict[Any, Callable[[], None]] = {}
        self._channels: list[ShardChannel] = []  # closed in the safe order before the Context
        self.admin_ids = auth.admin_ids if auth is not None else None

    def _secure(self, sock: zmq.Socket) -> frozenset[str] | None:
        if self._auth is None:
            return None
        if self._authenticator is None:
            self._authenticator = authenticator = start_authenticator(self._ctx, self._auth)
            self._watch(authenticator.zap_socket, lambda: answer_zap(authenticator))
        secure(sock, self._auth)
        return self.admin_ids

    def public_inbox(self, endpoints: Iterable[str], max_message_bytes: int, ipc_mode: int = PUBLIC_IPC_MODE,
                     secure: bool = True) -> ClientInbox:
        """Clients' inbox bound to every endpoint given (CURVE when auth is on and ``secure``)."""
        sock = client_facing_router(self._ctx, max_message_bytes)
        admin_ids = self._secure(sock) if secure else None
        try:
            for endpoint in endpoints:
                bind(sock, endpoint, ipc_mode)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise BindError(f"cannot bind {endpoint}: {exc}") from None
        return ClientInbox(sock, admin_ids)

    def direct_inbox(self, host: str, max_message_bytes: int) -> ClientInbox:
        """A worker's inbox for direct-mode clients on a free tcp port of ``host`` (``.endpoint``).

        Same options as the router's (MAXMSGSIZE above all: one client must not make a worker
        buffer an arbitrarily large frame)."""
        sock = client_facing_router(self._ctx, max_message_bytes)
        admin_ids = self._secure(sock)
        try:
            port = sock.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise BindError(f"cannot bind tcp://{host}: {exc}") from None
        return ClientInbox(sock, admin_ids, f"tcp://{host}:{port}")

    def publisher(self, host: str) -> Publisher:
        """A worker's invalidation feed on a free tcp port of ``host`` (CURVE when auth is on)."""
        sock = self._ctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, Publisher.HWM)
        sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription, not only a topic's first
        self._secure(sock)
        try:
            port = sock.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise BindError(f"cannot bind tcp://{host}: {exc}") from None
        return Publisher(sock, f"tcp://{host}:{port}")

    def worker_inbox(self, endpoint: str) -> ClientInbox:
        """A worker's inbox for the router's batches, on its ipc endpoint in the runtime directory."""
        try:
            sock = bind_worker_router(self._ctx, endpoint)
        except zmq.ZMQError as exc:
            raise BindError(f"cannot bind {endpoint}: {exc}") from None
        return ClientInbox(sock, None, endpoint)

    def shard_channel(self, endpoint: str, identity: bytes | None = None) -> ShardChannel:
        sock, monitor = connect_shard_dealer(self._ctx, endpoint, identity)
        channel = ShardChannel(sock, monitor, endpoint)
        self._channels.append(channel)
        return channel

    def _watch(self, handle: Any, handler: Callable[[], None]) -> None:
        self._poller.register(handle, POLLIN)
        self._handlers[handle] = handler

    def watch(self, source: ClientInbox | ShardChannel | Publisher, on_readable: Callable[[], None],
              on_event: Callable[[str | None], None] | None = None) -> None:
        """Call ``on_readable`` when ``source`` has input, ``on_event`` with a channel's up/down news."""
        self._watch(source._sock, on_readable)
        if on_event is not None and type(source) is ShardChannel:
            monitor = source._monitor
            self._watch(monitor, lambda: on_event(read_monitor_event(monitor)))

    def unwatch(self, source: ShardChannel) -> None:
        """Stop waiting on a channel and close it."""
        for handle in (source._sock, source._monitor):
            self._poller.unregister(handle)
            del self._handlers[handle]
        source.close()

    def watch_fd(self, fd: int, handler: Callable[[], None]) -> None:
        self._watch(fd, handler)

    def poll(self, timeout_ms: int) -> int:
        """Wait up to ``timeout_ms`` for input, then run the handler of each source that has some."""
        ready = self._poller.poll(timeout_ms)
        handlers = self._handlers
        for handle, _ in ready:
            handler = handlers.get(handle)  # None: unwatched by a handler earlier in this pass
            if handler is not None:
                handler()
        return len(ready)

    def close(self) -> None:
        """Close every socket of this process's Context (linger 0), monitored channels first."""
        for channel in self._channels:
            channel.close()
        self._ctx.destroy(linger=0)
