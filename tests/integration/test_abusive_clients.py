"""Slow and abusive clients against the real daemon: bounded memory, no starvation.

* A client that sends without ever reading: the replies it does not read pile up in the
  sending socket's queue for that peer, which is bounded by the per-peer SNDHWM (10 000
  messages, router and direct endpoints alike); past it they are dropped, so RSS stays flat
  however many requests it sends.
* A client that pipelines as fast as it can: the router fair-queues its input per connection
  (libzmq's ROUTER reads peers round-robin) and the mailbox limit caps what is queued ahead
  of anyone at a shard, so another client's request waits for at most about one router pass
  and one mailbox of work, not for the flooder's backlog.
"""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest
import zmq

from shardd import protocol as proto
from shardd.client import Client
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


def _settle(c: Client, timeout: float = 30.0) -> tuple[int, int]:
    """Wait until the daemon has taken in everything sent (its counters stop moving)."""
    def counters() -> tuple[int, int]:
        stats = c.stats()
        return stats["router"]["requests"], sum(row.get("ops", 0) for row in stats["shards"])

    last, deadline = counters(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = counters()
        if now[0] - last[0] <= 2 and now[1] - last[1] <= 4:  # only our own stats calls
            return now
        last = now
    raise AssertionError(f"the daemon was still busy after {timeout}s")


def test_client_that_never_reads_cannot_grow_memory(make_daemon, capsys):
    d = make_daemon(shards=2)
    own = keys_on_shard(0, 2, 64, prefix="unread:")  # the direct endpoint below is shard 0's
    with Client(d.endpoint, timeout=3.0) as c:
        c.set_many({k: _VALUE for k in own})
        direct = c.topology()["endpoints"][0]
        frames = [proto.encode_request(i + 1, proto.Get(k)) for i, k in enumerate(own)]
        before_counts = _settle(c)
        before = _tree_rss(d)
        ctx = zmq.Context()
        try:
            # Both at once, and both kept open unread while we measure: their replies are owed.
            socks = [_send_without_reading(ctx, endpoint, frames, 200_000) for endpoint in (d.endpoint, direct)]
            after_counts = _settle(c)
            after = _tree_rss(d)
            assert c.health()["ok"] and c.get(own[0]) == _VALUE  # and others are still served
            for s in socks:
                s.close()
        finally:
            ctx.term()
    taken = (after_counts[0] - before_counts[0], after_counts[1] - before_counts[1])
    with capsys.disabled():
        print(f"\nunread replies: 2 x 200000 requests sent; router took {taken[0]}, workers applied {taken[1]} "
              f"(the rest BUSY); router+workers RSS {before >> 20} -> {after >> 20} MiB")
    assert taken[0] >= 200_000  # the router really read them all
    # At most 10 000 queued replies per peer and socket (~1.1 KiB each here) plus kernel buffers:
    # ~25 MiB for both. Holding all 400k replies would be ~400 MiB.
    assert after - before < 96 << 20, (before, after)


_FLOOD = r"""
import sys, time, zmq
from shardd import protocol as proto
endpoint, seconds = sys.argv[1], float(sys.argv[2])
ctx = zmq.Context(); s = ctx.socket(zmq.DEALER); s.linger = 0; s.connect(endpoint)
from shardd.hashing import shard_for
keys = [k for k in (f"flood:{i}".encode() for i in range(4000)) if shard_for(k, 2) == 0][:512]
frames = [proto.encode_request(i + 1, proto.Get(k)) for i, k in enumerate(keys)]
sent = received = busy = 0
print("flooding", flush=True)
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    while sent - received < 4000:
        s.send(frames[sent % 512]); sent += 1
    while s.poll(0 if sent - received < 4000 else 100):
        if proto.decode_reply(s.recv()).status == proto.BUSY:
            busy += 1
        received += 1
print(f"{sent} {busy}", flush=True)
"""


def _latencies(endpoint: str, seconds: float, direct: bool) -> list[float]:
    """Sequential gets of a key on the flooded shard (0 of 2), one at a time, as a light client does."""
    key = keys_on_shard(0, 2, 1, prefix="fair:")[0]
    out = []
    with Client(endpoint, timeout=2.0, direct=direct) as c:
        c.set(key, b"x")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            assert c.get(key) == b"x"
            out.append(time.perf_counter() - t0)
    return sorted(out)


def _p99(values: list[float]) -> float:
    return values[min(len(values) - 1, int(len(values) * 0.99))]


@pytest.mark.parametrize("path", ["router", "direct"])
def test_a_flooding_client_does_not_starve_another(make_daemon, capsys, path):
    d = make_daemon(shards=2)
    direct = path == "direct"
    quiet = _latencies(d.endpoint, 1.0, direct)
    target = d.endpoint
    if direct:
        with Client(d.endpoint, timeout=2.0) as c:
            target = c.topology()["endpoints"][0]
    flooder = subprocess.Popen([sys.executable, "-c", _FLOOD, target, "4"], stdout=subprocess.PIPE,
                               text=True, cwd=REPO)
    try:
        assert flooder.stdout.readline().strip() == "flooding"
        time.sleep(0.5)  # not readiness: let the flood reach its steady state before measuring
        flooded = _latencies(d.endpoint, 2.5, direct)
        sent, busy = map(int, flooder.stdout.readline().split())
        assert flooder.wait(10) == 0
    finally:
        if flooder.poll() is None:
            flooder.kill()
            flooder.wait()
    with capsys.disabled():
        print(f"\nfair queuing ({path}): quiet p99 {_p99(quiet) * 1e3:.2f} ms ({len(quiet)} gets); "
              f"while a flooder sent {sent} requests ({busy} BUSY): p99 {_p99(flooded) * 1e3:.2f} ms, "
              f"max {flooded[-1] * 1e3:.1f} ms ({len(flooded)} gets)")
    assert sent > 10 * len(flooded)  # it really was a flood
    # The bound: one router pass (≤ 512 messages) plus one mailbox (1024 ops) per shard ahead of
    # us, ~10 µs each ≈ 15 ms, times 2 for sharing 2 cores with the flooder: 50 ms. Without fair
    # queuing we would wait behind the flooder's 4000 in flight, and its BUSY storm, every time.
    assert _p99(flooded) < 0.050, _p99(flooded)
