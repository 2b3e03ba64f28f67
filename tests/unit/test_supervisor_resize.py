"""The supervisor's part in a resize and a reload, with an in-process fake of the router's control endpoint."""

from __future__ import annotations

import time
from typing import Any

from shardd.config import Config
from shardd.supervisor import Arbiter


class FakeControl:
    """Answers like the router's control endpoint in the middle of a resize request."""

    def __init__(self, topology: dict[str, Any]) -> None:
        self._topology = topology
        self.resize_started: list[int] = []
        self.configured: list[dict[str, Any]] = []

    def topology(self) -> dict[str, Any]:
        return self._topology

    def configure(self, settings: dict[str, Any]) -> int:
        self.configured.append(settings)
        return 1

    def resize_start(self, shards: int) -> bool:
        self.resize_started.append(shards)
        return True


def _arbiter(shards: int, pending: int) -> tuple[Arbiter, list[tuple[int, int]], FakeControl]:
    arbiter = Arbiter(Config(shards=shards, runtime_dir="/nonexistent"))
    spawned: list[tuple[int, int]] = []

    def spawn_worker(shard: int, config: Config | None = None) -> None:
        spawned.append((shard, (config or arbiter.config).shards))
        arbiter.workers[shard] = object()  # type: ignore[assignment]

    arbiter.spawn_worker = spawn_worker  # type: ignore[method-assign]
    control = FakeControl({"pending_resize": pending, "shards": shards, "resizing": None, "epoch": 1})
    arbiter.control = control  # type: ignore[assignment]
    return arbiter, spawned, control


def test_a_shard_waiting_to_restart_is_not_started_twice_by_a_resize() -> None:
    arbiter, spawned, control = _arbiter(shards=3, pending=4)
    arbiter.workers = {0: object(), 2: object()}  # type: ignore[dict-item]
    arbiter.restart_at = {1: time.monotonic() + 1.0}  # died; its restart is backing off
    arbiter.handle_sigusr1()
    # Only shard 3 is new; shard 1 comes back through its own restart, shard 2 is running.
    assert [shard for shard, _ in spawned] == [3]
    assert control.resize_started == [4]
    assert arbiter.config.shards == 4


def test_workers_started_for_a_resize_join_the_current_layout() -> None:
    arbiter, spawned, _ = _arbiter(shards=2, pending=4)
    arbiter.workers = {0: object(), 1: object()}  # type: ignore[dict-item]
    arbiter.handle_sigusr1()
    # They own nothing until the router's migrate: started with today's shard count, not 4.
    assert spawned == [(2, 2), (3, 2)]


def test_a_reload_applies_live_settings_and_only_logs_restart_only_ones(caplog) -> None:
    # direct decides whether workers bind an endpoint when they start: no reload can change it.
    running = Config(shards=2, runtime_dir="/nonexistent")
    arbiter = Arbiter(running, reload_config=lambda: Config(shards=2, runtime_dir="/nonexistent", direct=False,
                                                            mailbox_limit=77))
    control = FakeControl({})
    arbiter.control = control  # type: ignore[assignment]
    with caplog.at_level("INFO"):
        arbiter.reload()
    assert control.configured == [{"mailbox_limit": 77}]
    assert "direct changed but only take effect after a restart" in caplog.text
    assert arbiter.raw_config.direct is True and arbiter.raw_config.mailbox_limit == 77
