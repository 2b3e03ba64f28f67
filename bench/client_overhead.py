"""The client library's own cost per call, without I/O: what shardd.Client adds to a round trip.

    python bench/client_overhead.py            # router and direct-mode GET, µs of CPU per call

Theory of operation
-------------------
The client's connection keeps its real ``Dealer`` but the socket inside is a fake that
answers each request at once with a pre-encoded reply carrying the next request id. So what
is timed is exactly the library's per-call path: build the op, encode the envelope, send,
poll, receive, decode, match the id, convert the value (and in direct mode, place the key).
Thread CPU time, best of ``--runs`` runs: on a shared machine the minimum is the stable figure.
"""

from __future__ import annotations

import argparse
import time

from shardd import protocol
from shardd.client import Client
from shardd.transport_client import Dealer


class _InstantSocket:
    """A socket whose every recv is the reply to the request just sent."""

    __slots__ = ("replies", "sent")

    def __init__(self, replies: list[bytes]) -> None:
        self.replies, self.sent = replies, 0

    def send(self, frame: bytes, flags: int = 0) -> None:
        self.sent += 1

    def poll(self, timeout: int | None = None, flags: int = 1) -> int:
        return 1

    def recv(self, flags: int = 0) -> bytes:
        return self.replies[self.sent]

    def close(self, linger: int | None = None) -> None:
        pass


def per_call_us(direct: bool, calls: int, runs: int) -> float:
    replies = [protocol.encode_reply(i, protocol.OK, b"v" * 100) for i in range(calls + 2)]
    client = Client("tcp://127.0.0.1:1", timeout=5, direct=direct)
    sock = _InstantSocket(replies)
    client._link._sock.close(0)
    client._link._sock = sock
    if direct:
        worker = Dealer.__new__(Dealer)
        worker._sock = sock
        client.placement.learn({"epoch": 1, "shards": 1, "endpoints": ["tcp://127.0.0.1:2"]})
        client._workers = [worker]
    best = float("inf")
    get = client.get
    for _ in range(runs):
        client._last_id, sock.sent = 0, 0
        start = time.thread_time()
        for _ in range(calls):
            get(b"key:12345")
        best = min(best, (time.thread_time() - start) / calls * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=20_000, help="calls per run (default 20000)")
    ap.add_argument("--runs", type=int, default=10, help="runs; the best is reported (default 10)")
    args = ap.parse_args()
    for direct in (False, True):
        cost = per_call_us(direct, args.calls, args.runs)
        print(f"{'direct' if direct else 'router'} GET: {cost:.2f} µs of CPU per call")


if __name__ == "__main__":
    main()
