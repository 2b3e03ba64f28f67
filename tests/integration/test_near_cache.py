"""Near caches against real daemons (docs/near-cache.md, "The guarantees"), in router mode, direct
mode and with AsyncClient.

The daemons mark keys hot at 1 read/s (``hot_key_min_rate = 1``), so a key read in a loop is
marked within a second or two; every wait is on state (a hit, a message on the feed, a worker
back up), never a bare sleep. Where a window must be open on purpose, the test holds it: it
waits until a message has reached a client's socket (tests/near_support.Peeking) before the
client reads, or it holds a near_get reply in hand while another client writes.

Not done here, and where instead: the loss of a message *inside* a live connection (an XPUB
past its high-water mark, 100 000 messages) cannot be forced in a test's time; a lost connection
is (test_a_lost_connection...), and the gap rule itself is model-checked in
tests/unit/test_near_cache.py, as are reads answered out of order with the feed in every
interleaving.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardd import protocol as p
from shardd.aclient import AsyncClient
from shardd.client import Client
from shardd.errors import SharddError
from shardd.hashing import shard_for
from shardd.near_cache import NearCache
from shardd.transport_client import Subscriber
from tests.conftest import Daemon
from tests.helpers import keys_on_shard
from tests.near_support import (
    WAIT,
    Blocking,
    fake_daemon,
    hold_and_peek,
    peek,
    read_until_held,
    stat,
    wait_until,
)

HOT_AT_ONCE = "hot_key_min_rate = 1.0\nhot_key_share = 0.001\n"


def start_daemon(tmp: Path, config: str, shards: int = 2) -> Daemon:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "shardd.toml"
    path.write_text(config)
    return Daemon(tmp, shards=shards, config=str(path)).start()


def stop_daemon(d: Daemon) -> None:
    try:
        assert d.stop() == 0, d.log()
    finally:
        d.kill_all()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("near"), HOT_AT_ONCE)
    yield d
    stop_daemon(d)


def client(d: Daemon, mode: str, **kwargs: Any) -> Any:
    if mode == "async":
        return Blocking(d.endpoint, timeout=WAIT, **kwargs)
    return Client(d.endpoint, timeout=WAIT, direct=mode == "direct", **kwargs)


@contextlib.contextmanager
def clients(d: Daemon, *modes: str, **kwargs: Any) -> Iterator[list[Any]]:
    made = [client(d, mode, **kwargs) for mode in modes]
    try:
        yield made
    finally:
        for c in made:
            c.close()


def shard_stats(admin: Client, shard: int) -> dict[str, Any]:
    return admin.stats()["shards"][shard]


def invalidates(shard: int, key: bytes) -> Any:
    return lambda m: m.shard == shard and m.kind == p.INVALIDATE_KEYS and key in m.keys


def resets(shard: int) -> Any:
    return lambda m: m.shard == shard and m.kind == p.INVALIDATE_ALL


# --- guarantee 2: served locally, and no stale read once the invalidation is delivered ----------------


@pytest.mark.parametrize("mode", ["router", "direct", "async"])
def test_a_hot_key_is_served_locally_until_another_clients_write_reaches_the_socket(daemon: Daemon,
                                                                                    mode: str) -> None:
    key = keys_on_shard(0, 2, 1, prefix=f"served-{mode}-")[0]
    with Client(daemon.endpoint, timeout=WAIT) as writer, clients(daemon, mode) as (reader,):
        writer.set(key, b"v1")
        assert read_until_held(reader, key) == b"v1"
        stats = reader.near_cache_stats()
        assert stats["following"] and stats["feeds"] == 2
        ops, hits = shard_stats(writer, 0)["ops"], stat(reader, "hits")
        for _ in range(200):
            assert reader.get(key) == b"v1"
        local = stat(reader, "hits") - hits
        remote = 200 - local
        assert local > 0
        # The worker saw the reads that were not answered locally, and hardly more (the stats call,
        # the router's and the supervisor's own periodic requests).
        assert shard_stats(writer, 0)["ops"] - ops <= remote + 10
        feed = peek(reader)
        seq = shard_stats(writer, 0)["near"]["seq"]
        writer.set(key, b"v2")
        # Acknowledged only once its invalidation is on its way: the feed's number has moved.
        assert shard_stats(writer, 0)["near"]["seq"] > seq
        feed.wait_for(lambda m: invalidates(0, key)(m) and m.seq > seq)  # it has reached the reader's socket
        invalidations = stat(reader, "invalidations")
        for _ in range(200):
            assert reader.get(key) == b"v2"
        assert stat(reader, "invalidations") == invalidations + 1


# --- guarantee 1: read-your-writes -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["router", "direct", "async"])
def test_a_clients_own_writes_are_visible_at_once(daemon: Daemon, mode: str) -> None:
    """Even while the daemon's invalidations of them are late (the client sees no feed message)."""
    key = keys_on_shard(1, 2, 1, prefix=f"own-{mode}-")[0]
    with clients(daemon, mode) as (c,):
        c.set(key, b"1")
        steps: list[tuple[Any, Any]] = [
            (lambda: c.set(key, b"5"), b"5"),
            (lambda: c.incr(key, 2), b"7"),
            (lambda: c.append(key, b"0"), b"70"),
            (lambda: c.set_many({key: b"m"}), b"m"),
            (lambda: c.expire(key, 3600), b"m"),
            (lambda: c.delete(key), None),
        ]
        for write, after in steps:
            read_until_held(c, key)
            feed = peek(c)
            feed.late = True
            write()
            assert c.get(key) == after
            feed.late = False


def test_a_clients_own_pipelined_writes_are_visible_at_once(daemon: Daemon) -> None:
    key = keys_on_shard(1, 2, 1, prefix="pipe-")[0]
    with Client(daemon.endpoint, timeout=WAIT) as c:
        c.set(key, b"1")
        read_until_held(c, key)
        peek(c).late = True
        with c.pipeline() as pipe:
            pipe.incr(key)
            pipe.get(key)
            assert pipe.execute() == [2, b"2"]
        assert c.get(key) == b"2"


# --- Rule 1: a reply read before a write is not kept once the write's invalidation came first -------


@pytest.mark.parametrize("mode", ["router", "direct"])
def test_a_reply_read_before_a_write_is_not_kept_when_the_writes_invalidation_is_waiting(daemon: Daemon,
                                                                                        mode: str) -> None:
    """The window held open: the reader's near_get has been answered (at seq r) but its reply is
    held in the test's hand while another client writes the key and the write's invalidation
    (seq > r) reaches the reader's socket. Then the reply goes on to the reader, which must drain
    its feed before it keeps the value, and so must not keep it."""
    key = keys_on_shard(0, 2, 1, prefix=f"race-{mode}-")[0]
    with Client(daemon.endpoint, timeout=WAIT) as writer, clients(daemon, mode) as (reader,):
        writer.set(key, b"old")
        read_until_held(reader, key)
        feed = peek(reader)
        reader.set(key, b"old")  # drops the reader's copy, so its next read is a near_get
        reply_seq: list[int] = []
        original = reader._reply

        def held(op: p.Op) -> p.Reply:
            answer = original(op)
            if type(op) is p.NearGet and not reply_seq:
                value, lease, shard, _, seq = answer.value
                assert (value, shard) == (b"old", 0) and lease > 0  # a hot value the reader would keep...
                reply_seq.append(seq)
                writer.set(key, b"new")  # ...but the key changes after the read was answered
                feed.wait_for(lambda m: invalidates(0, key)(m) and m.seq > seq)
            return answer

        reader._reply = held
        refused, admitted = stat(reader, "refused"), stat(reader, "admitted")
        assert reader.get(key) == b"old"  # the read was answered before the write: that is its value
        del reader._reply
        assert reply_seq, "the hook did not run"
        assert stat(reader, "refused") == refused + 1 and stat(reader, "admitted") == admitted
        assert reader.get(key) == b"new"  # from the worker, not from a copy
        for _ in range(50):
            assert reader.get(key) == b"new"


# --- guarantee 4: flush, resize, a lost connection, a restarted worker ------------------------------


def test_a_flush_drops_every_clients_copies(daemon: Daemon) -> None:
    k0 = keys_on_shard(0, 2, 1, prefix="flush-")[0]
    k1 = keys_on_shard(1, 2, 1, prefix="flush-")[0]
    with Client(daemon.endpoint, timeout=WAIT) as admin, clients(daemon, "router", "direct", "async") as readers:
        admin.set_many({k0: b"a", k1: b"b"})
        feeds = hold_and_peek(readers, k0, k1)
        before = [stat(reader, "resets") for reader in readers]
        admin.flush()
        for reader, feed, resets_before in zip(readers, feeds, before, strict=True):
            feed.wait_for(resets(0))
            feed.wait_for(resets(1))
            assert reader.get(k0) is None and reader.get(k1) is None
            assert stat(reader, "resets") == resets_before + 2
            assert stat(reader, "entries") == 0


def test_a_lost_connection_to_a_feed_is_a_gap_that_drops_the_shards_copies(daemon: Daemon) -> None:
    """A feed connection that breaks and is made again loses what was sent meanwhile (ZeroMQ does
    not replay): here the test closes the reader's subscription, another client writes, and the
    reader subscribes again. The worker greets the new subscription with its current seq, which
    skips the lost message: the reader drops every copy of that shard, not only the written key."""
    written, other = keys_on_shard(0, 2, 2, prefix="gap-")
    elsewhere = keys_on_shard(1, 2, 1, prefix="gap-")[0]
    with Client(daemon.endpoint, timeout=WAIT) as writer, Client(daemon.endpoint, timeout=WAIT) as reader:
        writer.set_many({written: b"1", other: b"1", elsewhere: b"1"})
        for key in (written, other, elsewhere):
            read_until_held(reader, key)
        old = reader._feed
        endpoints = set(old.endpoints)
        old.close()  # the connection breaks...
        writer.set(written, b"2")  # ...its invalidation is sent to nobody...
        fresh = Subscriber(reader._curve, reader._context)
        fresh.follow(endpoints)  # ...and the connection is made again
        reader._feed = fresh
        feed = peek(reader)
        feed.wait_for(lambda m: m.shard == 0)
        gaps = stat(reader, "gaps")
        assert reader.get(written) == b"2"
        assert stat(reader, "gaps") == gaps + 1
        held = reader._near.entries
        assert other not in held  # every copy of shard 0 was dropped, not only the written key's
        assert elsewhere in held  # shard 1's stays
        assert reader.get(other) == b"1" and reader.get(elsewhere) == b"1"


def test_a_resize_drops_the_copies_and_reads_after_it_are_right(tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "d", HOT_AT_ONCE)
    try:
        moving = next(k for k in keys_on_shard(0, 2, 50, prefix="rs-") if shard_for(k, 3) == 2)
        staying = next(k for k in keys_on_shard(0, 2, 50, prefix="rs-") if shard_for(k, 3) == 0)
        with Client(d.endpoint, timeout=WAIT) as admin, clients(d, "router", "direct") as readers:
            admin.set_many({moving: b"1", staying: b"1"})
            feeds = hold_and_peek(readers, moving, staying)
            assert admin.resize(3)["to"] == 3
            for feed in feeds:
                feed.wait_for(resets(0))  # sent when the resize started
            admin.set(moving, b"2")  # on shard 2 now, whose feed the reader may not follow yet
            for reader in readers:
                for _ in range(20):
                    assert reader.get(moving) == b"2"
                    assert reader.get(staying) == b"1"
            direct = readers[1]
            read_until_held(direct, moving)  # a direct client follows the new shard's feed
            admin.set(moving, b"3")
            wait_until(lambda: direct.get(moving) == b"3", what="the new shard's invalidation")
    finally:
        stop_daemon(d)


LEASE_MS = 300  # the kill tests' lease: the bound on a copy of a dead worker's value


@pytest.fixture(scope="module")
def short_lease(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("lease"), HOT_AT_ONCE + f"near_cache_lease_ms = {LEASE_MS}\n")
    yield d
    stop_daemon(d)


def kill_worker(admin: Client, shard: int) -> float:
    """SIGKILL shard's worker, wait until the supervisor's replacement serves; when it was killed."""
    old = shard_stats(admin, shard)["pid"]
    killed_at = time.monotonic()
    os.kill(old, signal.SIGKILL)

    def replaced() -> bool:
        try:
            row = shard_stats(admin, shard)
        except SharddError:
            return False
        return row.get("status") == "up" and row.get("pid") not in (None, old)

    wait_until(replaced, what=f"shard {shard} served by a new worker")
    return killed_at


def test_a_killed_workers_values_are_not_served_past_the_lease_and_the_new_feed_is_followed(
        short_lease: Daemon) -> None:
    """Direct mode (router mode: test_bug_a_router_mode_client_follows_the_feed_of_a_restarted_worker)."""
    key = keys_on_shard(1, 2, 1, prefix="kill-direct-")[0]
    with Client(short_lease.endpoint, timeout=WAIT) as admin, clients(short_lease, "direct") as (reader,):
        admin.set(key, b"before")
        read_until_held(reader, key)
        killed_at = kill_worker(admin, 1)
        admin.set(key, b"after")  # the new worker started empty
        wait_until(lambda: time.monotonic() > killed_at + LEASE_MS / 1000, what="the lease")  # (long past)
        for _ in range(50):
            assert reader.get(key) == b"after"
        read_until_held(reader, key)  # copies are kept again: the new worker's feed is followed
        assert reader.get(key) == b"after"


def test_a_router_mode_client_follows_the_feed_of_a_restarted_worker(short_lease: Daemon) -> None:
    """Was a bug (fixed in issue 15): a router-mode client never follows a restarted worker's feed (see the unit test
    test_bug_a_router_mode_client_follows_a_restarted_workers_feed for the cause and the fix):
    every reply of the new worker is refused, so the shard's hot keys are never kept again."""
    key = keys_on_shard(0, 2, 1, prefix="kill-router-")[0]
    with Client(short_lease.endpoint, timeout=WAIT) as admin, clients(short_lease, "router") as (reader,):
        admin.set(key, b"before")
        read_until_held(reader, key)
        killed_at = kill_worker(admin, 0)
        admin.set(key, b"after")
        wait_until(lambda: time.monotonic() > killed_at + LEASE_MS / 1000, what="the lease")
        for _ in range(50):
            assert reader.get(key) == b"after"  # (this part holds: the lease bounds the old copy)
        read_until_held(reader, key, timeout=5)  # the client re-reads the topology within 1 s


# --- a daemon without near caches, an old daemon, a client without one -------------------------------


@pytest.fixture(scope="module")
def near_off(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("off"), HOT_AT_ONCE + "near_cache = false\n")
    yield d
    stop_daemon(d)


@pytest.mark.parametrize("mode", ["router", "direct", "async"])
def test_a_daemon_with_near_caches_off_serves_near_cache_clients_as_before(near_off: Daemon, mode: str) -> None:
    key = f"off-{mode}"
    with clients(near_off, mode) as (c,), Client(near_off.endpoint, timeout=WAIT) as admin:
        assert all("near" not in row for row in admin.stats()["shards"])
        c.set(key, b"1")
        for i in range(300):  # far past the marking rate
            assert c.get(key) == str(i + 1).encode()
            c.incr(key)
        stats = c.near_cache_stats()
        assert stats is None or (stats["admitted"], stats["hits"], stats["entries"]) == (0, 0, 0)


@pytest.mark.parametrize("mode", ["router", "direct"])
def test_a_daemon_with_near_caches_off_names_no_feeds_and_clients_turn_theirs_off(near_off: Daemon,
                                                                                      mode: str) -> None:
    """Was a bug (fixed): docs/near-cache.md: "``near_cache = false`` ... leaves ``invalidations`` out of the
    topology" and "a daemon whose topology has no ``invalidations`` ... gets plain ``get``s from
    then on". The router always lists them (``[None, None]`` here), and a router-mode client
    never reads the topology unless a reply is hot, so neither client turns its near cache off:
    every get stays a near_get and near_cache_stats() stays a dict."""
    with clients(near_off, mode) as (c,):
        c.set("x", b"1")
        assert c.get("x") == b"1"
        assert "invalidations" not in c.topology()
        assert c.near_cache_stats() is None


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("old", [True, False], ids=["old daemon", "refuses near_get"])
def test_a_daemon_without_near_get_gets_plain_gets_from_the_first_read(kind: str, old: bool) -> None:
    """An old daemon (no feed in its topology, near_get an op it cannot decode), or one whose
    topology names a feed but whose shard refuses near_get: the first read is right, and from then
    on every read is a plain get."""
    with fake_daemon(old=old, refuse_near_get=True) as fake:
        fake.put(b"k", b"v")
        c = Blocking(fake.endpoint, timeout=WAIT) if kind == "async" else Client(fake.endpoint, timeout=WAIT)
        try:
            assert c.get("k") == b"v"
            assert c.near_cache_stats() is None
            first = fake.tags()
            assert first[-1] == "get" and first.count("near_get") <= 1
            assert c.get("k") == b"v" and c.get("nope") is None
            assert fake.tags() == [*first, "get", "get"]
        finally:
            c.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_client_without_a_near_cache_never_sends_near_get(kind: str) -> None:
    with fake_daemon() as fake:
        fake.put(b"k", b"v")
        fake.mark(b"k")
        c: Any = (Blocking(fake.endpoint, timeout=WAIT, near_cache=False) if kind == "async"
                  else Client(fake.endpoint, timeout=WAIT, near_cache=False))
        try:
            for _ in range(20):
                assert c.get("k") == b"v"
            assert c.near_cache_stats() is None
            pipe = c.pipeline()
            pipe.get("k")
            pipe.set("k", b"w")
            done = pipe.execute()
            assert (c.loop.run_until_complete(done) if kind == "async" else done) == [b"v", True]
            assert set(fake.tags()) == {"get", "set"} and fake.topologies == 0
        finally:
            c.close()


def test_a_client_without_a_near_cache_never_subscribes_to_a_feed(daemon: Daemon) -> None:
    key = keys_on_shard(0, 2, 1, prefix="plain-")[0]
    with Client(daemon.endpoint, timeout=WAIT, near_cache=False) as plain, Client(daemon.endpoint) as admin:
        admin.set(key, b"v")
        for _ in range(300):
            assert plain.get(key) == b"v"
        assert plain.near_cache_stats() is None
        assert plain._feed is None  # never subscribed to anything


# --- the stress test ------------------------------------------------------------------------------

STRESS_LEASE_MS = 200
HOT = [f"hot{i}" for i in range(6)]  # each written by one process (HOT[i] by process i % PROCS)
PROCS = 3


def _stress(endpoint: str, index: int, mode: str, stop: Any, progress: Any, out: Any) -> None:
    """Read every hot key, write our own with increasing stamps; report what was read and acknowledged.

    A read is kept as runs: (key, stamp, first start, last start) per run of equal answers, so
    the checker sees the latest start of every answer (the one that matters for staleness).
    """
    rng = random.Random(index)
    mine = [key for i, key in enumerate(HOT) if i % PROCS == index]
    stamp = 0
    acked: list[tuple[str, int, float]] = []  # (key, stamp, acknowledged at)
    runs: list[list[Any]] = []
    last: dict[str, list[Any]] = {}
    errors = 0
    c: Any = Blocking(endpoint, timeout=2) if mode == "async" else Client(endpoint, timeout=2,
                                                                          direct=mode == "direct")
    try:
        while not stop.is_set():
            key = rng.choice(HOT)
            try:
                if key in mine and rng.random() < 0.1:
                    stamp += 1
                    c.set(key, str(stamp).encode())
                    acked.append((key, stamp, time.monotonic()))
                else:
                    started = time.monotonic()
                    value = c.get(key)
                    got = None if value is None else int(value)
                    run = last.get(key)
                    if run is not None and run[1] == got:
                        run[3] = started
                    else:
                        run = last[key] = [key, got, started, started]
                        runs.append(run)
            except SharddError:
                errors += 1  # a worker killed or moving: not acknowledged, not read
            progress.value += 1
        stats = c.near_cache_stats() or {}
    finally:
        c.close()
    out.put({"index": index, "acked": acked, "runs": runs, "errors": errors, "hits": stats.get("hits", 0),
             "admitted": stats.get("admitted", 0)})


def test_stress_readers_and_writers_through_flush_resize_and_a_killed_worker(tmp_path: Path) -> None:
    """Several client processes read a small hot keyspace and write their own keys while the test
    flushes, resizes 2 -> 3 and SIGKILLs a worker. No read may be stale past the bound:

    - a read that *started* more than the lease after a newer write of its key was acknowledged
      returned the older value (a copy is never served past its lease, counted from before the
      read that fetched it, which was before that write was acknowledged);
    - a client read a key's stamp lower than one it had read before (stamps only grow; a
      blocking client's copies come from its own earlier reads);
    - a read started more than the lease after a flush, or after a worker's SIGKILL, returned
      a value acknowledged before it (the flush or the kill took it away).

    And the near caches must have served reads (the test is not vacuous). The worker killed is
    shard 1's, which every client follows from the start, so they hold its keys when it dies: with
    a healthy feed invalidations beat the lease by far, and it is the killed feed that makes the
    lease the bound that matters (a client keeping copies past it fails here).
    """
    d = start_daemon(tmp_path / "d", HOT_AT_ONCE + f"near_cache_lease_ms = {STRESS_LEASE_MS}\n")
    lease = STRESS_LEASE_MS / 1000
    mp = multiprocessing.get_context("spawn")
    stop, out = mp.Event(), mp.Queue()
    progress = [mp.Value("l", 0) for _ in range(PROCS)]
    modes = ["router", "direct", "async"]
    procs = [mp.Process(target=_stress, args=(d.endpoint, i, modes[i], stop, progress[i], out))
             for i in range(PROCS)]
    events: list[tuple[str, float, int | None]] = []  # (what, when, shard)
    try:
        for proc in procs:
            proc.start()

        def every_process_did(n: int) -> bool:
            return all(v.value >= n for v in progress)

        def after(n: int) -> None:
            marks = [v.value for v in progress]
            wait_until(lambda: all(v.value >= m + n for v, m in zip(progress, marks, strict=True)),
                       what=f"{n} more ops in every process")

        with Client(d.endpoint, timeout=WAIT) as admin:
            wait_until(lambda: every_process_did(500), what="the load")
            after(2000)
            events.append(("flush", time.monotonic(), None))
            admin.flush()
            after(2000)
            assert admin.resize(3)["to"] == 3
            after(2000)
            events.append(("kill", kill_worker(admin, 1), 1))  # a shard every client follows
            after(2000)
        stop.set()
        results = [out.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(30)
    finally:
        stop.set()
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        stop_daemon(d)
    acked: dict[str, list[tuple[int, float]]] = {key: [] for key in HOT}
    for r in results:
        for key, stamp, at in r["acked"]:
            acked[key].append((stamp, at))
    violations = []
    for r in results:
        highest: dict[str, int] = {}
        for key, got, _first, last in r["runs"]:
            if got is not None:
                if got < highest.get(key, 0):
                    violations.append(f"process {r['index']}: {key} read {got} after {highest[key]}")
                highest[key] = max(highest.get(key, 0), got)
                newer = [at for stamp, at in acked[key] if stamp > got]
                if newer and last > min(newer) + lease:
                    violations.append(f"process {r['index']}: {key} read {got} at {last:.3f}, "
                                      f"a newer write was acknowledged at {min(newer):.3f}")
                for what, when, shard in events:
                    gone = [stamp for stamp, at in acked[key] if at < when and stamp == got]
                    if gone and (shard is None or shard_for(key.encode(), 3) == shard) and last > when + lease:
                        violations.append(f"process {r['index']}: {key} read {got} at {last:.3f}, "
                                          f"acknowledged before the {what} at {when:.3f}")
    assert violations == []
    assert sum(r["hits"] for r in results) > 0, "the near caches served nothing: the test checked nothing"
    assert all(r["acked"] for r in results) and all(r["runs"] for r in results)
    print(f"\nnear-cache stress: {sum(len(r['acked']) for r in results)} writes, "
          f"{sum(r['hits'] for r in results)} local hits, {sum(r['admitted'] for r in results)} copies kept, "
          f"{sum(r['errors'] for r in results)} errors")


def test_a_bounded_near_cache_in_a_real_client(daemon: Daemon) -> None:
    keys = keys_on_shard(1, 2, 6, prefix="bound-")
    with Client(daemon.endpoint, timeout=WAIT, near_cache=NearCache(max_entries=2)) as c:
        c.set_many(dict.fromkeys(keys, b"v"))
        read_until_held(c, keys[0])
        for _ in range(20):
            for key in keys:
                assert c.get(key) == b"v"
                assert stat(c, "entries") <= 2


def test_async_client_reads_concurrently_through_its_near_cache(daemon: Daemon) -> None:
    import asyncio

    key = keys_on_shard(0, 2, 1, prefix="async-many-")[0]

    async def main() -> None:
        async with AsyncClient(daemon.endpoint, timeout=WAIT) as ac:
            await ac.set(key, b"v")
            deadline = time.monotonic() + WAIT
            while stat(ac, "hits") == 0:
                assert time.monotonic() < deadline
                assert await ac.get(key) == b"v"
            values = await asyncio.gather(*(ac.get(key) for _ in range(100)))
            assert values == [b"v"] * 100
            await ac.set(key, b"w")
            assert await ac.get(key) == b"w"

    asyncio.run(main())
