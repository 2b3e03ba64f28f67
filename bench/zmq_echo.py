"""The floor under shardd's round trip: a bare pyzmq echo, and the same behind a Python forwarder.

    python bench/zmq_echo.py echo --bind tcp://127.0.0.1:7470             # one hop
    python bench/zmq_echo.py forward --bind tcp://127.0.0.1:7471          # two hops: forwarder + its own echo

``echo``: a ROUTER that sends every message back to its sender unchanged. A DEALER client
sending a request and waiting for the reply pays one bare ZeroMQ round trip from Python: what
shardd's direct mode (client → worker) cannot beat.

``forward``: a ROUTER (the front) and a DEALER (the back) in one Python loop, in front of an
echo it starts as its own child process, on a free loopback port: client → forwarder → echo →
forwarder → client, the same hops as client → router → worker in shardd's router mode, with no
work in either process but moving frames.

Both are written as shardd's hot loops are (docs/design.md, "Where the time goes": frame by
frame with a known frame count and plain-int flags, never ``send_multipart``/``recv_multipart``,
which cost ~5 µs against ~1 µs), so what is left is pyzmq and the interpreter. The forwarder
polls both sockets and moves one message per ready socket per poll. SIGTERM (the default
action) stops either; the echo child of a forwarder gets SIGTERM from the kernel when the
forwarder dies.
"""

from __future__ import annotations

import argparse
import ctypes
import signal
import socket
import subprocess
import sys

import zmq

SNDMORE = int(zmq.SNDMORE)
POLLIN = int(zmq.POLLIN)


def run_echo(bind: str, frames: int) -> None:
    """Send back every message of ``frames`` frames (2 from a DEALER client: identity + payload)."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(bind)
    recv, send = sock.recv, sock.send
    if frames == 2:
        while True:
            peer = recv()
            payload = recv()
            send(peer, SNDMORE)
            send(payload)
    while True:
        parts = [recv() for _ in range(frames)]
        for part in parts[:-1]:
            send(part, SNDMORE)
        send(parts[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG


def run_forwarder(bind: str) -> None:
    """ROUTER front → DEALER back → an echo child (3 frames there: our identity, the client's, payload)."""
    backend = f"tcp://127.0.0.1:{_free_port()}"
    child = subprocess.Popen([sys.executable, __file__, "echo", "--bind", backend, "--frames", "3"],
                             preexec_fn=_die_with_parent)
    ctx = zmq.Context.instance()
    front = ctx.socket(zmq.ROUTER)
    back = ctx.socket(zmq.DEALER)
    for s in (front, back):
        s.setsockopt(zmq.LINGER, 0)
    back.connect(backend)
    front.bind(bind)
    poller = zmq.Poller()
    poller.register(front, POLLIN)
    poller.register(back, POLLIN)
    f_recv, f_send, b_recv, b_send = front.recv, front.send, back.recv, back.send
    try:
        while True:
            for sock, _ in poller.poll():
                if sock is front:
                    peer = f_recv()
                    payload = f_recv()
                    b_send(peer, SNDMORE)
                    b_send(payload)
                else:
                    peer = b_recv()
                    payload = b_recv()
                    f_send(peer, SNDMORE)
                    f_send(payload)
    finally:
        child.terminate()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="bare pyzmq echo (one hop) or forwarder + echo (two hops)")
    ap.add_argument("mode", choices=("echo", "forward"))
    ap.add_argument("--bind", required=True, help="endpoint to serve, e.g. tcp://127.0.0.1:7470")
    ap.add_argument("--frames", type=int, default=2, help="echo: frames per message (default 2)")
    args = ap.parse_args(argv)
    if args.mode == "echo":
        run_echo(args.bind, args.frames)
    else:
        run_forwarder(args.bind)
    return 0


if __name__ == "__main__":
    sys.exit(main())
