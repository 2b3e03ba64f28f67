"""A real etcd for tests and bench scripts: one member on free loopback ports in a temp data dir.

In pytest, use the ``etcd_server`` fixture (function scope: every test gets a fresh store, so
no test sees another's keys or leases). Outside pytest (bench scripts)::

    from tests.etcd_server import running_etcd
    with running_etcd() as etcd:        # started and ready (EtcdError if it cannot be)
        run(etcd.endpoint)              # "http://127.0.0.1:P"; etcd.kill(), .restart(), …

Readiness is etcd's own ``GET /health`` answering ``"health": "true"`` (a leader exists and the
store serves), polled; never a bare sleep. Every timeout is a deadline against a hang, generous
because CI machines are busy. Whatever goes wrong, nothing is left running: a start that fails
kills what it started, stop() falls back to SIGKILL, an atexit hook kills a server its owner
forgot, and the kernel SIGKILLs etcd if the process that started it dies (PR_SET_PDEATHSIG).

Without an etcd binary the fixture skips with the reason, unless ``SHARDD_REQUIRE_ETCD=1`` (CI
sets it: there a missing etcd is a broken set-up, not a reason to skip).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:  # the module also serves bench scripts, which need not have pytest
    import pytest
except ImportError:  # pragma: no cover - only outside the test environment
    pytest = None  # type: ignore[assignment]

__all__ = ["EtcdError", "EtcdServer", "etcd_binary", "etcd_server", "require_etcd", "running_etcd"]

_PR_SET_PDEATHSIG = 1
try:  # resolved before any fork: the child only calls it
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _prctl = None


def _die_with_parent() -> None:
    """preexec_fn: the kernel SIGKILLs etcd if the thread that started it dies, even by SIGKILL."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def etcd_binary() -> str | None:
    """The etcd server binary on PATH (Debian's etcd-server installs /usr/bin/etcd), or None."""
    return shutil.which("etcd")


class EtcdError(RuntimeError):
    """etcd did not start, or did not stop."""


class EtcdServer:
    """One etcd member: ``start()``, ``stop()`` (SIGTERM), ``kill()`` (SIGKILL), ``restart()``.

    ``data_dir`` None: a temp dir, removed by ``close()``. The ports are picked once and kept
    across restarts: the member's peer URL is recorded in its data dir, and clients reconnect
    to the same client URL.
    """

    def __init__(self, data_dir: str | os.PathLike[str] | None = None, name: str = "n",
                 binary: str | None = None) -> None:
        binary = binary or etcd_binary()
        if binary is None:
            raise EtcdError("etcd is not installed (apt-get install etcd-server)")
        self.binary = binary
        self.name = name
        self._own_dir = data_dir is None
        self.base = Path(tempfile.mkdtemp(prefix="shardd-etcd-")) if data_dir is None else Path(data_dir)
        self.data_dir = self.base / "data"
        self.log_path = self.base / "etcd.log"
        self.client_port = 0
        self.peer_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def endpoint(self) -> str:
        """The client URL, as shardd.coord.Coordinator takes it."""
        if not self.client_port:
            raise EtcdError("etcd was never started: no endpoint yet")
        return f"http://127.0.0.1:{self.client_port}"

    def argv(self) -> list[str]:
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [self.binary, "--name", self.name, "--data-dir", str(self.data_dir),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"{self.name}={peer}"]

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60.0) -> EtcdServer:
        """Start etcd and return once it serves. A first start picks free ports, and picks again
        if another process took one in between (the only way it can fail at random)."""
        if self.running():
            raise EtcdError("etcd is already running")
        fresh = not self.client_port
        for attempt in range(3 if fresh else 1):
            if fresh:
                self.client_port, self.peer_port = _free_port(), _free_port()
            try:
                self._spawn(timeout)
                return self
            except EtcdError:
                if not (fresh and "address already in use" in self.log() and attempt < 2):
                    raise
                shutil.rmtree(self.data_dir, ignore_errors=True)  # a member half-made on the lost port
        raise AssertionError("unreachable")

    def _spawn(self, timeout: float) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - held for the process's lifetime
        # PDEATHSIG is tied to the thread that forks: only safe from the main thread (a worker
        # thread that exits, e.g. an executor's at asyncio.run's end, would kill etcd with it).
        on_main = threading.current_thread() is threading.main_thread()
        argv, preexec = self.argv(), None
        if on_main:
            # util-linux's setpriv sets PDEATHSIG and execs etcd, so no Python runs in the forked
            # child: this process may hold gRPC threads (aetcd), and a Python preexec_fn after
            # fork then aborts in gRPC's poller (seen: etcd "exited -6 while starting").
            setpriv = shutil.which("setpriv")
            if setpriv is not None:
                argv = [setpriv, "--pdeathsig", "KILL", *argv]
            else:
                preexec = _die_with_parent
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=preexec)
        atexit.register(self._reap)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self._reap()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"{self.endpoint}/health"
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise EtcdError(f"etcd exited {self.proc.returncode} while starting:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as reply:
                    if json.loads(reply.read()).get("health") == "true":
                        return
            except (OSError, ValueError):  # refused, reset, not ready (503), half-written JSON
                pass
            if time.monotonic() > deadline:
                raise EtcdError(f"etcd not healthy within {timeout} s:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit code (None if
        it was not running)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._reap()
                raise EtcdError(f"etcd did not stop within {timeout} s on SIGTERM:\n{self.log()[-3000:]}") from None
        return self._reap()

    def kill(self) -> None:
        """SIGKILL: etcd dies with no chance to close connections gracefully."""
        self._reap()

    def restart(self, timeout: float = 60.0) -> EtcdServer:
        """Stop (SIGTERM) if running, then start again on the same ports and data dir."""
        self.stop()
        return self.start(timeout)

    def _reap(self) -> int | None:
        """Kill (if still running) and wait: after this no process of ours is left."""
        atexit.unregister(self._reap)
        proc, self.proc = self.proc, None
        code = None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            code = proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def close(self) -> None:
        """Stop etcd and remove its directory if this object made it."""
        try:
            self.stop()
        finally:
            self._reap()
            if self._own_dir:
                shutil.rmtree(self.base, ignore_errors=True)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> EtcdServer:
        if not self.running():
            try:
                self.start()
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def running_etcd(data_dir: str | os.PathLike[str] | None = None) -> Iterator[EtcdServer]:
    """A started etcd for a script (no pytest needed); stopped, and its temp dir removed, after."""
    with EtcdServer(data_dir) as server:
        yield server


def require_etcd() -> str:
    """The etcd binary, or skip the calling test (fail under SHARDD_REQUIRE_ETCD=1, as CI sets)."""
    binary = etcd_binary()
    if binary is None:
        reason = "etcd is not installed (apt-get install etcd-server); cluster tests need a real etcd"
        if os.environ.get("SHARDD_REQUIRE_ETCD") == "1":
            pytest.fail(f"{reason}, and SHARDD_REQUIRE_ETCD=1")
        print(f"skipping: {reason}")
        pytest.skip(reason)
    return binary


if pytest is not None:

    @pytest.fixture
    def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
        """A fresh, started etcd member for one test; stopped (and killed if need be) after it."""
        server = EtcdServer(tmp_path / "etcd", binary=require_etcd())
        try:
            server.start()
            yield server
        finally:
            server.close()
