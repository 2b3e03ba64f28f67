"""sd_notify against a real AF_UNIX datagram socket given as NOTIFY_SOCKET, as systemd does."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from tests.conftest import Daemon


class NotifySocket:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def wait_for(self, predicate, timeout: float = 30.0) -> str:
        """Receive datagrams until one satisfies ``predicate``; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.messages.append(msg)
            if predicate(msg):
                return msg
        raise AssertionError(f"no matching notification in {timeout}s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notified_daemon(tmp_path, monkeypatch):
    """A daemon whose NOTIFY_SOCKET is ours, with a 1 s watchdog (pings every 0.5 s)."""
    ns = NotifySocket(str(tmp_path / "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    (tmp_path / "d").mkdir()
    d = Daemon(tmp_path / "d", shards=2)
    # WATCHDOG_PID must be the supervisor's own pid, which we only know after the start;
    # leaving it unset means "whoever reads it", which is the supervisor.
    d.start()
    yield d, ns
    try:
        d.stop()
    finally:
        d.kill_all()
        ns.close()


def test_ready_status_watchdog_stopping(notified_daemon):
    d, ns = notified_daemon
    ready = ns.wait_for(lambda m: "READY=1" in m)
    assert f"MAINPID={d.proc.pid}" in ready
    ns.wait_for(lambda m: "STATUS=serving 2 shards" in m and "WATCHDOG=1" in m)
    # keep pinging: at least two more watchdog pings (every 0.5 s; the deadline is against a hang)
    ns.wait_for(lambda m: "WATCHDOG=1" in m)
    ns.wait_for(lambda m: "WATCHDOG=1" in m)
    d.proc.send_signal(signal.SIGHUP)
    ns.wait_for(lambda m: "RELOADING=1" in m and "MONOTONIC_USEC=" in m)
    ns.wait_for(lambda m: "READY=1" in m)
    assert d.stop() == 0
    ns.wait_for(lambda m: "STOPPING=1" in m)


def test_no_watchdog_while_a_worker_hangs(notified_daemon):
    d, ns = notified_daemon
    ns.wait_for(lambda m: "WATCHDOG=1" in m)
    from shardd.client import Client

    with Client(d.endpoint) as c:
        victim = c.stats()["shards"][1]["pid"]
    os.kill(victim, signal.SIGSTOP)  # hung, not dead: only the health check can notice
    try:
        ns.wait_for(lambda m: "STATUS=degraded" in m)
        ns.messages.clear()
        # For 2 s (four watchdog periods) no WATCHDOG=1 may be sent.
        with pytest.raises(AssertionError):
            ns.wait_for(lambda m: "WATCHDOG=1" in m, timeout=2)
    finally:
        os.kill(victim, signal.SIGCONT)
    ns.wait_for(lambda m: "WATCHDOG=1" in m)


def test_notify_is_a_no_op_without_notify_socket(monkeypatch):
    from shardd import systemd

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert systemd.watchdog_interval() is None  # another process's watchdog
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 2.0
