"""Server-side ZeroMQ plumbing: the only daemon module that imports zmq.

Roles call these helpers so socket options live in one place, each with its reason.
Frames are sent and received one at a time with plain-int flags: on this machine
``send_multipart`` costs ~5 µs against ~1 µs frame by frame, and ``zmq.SNDMORE | flags``
enum arithmetic ~0.5 µs (see docs/design.md, "Where the time goes").
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable

import zmq

# Plain ints: enum arithmetic on the hot path costs more than the send itself.
SNDMORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)
POLLIN = int(zmq.POLLIN)
EVENTS = int(zmq.EVENTS)
RCVMORE = int(zmq.RCVMORE)

Again = zmq.Again
ZMQError = zmq.ZMQError
Poller = zmq.Poller
Socket = zmq.Socket


def new_context() -> zmq.Context:
    """A fresh Context for this process (never inherited: docs/design.md, decision 3)."""
    return zmq.Context(io_threads=1)


def client_facing_router(ctx: zmq.Context, max_message_bytes: int, auth: ServerAuth | None) -> zmq.Socket:
    """A ROUTER socket that clients connect to (the router's public one, a worker's own)."""
    sock = ctx.socket(zmq.ROUTER)
    if auth is not None:
        secure(sock, auth)
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


def bind_public_router(ctx: zmq.Context, endpoints: Iterable[str], max_message_bytes: int,
                       ipc_mode: int | None = None, auth: ServerAuth | None = None) -> zmq.Socket:
    """The router's client-facing ROUTER socket, bound to every endpoint given."""
    sock = client_facing_router(ctx, max_message_bytes, auth)
    for endpoint in endpoints:
        bind(sock, endpoint, PUBLIC_IPC_MODE if ipc_mode is None else ipc_mode)
    return sock


# ipc socket files: a local process that may write to one may talk to it. The internal
# sockets (workers, control) are the daemon user's alone; a public ipc endpoint also admits
# the daemon's group, the usual way to grant local clients access (Docker's socket, Redis's
# unixsocketperm). Never others: there is no authentication yet.
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


def connect_shard_dealer(ctx: zmq.Context, endpoint: str) -> tuple[zmq.Socket, zmq.Socket]:
    """The router's DEALER to one worker, and a monitor socket reporting its connection state.

    The monitor is attached before connecting: a handshake that completed before it would
    never be reported, and the shard would stay "down" forever.
    """
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
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


def bind_direct_router(ctx: zmq.Context, host: str, max_message_bytes: int,
                       auth: ServerAuth | None = None) -> tuple[zmq.Socket, str]:
    """A worker's client-facing ROUTER socket for direct mode, on a free port of ``host``.

    Same options as the router's (MAXMSGSIZE above all: one client must not make a worker
    buffer an arbitrarily large frame)."""
    sock = client_facing_router(ctx, max_message_bytes, auth)
    port = sock.bind_to_random_port(f"tcp://{host}")
    return sock, f"tcp://{host}:{port}"


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
