"""Helpers for the RESP integration tests: a real redis-server to compare with, raw-socket
exchanges, and the router's process (the one holding the RESP listener) for RSS checks."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import Daemon, free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
SENTINEL = b"*1\r\n$4\r\nPING\r\n"


def wait_resp(port: int, timeout: float = 60.0) -> None:
    """Until the endpoint answers PING (a deadline against a hang, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(SENTINEL)
                if s.recv(64) in (b"+PONG\r\n", b"-NOAUTH Authentication required.\r\n"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no PONG on port {port} within {timeout} s")
        time.sleep(0.05)


@contextlib.contextmanager
def redis_server(tmp: Path, *extra: str) -> Iterator[int]:
    """A throwaway redis-server on a free port (no persistence); stopped and reaped on exit."""
    if not Path(REDIS_SERVER).exists():
        pytest.skip(f"redis-server not found at {REDIS_SERVER}: the comparison needs Debian's redis-server")
    port = free_port()
    log = open(tmp / f"redis-{port}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp), *extra], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_resp(port)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@contextlib.contextmanager
def resp_daemon(tmp: Path, *extra: str, shards: int = 2) -> Iterator[tuple[Daemon, int]]:
    """A shardd daemon with the RESP endpoint on (module-scoped use; make_daemon is per test)."""
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    d = Daemon(tmp, "--resp-bind", f"tcp://127.0.0.1:{port}", *extra, shards=shards)
    d.start()
    try:
        wait_resp(port)
        yield d, port
    finally:
        try:
            d.stop()
        finally:
            d.kill_all()


def exchange(port: int, data: bytes, sentinel: bool = True, timeout: float = 30.0) -> tuple[bytes, bool]:
    """Send ``data`` (then a PING unless ``sentinel`` is False) on a fresh connection; read until
    the server closes, or until the PING's reply ends the stream. Returns (replies, closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data + (SENTINEL if sentinel else b""))
        out = b""
        while True:
            try:
                chunk = s.recv(1 << 16)
            except ConnectionResetError:
                return out, True
            if not chunk:
                return out, True
            out += chunk
            if sentinel and out.endswith(b"+PONG\r\n"):
                return out, False


def router_process(d: Daemon, port: int) -> psutil.Process:
    """The daemon's process that listens on the RESP port (the router)."""
    for child in d.children():
        with contextlib.suppress(psutil.Error):
            for conn in child.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                    return child
    raise AssertionError(f"no daemon process listens on {port}")


def alive(d: Daemon) -> bool:
    """The supervisor and all its children (router and one worker per shard) are running."""
    if d.proc is None or d.proc.poll() is not None:
        return False
    kids = [k for k in d.children() if k.status() != psutil.STATUS_ZOMBIE]
    return len(kids) >= d.shards + 1


class Reader:
    """Incremental RESP2 reply reader over a blocking socket (replies as Python values;
    errors as ``("ERR", text)``)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.pos = 0

    def _line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n", self.pos)
            if end >= 0:
                line = self.buf[self.pos:end]
                self.pos = end + 2
                return line
            self._more()

    def _more(self) -> None:
        if self.pos > 1 << 20:
            self.buf = self.buf[self.pos:]
            self.pos = 0
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise EOFError("connection closed")
        self.buf += chunk

    def read(self) -> object:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return ("ERR", rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) - self.pos < n + 2:
                self._more()
            value = self.buf[self.pos:self.pos + n]
            self.pos += n + 2
            return value
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.read() for _ in range(n)]
        raise AssertionError(f"unexpected reply line {line[:80]!r}")
