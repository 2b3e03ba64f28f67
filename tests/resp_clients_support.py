"""Shared pieces of the client-level RESP tests (test_resp_clients, test_resp_django): a daemon with
the endpoint, a real ``redis-server`` to compare against, and a raw RESP connection that returns a reply's exact bytes.

Readiness is always polled (a PING through a real connection), never slept for; every timeout is
a deadline against a hang, generous because CI machines are busy.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path

import hiredis
import redis

from shardd import protocol
from tests.conftest import Daemon, free_port

# The commands that need the native ops of branch native-ops (SetGet, ExpireIf, GetEx, Strlen,
# SetManyNx, Scan); until they are in shardd.protocol those commands answer "-ERR internal error".
NATIVE_OPS = ("SetGet", "ExpireIf", "GetEx", "Strlen", "SetManyNx", "Scan")
MISSING_OPS = [name for name in NATIVE_OPS if not hasattr(protocol, name)]
NEEDS_OPS_REASON = f"needs native ops not yet in shardd.protocol (branch native-ops): {', '.join(MISSING_OPS)}"


def wait_resp(port: int, password: str | None = None, username: str | None = None, timeout: float = 60.0,
              proc: subprocess.Popen | None = None) -> None:
    """Poll until a redis PING on ``port`` succeeds."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode} before answering PING")
        try:
            with redis.Redis(port=port, password=password, username=username, socket_timeout=5,
                             socket_connect_timeout=5) as r:
                if r.ping():
                    return
        except redis.RedisError as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"no PING answer on port {port} within {timeout}s: {last!r}")


def start_resp_daemon(tmp: Path, *args: str, shards: int = 2, config_text: str | None = None) -> tuple[Daemon, int]:
    """A started ``shardd serve`` with its RESP endpoint on a free loopback port (``--resp-bind``, or
    ``resp_bind`` in a TOML config when ``config_text`` is given, which must not set it)."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    bind = f"tcp://127.0.0.1:{port}"
    config = None
    if config_text is not None:
        config = str(tmp / "shardd.toml")
        Path(config).write_text(f'resp_bind = "{bind}"\n{config_text}')
    else:
        args = ("--resp-bind", bind, *args)
    d = Daemon(tmp, *args, shards=shards, config=config)
    d.start()
    return d, port


def stop_daemon(d: Daemon) -> None:
    try:
        code = d.stop()
        assert code == 0, d.log()
        assert not d.leftover, d.leftover
    finally:
        d.kill_all()


class RedisServer:
    """A real redis-server on a free loopback port, no persistence; stopped by ``stop``."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = tmp / "redis.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - held for the server's lifetime
        self.proc = subprocess.Popen(
            [redis_server_path(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no", "--daemonize", "no", "--dir", str(tmp), *extra],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_resp(self.port, proc=self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def redis_server_path() -> str | None:
    return shutil.which("redis-server")


def encode_command(*args: bytes | str | int) -> bytes:
    parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in parts)


class RawConn:
    """One TCP connection that sends a command and returns its reply's exact bytes."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)

    def call(self, *args: bytes | str | int) -> bytes:
        self.sock.sendall(encode_command(*args))
        return self.read_reply()

    def read_reply(self) -> bytes:
        reader = hiredis.Reader()
        data = b""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed after {data!r}")
            data += chunk
            reader.feed(chunk)
            if reader.gets() is not False:
                assert reader.gets() is False, f"more than one reply: {data!r}"
                return data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
