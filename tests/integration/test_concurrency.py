"""Per-key atomicity and ordering under concurrent clients, and BUSY backpressure."""

from __future__ import annotations

import multiprocessing
import threading

import pytest

from shardd.client import Client
from shardd.errors import Busy
from tests.helpers import keys_on_shard

KEYS = ["ctr:a", "ctr:b", "ctr:c"]


def _incr_worker(endpoint: str, n: int) -> None:
    with Client(endpoint, timeout=30) as c:  # a deadline against a hang
        for i in range(n):
            c.incr(KEYS[i % len(KEYS)])


def test_incr_from_threads_and_processes_is_exact(daemon):
    with Client(daemon.endpoint) as c:
        c.delete_many(KEYS)
    per_actor, threads, procs = 300, 4, 3
    mp = multiprocessing.get_context("spawn")
    ps = [mp.Process(target=_incr_worker, args=(daemon.endpoint, per_actor)) for _ in range(procs)]
    ts = [threading.Thread(target=_incr_worker, args=(daemon.endpoint, per_actor)) for _ in range(threads)]
    for x in [*ps, *ts]:
        x.start()
    for t in ts:
        t.join(60)
    for p in ps:
        p.join(60)
        assert p.exitcode == 0
    total = (threads + procs) * per_actor
    with Client(daemon.endpoint) as c:
        values = [int(c.get(k)) for k in KEYS]
    assert sum(values) == total
    assert values == [total // 3] * 3


def _writer_reader(endpoint: str, key: str, rounds: int, errors: list) -> None:
    with Client(endpoint, timeout=30) as c:  # a deadline against a hang
        for i in range(rounds):
            value = f"{key}:{i}".encode()
            c.set(key, value)
            got = c.get(key)
            if got != value:
                errors.append((key, i, got))


def test_read_your_writes_under_concurrent_clients(daemon):
    errors: list = []
    ts = [threading.Thread(target=_writer_reader, args=(daemon.endpoint, f"ryw{i}", 300, errors))
          for i in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert errors == []


def test_busy_past_the_mailbox_limit_other_shard_unaffected(make_daemon):
    limit = 4
    d = make_daemon("--mailbox-limit", str(limit), shards=2)
    k0 = keys_on_shard(0, 2, 20)
    k1 = keys_on_shard(1, 2, 1)[0]
    import os
    import signal

    import zmq

    from shardd import protocol as proto

    with Client(d.endpoint, timeout=30) as c:
        worker = c.stats()["shards"][0]["pid"]
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(d.endpoint)
    # Shard 0's worker is stopped: the router forwards `limit` gets and must refuse the rest,
    # however slow the machine (a debug_sleep would hold the mailbox only for so long).
    os.kill(worker, signal.SIGSTOP)
    try:
        for i, key in enumerate(k0):
            s.send(proto.encode_request(100 + i, proto.Get(key)))
        statuses: dict[int, int] = {}
        while len(statuses) < len(k0) - limit:
            assert s.poll(30_000), statuses
            r = proto.decode_reply(s.recv())
            statuses[r.id] = r.status
        assert set(statuses.values()) == {proto.BUSY}
        with Client(d.endpoint, timeout=30) as c:  # shard 1 serves while shard 0 is full
            assert c.set(k1, b"ok") is True
            assert c.get(k1) == b"ok"
            with pytest.raises(Busy, match="mailbox_limit"):
                c.get(k0[0])
    finally:
        os.kill(worker, signal.SIGCONT)
    while len(statuses) < len(k0):
        assert s.poll(30_000), statuses
        r = proto.decode_reply(s.recv())
        statuses[r.id] = r.status
    assert sum(1 for x in statuses.values() if x == proto.BUSY) == len(k0) - limit
    assert sum(1 for x in statuses.values() if x == proto.OK) == limit
    s.close(0)
    ctx.term()
    with Client(d.endpoint, timeout=30) as c:
        row = c.stats()["shards"][0]
        assert row["busy"] >= len(k0) - limit + 1
        assert row["mailbox_high"] == limit
