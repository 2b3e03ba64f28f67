"""One child process of the supervisor, router or worker, as an object (uvicorn's ``Process``).

Owns: starting a role's entry function in a fresh ``spawn`` interpreter, and the verbs the
supervisor uses on it (``start``, ``is_alive``, ``terminate``, ``kill``, ``join``) with what
it reads back (``pid``, ``exitcode``, ``sentinel``, ``ready``); and the reaping of the helper
process the ``spawn`` start method leaves behind.

Invariants:
1. The child is handed only what ``spawn`` pickles: the entry function (by reference) and its
   arguments (a Config and a shard id). It builds everything else itself (DESIGN decision 3).
2. The entry function's return value is the child's exit code, so a worker that cannot start
   exits ``ExitCode.BOOT_FAILED`` and the supervisor can tell that from a crash.
3. ``ready`` is False until the supervisor has seen the child serve (the router answered for
   it); only the supervisor sets it.

This module imports nothing of shardd, so a child started here imports no more than its role.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.resource_tracker
import sys
from collections.abc import Callable
from typing import Any

# Children start in a fresh interpreter (DESIGN decision 3): nothing of ours is inherited.
_SPAWN = multiprocessing.get_context("spawn")


def _child_main(target: Callable[..., int | None], *args: Any) -> None:
    """Run in the child: the role's entry function; its return value becomes the exit code."""
    sys.exit(target(*args) or 0)


class Child:
    """A router or worker process. ``shard`` is None for the router."""

    def __init__(self, name: str, target: Callable[..., int | None], args: tuple[Any, ...],
                 shard: int | None = None) -> None:
        self.name = name
        self.shard = shard
        self.ready = False
        self._process = _SPAWN.Process(target=_child_main, args=(target, *args), name=name)

    def start(self) -> None:
        self._process.start()

    def is_alive(self) -> bool:
        return self._process.is_alive()

    def terminate(self) -> None:
        self._process.terminate()

    def kill(self) -> None:
        self._process.kill()

    def join(self, timeout: float | None = None) -> None:
        self._process.join(timeout)

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def exitcode(self) -> int | None:
        return self._process.exitcode

    @property
    def sentinel(self) -> int:
        """A fd that becomes readable when the child exits (for ``multiprocessing.connection.wait``)."""
        return self._process.sentinel


def stop_resource_tracker() -> None:
    """Reap the helper process the ``spawn`` start method starts, so none outlives us.

    Left alone it notices our exit only a second or so later; under systemd that is a
    process still in the unit's cgroup after the main one exited.
    """
    tracker = multiprocessing.resource_tracker._resource_tracker
    stop = getattr(tracker, "_stop", None)
    if stop is not None:
        with contextlib.suppress(Exception):
            stop()
