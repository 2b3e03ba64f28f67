"""Server-side ZeroMQ plumbing: the only daemon module that imports zmq.

Roles call these helpers so socket options live in one place, each with its reason.
Frames are sent and received one at a time with plain-int flags: on this machine
``send_multipart`` costs ~5 µs against ~1 µs frame by frame, and ``zmq.SNDMORE | flags``
enum arithmetic ~0.5 µs (see DESIGN.md, "Where the time goes").
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
    """A fresh Context for this process (never inherited: DESIGN.md fixed decision 3)."""
    return zmq.Context(io_threads=1)


def bind_public_router(ctx: zmq.Context, endpoints: Iterable[str], max_message_bytes: int,
                       ipc_mode: int | None = None) -> zmq.Socket:
    """The router's client-facing ROUTER socket, bound to every endpoint given."""
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
    # A restarted worker binds the same path; reconnect quickly so the shard is back fast.
    sock.setsockopt(zmq.RECONNECT_IVL, 20)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 200)
    # In-flight work is bounded by the mailbox limit, not by the HWM; keep HWM out of the way.
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    monitor = sock.get_monitor_socket(int(zmq.EVENT_HANDSHAKE_SUCCEEDED) | int(zmq.EVENT_DISCONNECTED))
    sock.connect(endpoint)
    return sock, monitor


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


def bind_direct_router(ctx: zmq.Context, host: str, max_message_bytes: int) -> tuple[zmq.Socket, str]:
    """A worker's client-facing ROUTER socket for direct mode, on a free port of ``host``."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    # As on the router's public socket: a frame past twice the limit is cut off before it is
    # buffered, so one client cannot make a worker hold an arbitrarily large message.
    sock.setsockopt(zmq.MAXMSGSIZE, 2 * max_message_bytes)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDHWM, 10_000)
    sock.setsockopt(zmq.RCVHWM, 10_000)
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
    itself only records the signal (STYLE.md habit 3).
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
