"""The resize window held open on purpose: entries taken from their old owner, not yet adopted.

While a resize moves entries, the router carries each batch from the old owner to the new
one. Stopping the router (SIGSTOP) freezes batches in that state, so the test can act in the
window for as long as it likes instead of hoping a load test hits it:

* direct mode: a write on the new owner's own endpoint for a key whose entry is still on its
  way must not be acknowledged (TRYAGAIN), or the arriving entry would overwrite it;
* the client library in the window waits on the router, which orders its request after
  the entry;
* router mode: with the new owner stopped instead, requests re-routed to it wait behind the
  entries, and every acknowledged write survives.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import zmq

from shardd import protocol as p
from shardd.client import Client
from shardd.hashing import shard_for

KEYS = 120_000  # enough that scanning the old shards takes many router round trips
OLD, NEW = 2, 3


def _load(d) -> list[bytes]:
    keys = [f"w:{i}".encode() for i in range(KEYS)]
    with Client(d.endpoint, timeout=60) as c:
        for at in range(0, KEYS, 5000):
            c.set_many({k: b"v0" for k in keys[at:at + 5000]})
    return keys


def _ask(endpoint: str, ops: list) -> list[p.Reply]:
    """Send every op on one raw DEALER (pipelined), return the replies in request order."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    try:
        for rid, op in enumerate(ops, 1):
            sock.send(p.encode_request(rid, op))
        replies: dict[int, p.Reply] = {}
        while len(replies) < len(ops):
            assert sock.poll(20_000), f"{endpoint} did not answer"
            reply = p.decode_reply(sock.recv())
            replies[reply.id] = reply
        return [replies[rid] for rid in range(1, len(ops) + 1)]
    finally:
        sock.close()


def _resize_in_background(d, shards: int) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        with Client(d.endpoint, timeout=120) as admin:
            try:
                out["result"] = admin.resize(shards)
            except Exception as exc:  # reported by the test, not lost in the thread
                out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _wait_moving(d, shards: int) -> list[str]:
    """Wait until the resize moves entries; returns every worker's own endpoint."""
    deadline = time.monotonic() + 60
    with Client(d.endpoint, timeout=5) as c:
        while True:
            topology = c.topology()
            resizing = topology["resizing"]
            if resizing and resizing["moving"] and len(topology["endpoints"]) == shards \
                    and all(topology["endpoints"]):
                return topology["endpoints"]
            assert time.monotonic() < deadline, f"resize never started moving: {topology}"
            time.sleep(0.001)


def _in_transit(endpoints: list[str], moving: list[bytes]) -> list[bytes]:
    """Moving keys that their old owner no longer holds and their new owner does not hold yet."""
    gone = []
    for old in range(OLD):
        mine = [k for k in moving if shard_for(k, OLD) == old]
        replies = _ask(endpoints[old], [p.Get(k) for k in mine])
        gone += [k for k, r in zip(mine, replies, strict=True) if r.status == p.MOVED]
    new_owner = endpoints[NEW - 1]
    replies = _ask(new_owner, [p.Exists(k) for k in gone]) if gone else []
    # Before the fix the new owner said "no such key" (OK, False); now it says TRYAGAIN.
    return [k for k, r in zip(gone, replies, strict=True) if not (r.status == p.OK and r.value is True)]


def test_direct_writes_in_the_window_are_never_lost_or_undone(make_daemon):
    d = make_daemon(shards=OLD)
    keys = _load(d)
    moving = [k for k in keys if shard_for(k, NEW) == NEW - 1]
    with Client(d.endpoint) as c:
        router_pid = c.stats()["router"]["pid"]
    # A direct client that knows the old layout, as every direct client does mid-resize.
    late = Client(d.endpoint, timeout=60, direct=True)
    assert late.get(moving[0]) == b"v0"

    resize, out = _resize_in_background(d, NEW)
    endpoints = _wait_moving(d, NEW)
    window: list[bytes] = []
    stopped = False
    try:
        # Stop the router between taking entries and delivering them. If it happened to stop
        # with no batch in flight, let it run a moment and stop it again.
        while "result" not in out:  # bounded by the resize itself
            os.kill(router_pid, signal.SIGSTOP)
            stopped = True
            window = _in_transit(endpoints, moving)
            if len(window) >= 3:
                break
            os.kill(router_pid, signal.SIGCONT)
            stopped = False
            time.sleep(0.002)
        assert len(window) >= 3, "never caught a batch in flight; the resize finished first"

        new_owner = endpoints[NEW - 1]
        half = len(window) // 2
        sets, deletes = window[:half], window[half:-1]
        replies = _ask(new_owner, [p.Set(k, b"direct") for k in sets] + [p.Delete(k) for k in deletes])
        statuses = {r.status for r in replies}
        assert statuses == {p.TRYAGAIN}, f"acknowledged or failed in the window: {statuses}"
        assert "may still be on its way" in replies[0].value

        # The library in the window: MOVED from the old owner, then the topology or TRYAGAIN send
        # it to the router, which is stopped, so it waits, and its write lands after the entry.
        via_client: dict = {}
        writer = threading.Thread(target=lambda: via_client.update(ok=late.set(window[-1], b"client")),
                                  daemon=True)
        writer.start()
        writer.join(0.2)
        assert writer.is_alive(), "the write completed while the router (its only correct path) was stopped"
    finally:
        if stopped:
            os.kill(router_pid, signal.SIGCONT)
    writer.join(60)
    resize.join(120)
    assert "error" not in out, out.get("error")
    assert out["result"]["lost"] == 0
    assert via_client == {"ok": True}
    late.close()

    with Client(d.endpoint, timeout=30) as c:
        got = c.get_many(keys)
    # Refused writes changed nothing; the client's write through the router stuck; nothing else moved.
    expected = {k: b"v0" for k in keys}
    expected[window[-1]] = b"client"
    assert {k: got.get(k) for k in keys} == expected


def test_router_mode_writes_wait_behind_the_moving_entries(make_daemon):
    d = make_daemon(shards=OLD)
    keys = _load(d)
    moving = [k for k in keys if shard_for(k, NEW) == NEW - 1]
    resize, out = _resize_in_background(d, NEW)
    endpoints = _wait_moving(d, NEW)
    with Client(d.endpoint) as c:
        new_pid = next(r["pid"] for r in c.stats()["shards"] if r["shard"] == NEW - 1)
    # The new owner stops: entries sent to it and requests re-routed to it queue in its socket.
    os.kill(new_pid, signal.SIGSTOP)
    try:
        window = []
        for old in range(OLD):
            mine = [k for k in moving if shard_for(k, OLD) == old]
            replies = _ask(endpoints[old], [p.Exists(k) for k in mine])
            window += [k for k, r in zip(mine, replies, strict=True) if r.status == p.MOVED]
        assert window, "no entry had left its old owner"
        window = window[:200]
        done: dict = {}

        def write() -> None:
            with Client(d.endpoint, timeout=60) as c, c.pipeline() as pipe:
                for i, key in enumerate(window):
                    if i % 3 == 0:
                        pipe.set(key, b"router")
                    elif i % 3 == 1:
                        pipe.delete(key)
                    else:
                        pipe.get(key)
                done["replies"] = pipe.execute()

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        writer.join(0.2)
        assert writer.is_alive(), "requests for moved keys were answered while their new owner was stopped"
    finally:
        os.kill(new_pid, signal.SIGCONT)
    writer.join(60)
    resize.join(120)
    assert "error" not in out, out.get("error")
    replies = done["replies"]
    # The delete found the moved entry and the get read it: both ran after the entry arrived.
    assert replies[0::3] == [True] * len(replies[0::3])
    assert replies[1::3] == [True] * len(replies[1::3])
    assert replies[2::3] == [b"v0"] * len(replies[2::3])
    with Client(d.endpoint, timeout=30) as c:
        got = c.get_many(keys)
    expected = {k: b"v0" for k in keys}
    for i, key in enumerate(window):
        if i % 3 == 0:
            expected[key] = b"router"
        elif i % 3 == 1:
            expected[key] = None
    assert {k: got.get(k) for k in keys} == expected

