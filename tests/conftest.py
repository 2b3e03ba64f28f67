"""Shared fixtures: a real shardd daemon started as a subprocess on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ["tests.etcd_server"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """One `shardd serve` process tree. Waits on readiness (ping), never on a bare sleep.

    Every timeout here is a deadline against a hang, generous because CI machines are busy;
    no test asserts that something took less than so long.
    """

    def __init__(self, tmp: Path, *args: str, shards: int = 2, config: str | None = None) -> None:
        self.tmp = tmp
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.runtime_dir = tmp / "run"
        self.log_path = tmp / "shardd.log"
        self.argv = [sys.executable, "-m", "shardd", "serve", "--bind", self.endpoint,
                     "--shards", str(shards), "--runtime-dir", str(self.runtime_dir), *args]
        if config:
            self.argv += ["--config", config]
        self.proc: subprocess.Popen | None = None
        self.shards = shards
        # With authentication on, readiness is checked with the admin key.
        self.curve = None
        if "--auth-dir" in args:
            from shardd import load_curve

            self.curve = load_curve(args[args.index("--auth-dir") + 1], "admin")

    def start(self, wait: bool = True) -> Daemon:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - held for the daemon's lifetime
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        from shardd.client import Client
        from shardd.errors import SharddError

        deadline = time.monotonic() + timeout
        with Client(self.endpoint, timeout=0.5, curve=self.curve) as client:
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
                if "ready:" in self.log():
                    try:
                        if client.ping() == self.shards:
                            return
                    except SharddError:
                        pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"daemon not ready in {timeout}s:\n{self.log()}")
                time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged in {timeout}s:\n{self.log()}")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the supervisor, wait for it, and return its exit code; kill on timeout."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        kids = self.children()
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for p in [self.proc, *kids]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
            self.proc.wait(5)
            raise AssertionError(f"daemon did not stop within {timeout}s:\n{self.log()}") from None
        psutil.wait_procs(kids, timeout=5)
        self.leftover = [k for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
        self._log.close()
        return code

    def kill_all(self) -> None:
        """SIGKILL the whole tree. The supervisor is stopped first, so it cannot have the forkserver
        make a replacement for a child killed here (one made after a snapshot of the tree was left
        running, an orphan, before this); then its children until none is left, then itself."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            supervisor = psutil.Process(self.proc.pid)
            with contextlib.suppress(psutil.NoSuchProcess):
                supervisor.suspend()
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    kids = [k for k in supervisor.children(recursive=True) if _alive(k)]
                    if not kids:
                        break
                    for kid in kids:
                        with contextlib.suppress(psutil.NoSuchProcess):
                            kid.kill()
                    psutil.wait_procs(kids, timeout=2)
                supervisor.kill()
        self.proc.wait(5)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE  # (a stopped supervisor reaps nothing)
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator:
    """Factory: make_daemon(*extra_args, shards=2) -> started Daemon; all are stopped at teardown."""
    started: list[Daemon] = []

    def make(*args: str, shards: int = 2, config: str | None = None, wait: bool = True) -> Daemon:
        d = Daemon(tmp_path / f"d{len(started)}", *args, shards=shards, config=config)
        d.tmp.mkdir()
        started.append(d)
        return d.start(wait=wait)

    yield make
    for d in started:
        try:
            d.stop()
        finally:
            d.kill_all()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon shared by a module's tests (2 shards, debug ops on); tests flush what they need."""
    d = Daemon(tmp_path_factory.mktemp("daemon"), "--enable-debug-ops", shards=2)
    d.start()
    yield d
    try:
        code = d.stop()
        assert code == 0, d.log()
    finally:
        d.kill_all()
