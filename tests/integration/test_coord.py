"""shardd.coord against a real etcd: keys, CAS, leases, campaigning, watches across restarts.

The Coordinator is asyncio; the tests are plain functions that drive it on an event loop in a
background thread (``Aio``). So they can stop, kill and restart etcd from the main thread and
wait with tests.helpers.wait_until, like every other integration test. Every wait is a deadline
against a hang, never a bound asserted on: a lease vanishing is waited for, not timed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from shardd.errors import ConfigError
from tests.etcd_server import EtcdServer, etcd_server  # noqa: F401 - the fixture, used by name
from tests.helpers import wait_until

T = TypeVar("T")
PREFIX = "/shardd/test/"


def need_aetcd() -> None:
    """Skip without aetcd, as without etcd; under SHARDD_REQUIRE_ETCD=1 (CI) fail instead."""
    if os.environ.get("SHARDD_REQUIRE_ETCD") == "1":
        import aetcd  # noqa: F401 - an ImportError here is the failure
    else:
        pytest.importorskip("aetcd", reason="cluster tests need aetcd: pip install 'shardd[cluster]'")


class Aio:
    """An event loop in a thread: ``run(coro)`` from the test's thread, with a deadline."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="aio", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Start ``coro`` as a task on the loop; returns a concurrent future for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_all(), timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture
def aio() -> Iterator[Aio]:
    a = Aio()
    yield a
    a.close()


@pytest.fixture
def coords(etcd_server: EtcdServer, aio: Aio) -> Iterator[Any]:  # noqa: F811 - pytest fixture
    """Factory: coords(**kwargs) -> a connected Coordinator on the test's etcd; all closed after."""
    need_aetcd()
    from shardd.coord import Coordinator

    made: list[Coordinator] = []

    def make(endpoints: list[str] | None = None, prefix: str = PREFIX, ttl: int = 2, **kw: Any) -> Coordinator:
        async def connect() -> Coordinator:
            c = Coordinator(endpoints or [etcd_server.endpoint], prefix, ttl, **kw)
            made.append(c)
            await c.connect()
            return c

        return aio.run(connect())

    yield make
    for c in made:
        aio.run(c.close())


class Watching:
    """A watch consumed on the loop: every snapshot it yielded, in order."""

    def __init__(self, aio: Aio, coord: Any, sub: str = "") -> None:
        self.snapshots: list[tuple[dict[str, bytes], int]] = []
        self.future = aio.spawn(self._consume(coord, sub))

    async def _consume(self, coord: Any, sub: str) -> None:
        async for snapshot in coord.watch(sub):
            self.snapshots.append(snapshot)

    def wait_for(self, state: dict[str, bytes], what: str) -> int:
        """Wait until the latest snapshot is ``state``; returns its revision."""
        def reached() -> int | None:
            assert not self.future.done() or self.future.exception() is None, self.future.exception()
            if self.snapshots and self.snapshots[-1][0] == state:
                return self.snapshots[-1][1]
            return None

        return wait_until(reached, timeout=30, what=what)


# --- configuration, no etcd needed ------------------------------------------------------------


def test_without_aetcd_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import shardd.coord as coord  # importing needs no aetcd: it is imported on first use

    monkeypatch.setitem(sys.modules, "aetcd", None)  # "import aetcd" now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'shardd\[cluster\]'"):
        coord.Coordinator(["http://127.0.0.1:2379"], PREFIX, 2)


@pytest.mark.parametrize(("endpoints", "prefix", "ttl", "match"), [
    ([], PREFIX, 2, "endpoints"),
    ("http://127.0.0.1:2379", PREFIX, 2, "endpoints"),
    (["https://127.0.0.1:2379"], PREFIX, 2, "only http"),
    (["http://127.0.0.1"], PREFIX, 2, "HOST:PORT"),
    (["http://127.0.0.1:2379"], "/shardd/c", 2, "prefix"),
    (["http://127.0.0.1:2379"], "/", 2, "prefix"),
    (["http://127.0.0.1:2379"], PREFIX, 1, "at least 2"),
])
def test_bad_configuration_is_a_config_error(endpoints: Any, prefix: str, ttl: int, match: str) -> None:
    need_aetcd()
    from shardd.coord import Coordinator

    with pytest.raises(ConfigError, match=match):
        Coordinator(endpoints, prefix, ttl)


# --- keys and transactions --------------------------------------------------------------------


def test_put_get_delete_cas_create(coords: Any, aio: Aio) -> None:
    c = coords()
    other = coords(prefix="/shardd/test2/")  # a sibling cluster: never seen under PREFIX

    async def scenario() -> None:
        await other.put("map", b"not ours")
        rev = await c.put("map", b"v1")
        assert await c.get("map") == (b"v1", rev)
        assert await c.get("absent") is None

        assert not await c.cas("map", b"stale", rev - 1)
        assert not await c.cas("map", b"exists", 0)
        assert await c.cas("map", b"v2", rev)
        value, rev2 = await c.get("map")
        assert value == b"v2" and rev2 > rev
        assert await c.cas("fresh", b"f", 0)
        assert await c.get("fresh") is not None

        await c.grant()
        assert await c.create("controller", b"me")
        assert not await c.create("controller", b"you")
        assert (await c.get("controller"))[0] == b"me"
        assert await c.create("plain", b"p", lease=False)

        await c.put("members/a", b"A")
        members, at = await c.get_prefix("members/")
        assert members == {"members/a": b"A"} and at >= rev2
        everything, _ = await c.get_prefix()
        assert set(everything) == {"map", "fresh", "controller", "plain", "members/a"}

        assert await c.delete("map")
        assert not await c.delete("map")
        assert await c.get("map") is None
        assert (await other.get("map"))[0] == b"not ours"

    aio.run(scenario())


# --- leases -----------------------------------------------------------------------------------


def test_lease_key_vanishes_after_ttl_without_keepalives(coords: Any, aio: Aio) -> None:
    from shardd.coord import LeaseLost

    c = coords(ttl=2)
    lease_id, ttl = aio.run(c.grant())
    assert lease_id == c.lease_id and ttl >= 2
    aio.run(c.put("members/n1", b"up", lease=True))
    assert aio.run(c.keepalive()) >= 2
    # No more keepalives: etcd expires the lease and deletes the key, about ttl s later.
    wait_until(lambda: aio.run(c.get("members/n1")) is None, timeout=30, interval=0.1,
               what="the leased key to vanish")
    assert aio.run(c.keepalive()) is None
    assert c.lease_id is None
    with pytest.raises(LeaseLost):
        aio.run(c.put("members/n1", b"up", lease=True))
    aio.run(c.grant())  # a node that lost its lease registers anew
    aio.run(c.put("members/n1", b"up", lease=True))
    assert aio.run(c.get("members/n1"))[0] == b"up"


def test_keepalive_keeps_the_key(coords: Any, aio: Aio) -> None:
    c = coords(ttl=2)
    aio.run(c.grant())
    aio.run(c.put("members/n1", b"up", lease=True))

    async def keep(until: float) -> int:
        refreshes = 0
        while time.monotonic() < until:
            assert await c.keepalive() is not None
            refreshes += 1
            await asyncio.sleep(0.4)  # well inside the 2 s TTL, even on a busy machine
        return refreshes

    assert aio.run(keep(time.monotonic() + 3 * c.ttl)) > 1
    assert aio.run(c.get("members/n1"))[0] == b"up"


def test_revoke_deletes_at_once(coords: Any, aio: Aio) -> None:
    c, observer = coords(ttl=30), coords()
    aio.run(c.grant())
    aio.run(c.put("members/n1", b"up", lease=True))
    aio.run(c.put("map", b"kept"))
    aio.run(c.revoke())
    # Revoke returns after etcd applied it: the bound key is gone now, not in 30 s.
    assert aio.run(observer.get("members/n1")) is None
    assert aio.run(observer.get("map")) is not None
    assert c.lease_id is None and aio.run(c.keepalive()) is None
    aio.run(c.revoke())  # no lease: nothing to do


def test_two_campaigners_one_winner_then_the_other(coords: Any, aio: Aio) -> None:
    a, b = coords(ttl=30), coords(ttl=30)

    async def campaign() -> tuple[bool, bool]:
        await asyncio.gather(a.grant(), b.grant())
        won = await asyncio.gather(a.create("controller", b"a"), b.create("controller", b"b"))
        return won[0], won[1]

    won_a, won_b = aio.run(campaign())
    assert won_a != won_b, "exactly one campaigner wins"
    winner, loser, name = (a, b, b"a") if won_a else (b, a, b"b")
    assert aio.run(loser.get("controller"))[0] == name
    assert not aio.run(loser.create("controller", b"again"))
    aio.run(winner.revoke())  # the controller steps down (or dies: then after its TTL)
    assert aio.run(loser.create("controller", b"next"))
    assert aio.run(winner.get("controller"))[0] == b"next"


# --- watches ----------------------------------------------------------------------------------


def test_watch_yields_the_state_then_every_change(coords: Any, aio: Aio) -> None:
    c = coords()
    aio.run(c.put("members/a", b"A"))
    watching = Watching(aio, c, "members/")
    first = watching.wait_for({"members/a": b"A"}, "the initial snapshot")

    aio.run(c.put("members/b", b"B"))
    aio.run(c.put("map", b"outside the watched prefix"))
    aio.run(c.delete("members/a"))
    last = watching.wait_for({"members/b": b"B"}, "the changes")
    assert last > first
    revisions = [rev for _, rev in watching.snapshots]
    assert revisions == sorted(revisions)
    assert all(set(s) <= {"members/a", "members/b"} for s, _ in watching.snapshots)

    # A burst lands whole: the last snapshot holds all of it (however it was coalesced).
    async def burst() -> None:
        for i in range(50):
            await c.put(f"members/x{i}", b"%d" % i)

    aio.run(burst())
    watching.wait_for({"members/b": b"B", **{f"members/x{i}": b"%d" % i for i in range(50)}}, "the burst")

    aio.run(c.close())  # the watch ends when its Coordinator is closed, and only then
    watching.future.result(timeout=30)


def test_watch_resumes_after_etcd_restart(coords: Any, aio: Aio, etcd_server: EtcdServer,  # noqa: F811
                                         caplog: pytest.LogCaptureFixture) -> None:
    c = coords()
    aio.run(c.put("members/a", b"A"))
    aio.run(c.put("members/b", b"B"))
    watching = Watching(aio, c, "members/")
    watching.wait_for({"members/a": b"A", "members/b": b"B"}, "the initial snapshot")

    etcd_server.stop()
    etcd_server.start()
    # A change made right after the restart, by another node: the watch sees it whether it
    # re-listed before or after (list at R, watch from R + 1).
    writer = coords()
    aio.run(writer.put("members/c", b"C"))
    aio.run(writer.delete("members/a"))
    watching.wait_for({"members/b": b"B", "members/c": b"C"}, "the post-restart state")

    # And it goes on watching on the new connection.
    aio.run(writer.put("members/d", b"D"))
    watching.wait_for({"members/b": b"B", "members/c": b"C", "members/d": b"D"}, "a change after the restart")
    assert not watching.future.done()
    assert "broke" in caplog.text, "the watch went through its re-list path"


# --- a dead or frozen etcd --------------------------------------------------------------------


def _every_call_fails_in_time(c: Any, aio: Aio, endpoint: str) -> None:
    from shardd.coord import CoordError

    calls = [lambda: c.get("k"), lambda: c.put("k", b"v"), lambda: c.delete("k"),
             lambda: c.cas("k", b"v", 0), lambda: c.create("k", b"v", lease=False),
             lambda: c.get_prefix(), lambda: c.grant(), lambda: c.keepalive()]
    for call in calls:
        # aio.run's deadline (well past the 1 s timeout) is what catches a hang.
        with pytest.raises(CoordError, match=endpoint.removeprefix("http://")):
            aio.run(call(), timeout=30)


def test_killed_etcd_calls_raise_coord_error(coords: Any, aio: Aio, etcd_server: EtcdServer) -> None:  # noqa: F811
    from shardd.coord import CoordError, Coordinator

    c = coords(ttl=2, timeout=1)
    aio.run(c.grant())
    etcd_server.kill()
    _every_call_fails_in_time(c, aio, etcd_server.endpoint)

    async def connect_fresh() -> None:
        fresh = Coordinator([etcd_server.endpoint], PREFIX, 2, timeout=1)
        try:
            await fresh.connect()
        finally:
            await fresh.close()

    with pytest.raises(CoordError, match="unreachable"):
        aio.run(connect_fresh(), timeout=30)


def test_frozen_etcd_calls_time_out(coords: Any, aio: Aio, etcd_server: EtcdServer) -> None:  # noqa: F811
    c = coords(ttl=2, timeout=1)
    aio.run(c.grant())
    os.kill(etcd_server.proc.pid, signal.SIGSTOP)  # connections stay open, nothing answers
    try:
        _every_call_fails_in_time(c, aio, etcd_server.endpoint)
    finally:
        os.kill(etcd_server.proc.pid, signal.SIGCONT)
    # Once etcd answers again, so do calls (gRPC reconnects on its own).
    wait_until(lambda: _answers(c, aio), timeout=30, interval=0.2, what="calls to work again")


def _answers(c: Any, aio: Aio) -> bool:
    from shardd.coord import CoordError

    try:
        aio.run(c.get("k"))
    except CoordError:
        return False
    return True


def test_falls_over_to_the_next_endpoint(coords: Any, aio: Aio, etcd_server: EtcdServer) -> None:  # noqa: F811
    from tests.conftest import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    c = coords(endpoints=[dead, etcd_server.endpoint], timeout=1)
    assert c.endpoint == etcd_server.endpoint
    aio.run(c.put("k", b"v"))
    assert aio.run(c.get("k"))[0] == b"v"
