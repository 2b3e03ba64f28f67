"""The supervisor's reconcile step, resize phases and reload, with in-process fakes: a fake child
process class, a fake control endpoint and a hand-moved clock. No process, socket or sleep."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from shardd.config import Config
from shardd.errors import ExitCode
from shardd.supervisor import _BACKOFF, _CRASH_LIMIT, Arbiter

_PIDS = itertools.count(1000)


class FakeChild:
    """Stands in for shardd.process.Child: records what it was started with; a test ends it."""

    def __init__(self, name: str, target: Any, args: tuple[Any, ...], shard: int | None = None) -> None:
        self.name, self.target, self.args, self.shard = name, target, args, shard
        self.ready = False
        self.alive = False
        self.exitcode: int | None = None
        self.terminated = False
        self.pid = next(_PIDS)

    def start(self) -> None:
        self.alive = True

    def is_alive(self) -> bool:
        return self.alive

    def exit(self, code: int) -> None:
        self.alive, self.exitcode = False, code

    def terminate(self) -> None:
        self.terminated = True
        self.exit(-15)

    def kill(self) -> None:
        self.exit(-9)

    def join(self, timeout: float | None = None) -> None:
        pass


class FakeControl:
    """Answers like the router's control endpoint."""

    def __init__(self, topology: dict[str, Any] | None = None, arbiter: Arbiter | None = None) -> None:
        self.topology_reply = topology or {}
        self.arbiter = arbiter
        self.resize_started: list[int] = []
        self.configured: list[dict[str, Any]] = []

    def topology(self) -> dict[str, Any]:
        return self.topology_reply

    def stats(self) -> dict[str, Any]:
        """Every running worker is up (the router has connected to it)."""
        assert self.arbiter is not None
        return {"shards": [{"shard": shard, "status": "up", "pid": child.pid, "keys": 0}
                           for shard, child in sorted(self.arbiter.workers.items())]}

    def configure(self, settings: dict[str, Any]) -> int:
        self.configured.append(settings)
        return 1

    def resize_start(self, shards: int) -> bool:
        self.resize_started.append(shards)
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _arbiter(shards: int) -> tuple[Arbiter, list[FakeChild], Clock]:
    """A serving arbiter: ``shards`` workers and a router running, all ready."""
    clock = Clock()
    started: list[FakeChild] = []

    def process(*args: Any) -> FakeChild:
        child = FakeChild(*args)
        started.append(child)
        return child

    arbiter = Arbiter(Config(shards=shards, runtime_dir="/nonexistent", stop_timeout=1.0),
                      process=process, clock=clock)  # type: ignore[arg-type]
    assert arbiter.manage_workers() is None
    arbiter.spawn_router()
    for child in started:
        child.ready = True
    arbiter.ready = True
    arbiter.control = FakeControl(arbiter=arbiter)
    return arbiter, started, clock


def _topology(shards: int, pending: int | None = None, resizing: int | None = None) -> dict[str, Any]:
    return {"shards": shards, "pending_resize": pending, "epoch": 1,
            "resizing": None if resizing is None else {"to": resizing, "epoch": 2, "moving": True}}


def _worker_shards(started: list[FakeChild]) -> list[int | None]:
    return [child.shard for child in started if child.name.startswith("shardd-worker")]


def test_boot_starts_one_worker_per_shard_then_the_router() -> None:
    arbiter, started, _ = _arbiter(shards=3)
    assert [child.name for child in started] == ["shardd-worker-0", "shardd-worker-1", "shardd-worker-2",
                                                 "shardd-router"]
    assert all(child.args[0].shards == 3 for child in started)
    assert arbiter.manage_workers() is None and len(started) == 4  # reconciled: nothing more to do


def test_a_crashed_worker_restarts_at_once_then_backs_off(caplog) -> None:
    arbiter, started, clock = _arbiter(shards=2)
    arbiter.workers[1].exit(-9)
    with caplog.at_level("WARNING"):
        assert arbiter.manage_workers() is None
    assert _worker_shards(started) == [0, 1, 1]  # first death: restarted in the same step
    assert "worker 1 exited before it was ready" not in caplog.text  # it had served
    arbiter.workers[1].exit(-9)
    assert arbiter.manage_workers() is None
    assert _worker_shards(started) == [0, 1, 1]  # second death: waits out the backoff
    assert arbiter.restart_at == {1: clock.now + _BACKOFF[1]}
    clock.now += _BACKOFF[1] / 2
    arbiter.manage_workers()
    assert _worker_shards(started) == [0, 1, 1]
    clock.now += _BACKOFF[1]
    arbiter.manage_workers()
    assert _worker_shards(started) == [0, 1, 1, 1] and arbiter.restart_at == {}


def test_a_crash_loop_stops_the_daemon_with_one_line(caplog) -> None:
    arbiter, _, clock = _arbiter(shards=2)
    with caplog.at_level("ERROR"):
        for death in range(1, _CRASH_LIMIT + 1):
            clock.now = max([clock.now, *arbiter.restart_at.values()])
            assert arbiter.manage_workers() is None  # restarts the shard once its backoff is over
            arbiter.workers[0].exit(-9)  # killed: a crash, whether or not it was seen serving
            code = arbiter.manage_workers()
            assert code == (ExitCode.CHILD_FAILED if death == _CRASH_LIMIT else None)
    assert [r.message for r in caplog.records if r.levelname == "ERROR"] == [
        f"worker 0 died {_CRASH_LIMIT} times in 60 s (last exit code -9); crash loop, stopping"]


def test_deaths_outside_the_window_do_not_add_up() -> None:
    arbiter, _, clock = _arbiter(shards=1)
    for _ in range(_CRASH_LIMIT * 2):
        arbiter.workers[0].exit(-9)
        assert arbiter.manage_workers() is None
        clock.now += 61.0
        arbiter.manage_workers()


def test_a_restarted_worker_that_cannot_start_stops_the_daemon(caplog) -> None:
    """E.g. its ipc path became unusable: retrying would fail the same way, forever."""
    arbiter, started, _ = _arbiter(shards=2)
    arbiter.workers[1].exit(-9)
    arbiter.manage_workers()
    arbiter.workers[1].exit(ExitCode.BOOT_FAILED)
    with caplog.at_level("ERROR"):
        assert arbiter.manage_workers() == ExitCode.BOOT_FAILED
    assert len(_worker_shards(started)) == 3  # not retried
    assert [r.message for r in caplog.records if r.levelname == "ERROR"] == [
        "worker 1 could not start (exit code 3; its reason is logged above); stopping, "
        "as a restart would fail the same way"]


@pytest.mark.parametrize("exitcode", [1, ExitCode.BOOT_FAILED])
def test_a_restarted_worker_that_ends_itself_before_it_served_stops_the_daemon(exitcode: int) -> None:
    """E.g. an exception while it binds: not retried five times with a traceback each."""
    arbiter, _, _ = _arbiter(shards=2)
    arbiter.workers[0].exit(-9)
    arbiter.manage_workers()
    arbiter.workers[0].exit(exitcode)
    assert arbiter.manage_workers() == ExitCode.BOOT_FAILED


def test_a_restarted_worker_seen_serving_is_restarted_after_any_crash(monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    arbiter, started, _ = _arbiter(shards=2)
    arbiter.workers[0].exit(-9)
    arbiter.manage_workers()
    assert not arbiter.workers[0].ready
    arbiter.check_health()  # the router has it up
    assert arbiter.workers[0].ready
    arbiter.workers[0].exit(1)
    assert arbiter.manage_workers() is None
    assert 0 in arbiter.restart_at and len(started) == 4


def test_the_router_dying_stops_the_daemon() -> None:
    arbiter, _, _ = _arbiter(shards=2)
    arbiter.router.exit(-9)  # type: ignore[union-attr]
    assert arbiter.manage_workers() == ExitCode.CHILD_FAILED


def test_resize_grow_starts_the_new_shards_in_the_current_layout_then_keeps_them() -> None:
    arbiter, started, _ = _arbiter(shards=2)
    arbiter.control.topology_reply = _topology(2, pending=4)
    assert arbiter.handle_sigusr1() is None
    new = [child for child in started if child.shard in (2, 3)]
    # They own nothing until the router's migrate: started with today's shard count, not 4.
    assert [(child.shard, child.args[0].shards) for child in new] == [(2, 2), (3, 2)]
    assert arbiter.control.resize_started == [4]
    arbiter.control.topology_reply = _topology(2, resizing=4)  # keys moving: nothing to do
    assert arbiter.handle_sigusr1() is None and len(started) == 5
    arbiter.control.topology_reply = _topology(4)  # done
    assert arbiter.handle_sigusr1() is None
    assert sorted(arbiter.workers) == [0, 1, 2, 3] and arbiter.config.shards == 4 and arbiter.target is None
    assert not any(child.terminated for child in started)


def test_resize_shrink_stops_the_removed_shards_only_when_it_is_done() -> None:
    arbiter, started, _ = _arbiter(shards=4)
    arbiter.control.topology_reply = _topology(4, pending=2)
    arbiter.handle_sigusr1()
    assert arbiter.control.resize_started == [2] and len(started) == 5  # no new worker
    assert sorted(arbiter.workers) == [0, 1, 2, 3]  # shards 2 and 3 still hand over their keys
    arbiter.control.topology_reply = _topology(2)
    arbiter.handle_sigusr1()
    assert sorted(arbiter.workers) == [0, 1] and arbiter.config.shards == 2
    assert [child.shard for child in started if child.terminated] == [2, 3]


def test_a_shard_waiting_to_restart_is_not_started_twice_by_a_resize() -> None:
    arbiter, started, clock = _arbiter(shards=3)
    arbiter.workers[1].exit(-9)
    arbiter.manage_workers()
    arbiter.workers[1].exit(-9)
    arbiter.manage_workers()
    assert 1 in arbiter.restart_at  # died twice: its restart is backing off
    before = len(started)
    arbiter.control.topology_reply = _topology(3, pending=4)
    arbiter.handle_sigusr1()
    # Only shard 3 is new; shard 1 comes back through its own restart, shard 2 is running.
    assert _worker_shards(started[before:]) == [3]
    assert arbiter.control.resize_started == [4] and list(arbiter.wanted()) == [0, 1, 2, 3]
    clock.now = arbiter.restart_at[1]
    arbiter.manage_workers()
    assert _worker_shards(started[before:]) == [3, 1]


def test_a_removed_shard_waiting_to_restart_is_forgotten() -> None:
    arbiter, _, _ = _arbiter(shards=3)
    arbiter.control.topology_reply = _topology(3, pending=2)
    arbiter.handle_sigusr1()
    for _ in range(2):
        arbiter.workers[2].exit(-9)
        arbiter.manage_workers()
    assert 2 in arbiter.restart_at
    arbiter.control.topology_reply = _topology(2)
    arbiter.handle_sigusr1()
    assert arbiter.restart_at == {} and sorted(arbiter.workers) == [0, 1]


@pytest.mark.parametrize("exitcode", [0, -15])
def test_a_removed_shards_worker_that_exits_is_not_restarted(exitcode: int) -> None:
    arbiter, started, _ = _arbiter(shards=2)
    arbiter.workers[1].exit(exitcode)
    arbiter.control.topology_reply = _topology(1)
    assert arbiter.handle_sigusr1() is None
    assert sorted(arbiter.workers) == [0] and arbiter.restart_at == {} and len(started) == 3


def test_a_reload_applies_live_settings_and_only_logs_restart_only_ones(caplog) -> None:
    # direct decides whether workers bind an endpoint when they start: no reload can change it.
    running = Config(shards=2, runtime_dir="/nonexistent")
    arbiter = Arbiter(running, reload_config=lambda: Config(shards=2, runtime_dir="/nonexistent", direct=False,
                                                            mailbox_limit=77))
    control = FakeControl()
    arbiter.control = control
    with caplog.at_level("INFO"):
        arbiter.reload()
    assert control.configured == [{"mailbox_limit": 77}]
    assert "direct changed but only take effect after a restart" in caplog.text
    assert arbiter.raw_config.direct is True and arbiter.raw_config.mailbox_limit == 77
