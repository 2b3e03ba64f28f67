"""MEASURING PROTOTYPE, not a feature: the RESP endpoint as a gateway process per core on SO_REUSEPORT.

    PYTHONPATH=. python bench/resp_gateway_proto.py --port 6390 --router tcp://127.0.0.1:7400 [--procs N]

Issue 14 asks where the RESP endpoint should run: in the router's poll loop (what shardd does,
shardd/resp_server.py) or as a gateway process per core. This file is the second idea, just
enough of it for ``redis-benchmark -t set,get`` (bench/compare.py ``--resp-systems
redis,shardd-resp,shardd-resp-gw``), so the two can be measured side by side on the same daemon.

The parent asks the daemon's router for its topology once (``shardd.Client.topology()``: the
shard count and each worker's direct endpoint) and starts ``--procs`` children (default: one per
CPU). Each child binds the same TCP port with SO_REUSEPORT (the kernel spreads connections over
them), parses with ``shardd.resp.RequestParser`` and sends GET and SET as native ops straight to
the owning worker's direct endpoint (one DEALER per worker, ``protocol.encode_request``, one frame
per op, as ``shardd.Client(direct=True)`` does), placed with ``shardd.hashing.shard_for``. Replies
are matched by request id and leave each connection in request order. PING answers PONG, CONFIG
GET an empty array; anything else is an error. All of one poll pass's replies to a connection
leave in one ``send``.

Not here, on purpose: auth, limits, every other command, MOVED/BUSY retries, resizes (the
topology is read once), backpressure, a shard restart. Do not ship this; measure with it.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import zmq  # noqa: E402

from shardd import protocol as p  # noqa: E402
from shardd import resp  # noqa: E402
from shardd.hashing import shard_for  # noqa: E402

POLLIN, POLLOUT = int(zmq.POLLIN), int(zmq.POLLOUT)
NOBLOCK = int(zmq.NOBLOCK)
PONG, EMPTY, OK, NIL = b"+PONG\r\n", b"*0\r\n", b"+OK\r\n", b"$-1\r\n"


class Conn:
    __slots__ = ("out", "parser", "pending", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.parser = resp.RequestParser(512 * 1024 * 1024)
        self.pending: deque[list[bytes | None]] = deque()  # one [reply or None] per command, in order
        self.out = b""  # bytes the socket did not take yet


def child(port: int, endpoints: list[str]) -> None:
    shards = len(endpoints)
    ctx = zmq.Context()
    dealers = []
    for endpoint in endpoints:
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.setsockopt(zmq.SNDHWM, 0)  # the clients' pipelines bound what is in flight
        d.setsockopt(zmq.RCVHWM, 0)
        d.connect(endpoint)
        dealers.append(d)
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    lsock.bind(("127.0.0.1", port))
    lsock.listen(1024)
    lsock.setblocking(False)
    poller = zmq.Poller()
    for d in dealers:
        poller.register(d, POLLIN)
    poller.register(lsock.fileno(), POLLIN)
    conns: dict[int, Conn] = {}
    waiting: dict[int, tuple[Conn, list[bytes | None], bool]] = {}  # request id -> (conn, slot, is a GET)
    rid = 0
    encode, Get, Set, decode = p.encode_request, p.Get, p.Set, p.decode_reply
    lfd = lsock.fileno()
    dirty: set[Conn] = set()

    def close(conn: Conn) -> None:
        poller.unregister(conn.sock.fileno())
        del conns[conn.sock.fileno()]
        conn.sock.close()
        dirty.discard(conn)

    while True:
        for item, _ in poller.poll(1000):
            if item == lfd:
                while True:
                    try:
                        s, _ = lsock.accept()
                    except BlockingIOError:
                        break
                    s.setblocking(False)
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conns[s.fileno()] = Conn(s)
                    poller.register(s.fileno(), POLLIN)
            elif type(item) is int:
                conn = conns.get(item)
                if conn is None:
                    continue
                if conn.out:  # writable again
                    dirty.add(conn)
                try:
                    data = conn.sock.recv(262144)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    close(conn)
                    continue
                commands, error = conn.parser.feed(data)
                for args in commands:
                    name = args[0].upper()
                    slot: list[bytes | None] = [None]
                    conn.pending.append(slot)
                    if name == b"GET" and len(args) == 2:
                        op, is_get = Get(args[1]), True
                    elif name == b"SET" and len(args) == 3:
                        op, is_get = Set(args[1], args[2]), False
                    else:
                        slot[0] = PONG if name == b"PING" else EMPTY if name == b"CONFIG" else (
                            b"-ERR unknown command (measuring prototype)\r\n")
                        dirty.add(conn)
                        continue
                    rid += 1
                    waiting[rid] = (conn, slot, is_get)
                    dealers[shard_for(args[1], shards)].send(encode(rid, op), NOBLOCK)
                if error is not None:
                    conn.pending.append([b"-ERR " + str(error).encode() + b"\r\n"])
                    dirty.add(conn)
            else:  # a DEALER: every reply it has
                while True:
                    try:
                        frame = item.recv(NOBLOCK)
                    except zmq.Again:
                        break
                    reply = decode(frame)
                    entry = waiting.pop(reply.id, None)
                    if entry is None:
                        continue
                    conn, slot, is_get = entry
                    v = reply.value
                    if reply.status:
                        slot[0] = b"-ERR " + str(v).encode() + b"\r\n"
                    elif not is_get:
                        slot[0] = OK
                    elif v is None:
                        slot[0] = NIL
                    else:
                        slot[0] = b"$%d\r\n%s\r\n" % (len(v), v)
                    dirty.add(conn)
        for conn in list(dirty):  # one send per connection per pass, replies in request order
            pending, ready = conn.pending, [conn.out]
            while pending and pending[0][0] is not None:
                ready.append(pending.popleft()[0])  # type: ignore[arg-type]
            data = b"".join(ready)  # type: ignore[arg-type]
            try:
                sent = conn.sock.send(data) if data else 0
            except BlockingIOError:
                sent = 0
            except OSError:
                close(conn)
                continue
            conn.out = data[sent:]
            if conn.out:
                poller.modify(conn.sock.fileno(), POLLIN | POLLOUT)
            elif data:
                poller.modify(conn.sock.fileno(), POLLIN)
        dirty.clear()


def main() -> int:
    ap = argparse.ArgumentParser(description="RESP gateway prototype (measuring only; see the module docstring)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--router", required=True, help="the daemon's endpoint, e.g. tcp://127.0.0.1:7400")
    ap.add_argument("--procs", type=int, default=0, help="gateway processes (default: one per CPU)")
    ap.add_argument("--child", nargs="+", metavar="ENDPOINT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.port, args.child)
        return 0
    from shardd import Client

    deadline = time.monotonic() + 30
    while True:
        with Client(args.router, timeout=1.0) as client:
            topo = client.topology()
        endpoints = topo["endpoints"][: topo["shards"]]
        if all(endpoints) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if not all(endpoints):
        print(f"gateway: shards without a direct endpoint: {endpoints}", file=sys.stderr)
        return 2
    procs = args.procs or len(os.sched_getaffinity(0))
    kids = [subprocess.Popen([sys.executable, __file__, "--port", str(args.port), "--router", args.router,
                              "--child", *endpoints]) for _ in range(procs)]

    def stop(signum: int, frame: object) -> None:
        for k in kids:
            k.terminate()
        for k in kids:
            k.wait(5)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"gateway: {procs} processes on 127.0.0.1:{args.port}, {len(endpoints)} shards", file=sys.stderr)
    while all(k.poll() is None for k in kids):
        time.sleep(0.5)
    stop(0, None)
    return 1


if __name__ == "__main__":
    sys.exit(main())
