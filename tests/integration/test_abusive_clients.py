"""Slow and abusive clients against the real daemon: bounded memory, no starvation.

* A client that sends without ever reading: the replies it does not read pile up in the
  sending socket's queue for that peer, which is bounded by the per-peer SNDHWM (10 000
  messages, router and direct endpoints alike); past it they are dropped, so RSS stays flat
  however many requests it sends.
* A client that pipelines as fast as it can: the router fair-queues its input per connection
  (libzmq's ROUTER reads peers round-robin) and the mailbox limit caps what is queued ahead
  of anyone at a shard, so the flooder is refused BUSY past its share while another client's
  requests are all served. Asserted by counts, not milliseconds (a busy CI machine stretches
  any wait); bench/fairness.py measures how long the light client waits.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import psutil
import pytest
import zmq

from shardd import protocol as proto
from shardd.client import Client
from shardd.errors import Busy
from tests.conftest import REPO
from tests.helpers import keys_on_shard

_VALUE = b"v" * 1024  # 1 KiB replies: 200k unread would be ~200 MiB if anything held them all


def _tree_rss(d) -> int:
    """RSS of the router and the workers (the supervisor holds no client data)."""
    total = 0
    for p in d.children():
        try:
            if "resource_tracker" not in " ".join(p.cmdline()):
                total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _send_without_reading(ctx: zmq.Context, endpoint: str, frames: list[bytes], count: int) -> zmq.Socket:
    """Send ``count`` requests and never read a reply; the socket stays open (its replies owed)."""
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.sndtimeo = 10_000  # a send that blocks this long fails the test instead of hanging it
    s.connect(endpoint)
    for i in range(count):
        s.send(frames[i % len(frames)])
    return s


def _settle(c: Client, requests: int = 0, timeout: float = 120.0) -> tuple[int, int]:
    """Wait until the router's request count is at least ``requests`` and the daemon has taken in
    everything sent (its counters stop moving); the timeout is only a deadline against a hang."""
    def counters() -> tuple[int, int]:
        stats = c.stats()
        return stats["router"]["requests"], sum(row.get("ops", 0) for row in stats["shards"])

    last, deadline = counters(), time.monotonic() + timeout
    quiet = 0
    while quiet < 2:  # two quiet intervals in a row: a busy machine may pause the daemon for one
        assert time.monotonic() < deadline, f"the daemon was still busy after {timeout}s"
        time.sleep(0.3)  # the sampling interval of a rate, not a synchronisation
        now = counters()
        moving = now[0] - last[0] > 2 or now[1] - last[1] > 4  # more than our own stats calls
        quiet = 0 if moving or now[0] < requests else quiet + 1
        last = now
    return last


def test_client_that_never_reads_cannot_grow_memory(make_daemon, capsys):
    d = make_daemon(shards=2)
    own = keys_on_shard(0, 2, 64, prefix="unread:")  # the direct endpoint below is shard 0's
    with Client(d.endpoint, timeout=30) as c:  # a deadline against a hang
        c.set_many({k: _VALUE for k in own})
        direct = c.topology()["endpoints"][0]
        frames = [proto.encode_request(i + 1, proto.Get(k)) for i, k in enumerate(own)]
        before_counts = _settle(c)
        before = _tree_rss(d)
        ctx = zmq.Context()
        try:
            # Both at once, and both kept open unread while we measure: their replies are owed.
            # (kept referenced: a socket collected as garbage closes and drops what it queued)
            socks = [_send_without_reading(ctx, endpoint, frames, 200_000) for endpoint in (d.endpoint, direct)]
            after_counts = _settle(c, requests=before_counts[0] + 200_000)
            after = _tree_rss(d)
            assert c.health()["ok"] and c.get(own[0]) == _VALUE  # and others are still served
            for s in socks:
                s.close()
        finally:
            ctx.destroy(linger=0)  # closes the sockets too: term() alone would wait for them forever
    taken = (after_counts[0] - before_counts[0], after_counts[1] - before_counts[1])
    with capsys.disabled():
        print(f"\nunread replies: 2 x 200000 requests sent; router took {taken[0]}, workers applied {taken[1]} "
              f"(the rest BUSY); router+workers RSS {before >> 20} -> {after >> 20} MiB")
    assert taken[0] >= 200_000  # the router really read them all
    # At most 10 000 queued replies per peer and socket (~1.1 KiB each here) plus kernel buffers:
    # ~25 MiB for both. Holding all 400k replies would be ~400 MiB.
    assert after - before < 96 << 20, (before, after)


_FLOOD = r"""
import select, sys, zmq
from shardd import protocol as proto
from shardd.hashing import shard_for
ctx = zmq.Context(); s = ctx.socket(zmq.DEALER); s.linger = 0; s.connect(sys.argv[1])
keys = [k for k in (f"flood:{i}".encode() for i in range(4000)) if shard_for(k, 2) == 0][:512]
frames = [proto.encode_request(i + 1, proto.Get(k)) for i, k in enumerate(keys)]
sent = received = busy = 0
announced = False
while True:
    while sent - received < 4000:
        s.send(frames[sent % 512]); sent += 1
    while s.poll(0 if sent - received < 4000 else 100):
        if proto.decode_reply(s.recv()).status == proto.BUSY:
            busy += 1
        received += 1
    if busy and not announced:  # refused: shard 0's mailbox is full of this client's requests
        print("flooding", flush=True); announced = True
    if select.select([sys.stdin], [], [], 0)[0]:
        command = sys.stdin.readline().strip()
        print(f"{sent} {received} {busy}", flush=True)
        if command != "report":  # "stop", or the test went away (EOF)
            break
"""

_LIGHT_GETS = 200  # the light client's requests per round
_FLOOD_REFUSED = 2000  # keep going until the flooder was refused this often meanwhile


class _Flooder:
    """The flooding client as a subprocess, asked for its counters through stdin/stdout."""

    def __init__(self, endpoint: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _FLOOD, endpoint], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, cwd=REPO)
        self._buffer = b""

    def line(self, timeout: float = 60.0) -> str:
        """The flooder's next line; a deadline only so a broken flooder cannot hang the suite."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            assert left > 0, "the flooder did not answer in time"
            if select.select([self.proc.stdout], [], [], left)[0]:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                assert chunk, f"the flooder exited {self.proc.wait()}"
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def ask(self, command: str) -> tuple[int, int, int]:
        """(sent, received, refused BUSY) so far."""
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        sent, received, busy = map(int, self.line().split())
        return sent, received, busy

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.mark.parametrize("path", ["router", "direct"])
def test_a_flooding_client_does_not_starve_another(make_daemon, capsys, path):
    """Fairness by counts: while a flooder keeps 4000 requests in flight to shard 0 and is refused
    BUSY thousands of times, a light client's requests to the same shard are every one answered OK.
    (Latency figures for the same set-up: bench/fairness.py.)"""
    d = make_daemon(shards=2)
    direct = path == "direct"
    key = keys_on_shard(0, 2, 1, prefix="fair:")[0]
    with Client(d.endpoint, timeout=30) as c:
        c.set(key, b"x")
        target = c.topology()["endpoints"][0] if direct else d.endpoint
    flooder = _Flooder(target)
    ok = busy = 0
    try:
        assert flooder.line() == "flooding"  # readiness: it has filled shard 0's mailbox
        before = flooder.ask("report")
        # The timeout is a deadline against a hang, not a latency bound.
        with Client(d.endpoint, timeout=30, direct=direct) as light:
            while True:
                for _ in range(_LIGHT_GETS):
                    try:
                        assert light.get(key) == b"x"
                        ok += 1
                    except Busy:
                        busy += 1
                now = flooder.ask("report")
                if now[2] - before[2] >= _FLOOD_REFUSED or ok + busy >= 50 * _LIGHT_GETS:
                    break
        after = flooder.ask("stop")
        assert flooder.proc.wait(30) == 0
    finally:
        flooder.close()
    sent, refused = after[0] - before[0], after[2] - before[2]
    with capsys.disabled():
        print(f"\nfair queuing ({path}): light client {ok} OK, {busy} BUSY of {ok + busy} gets; meanwhile the "
              f"flooder sent {sent} requests, {refused} refused BUSY ({refused / max(1, sent):.0%})")
    assert refused >= _FLOOD_REFUSED, (sent, refused)  # it really was flooding, and refused, all along
    assert busy == 0 and ok >= _LIGHT_GETS  # the light client never paid for the flooder's excess
    assert ok + busy < sent  # and the flood outnumbered it: fairness, not an idle shard
