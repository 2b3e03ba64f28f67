"""Small helpers shared by tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping

from shardd.hashing import shard_for


def keys_on_shard(shard: int, shards: int, n: int, prefix: str = "k") -> list[bytes]:
    """The first ``n`` keys ``{prefix}{i}`` that ``shard_for`` places on ``shard``."""
    out, i = [], 0
    while len(out) < n:
        key = f"{prefix}{i}".encode()
        if shard_for(key, shards) == shard:
            out.append(key)
        i += 1
    return out


def wait_until(condition, timeout: float = 60.0, interval: float = 0.01, what: str = "the condition"):
    """Poll ``condition()`` until it returns something truthy, and return that.

    The timeout is only a deadline against a hang (generous: CI machines are busy), never a
    bound the test asserts on.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout} s")
        time.sleep(interval)


# nanosleep and clock_nanosleep (what time.sleep calls) by architecture.
_SLEEP_SYSCALLS = {"x86_64": {35, 230}, "aarch64": {101, 115}}


def scrape_metrics(port: int) -> str:
    """The text of the daemon's /metrics on ``port``, waiting for the endpoint to come up (deadline
    against a hang only)."""
    import time
    import urllib.request

    deadline = time.monotonic() + 60
    while True:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def wait_until_sleeping(pid: int, timeout: float = 60.0) -> None:
    """Wait until process ``pid``'s main thread is inside a sleep (e.g. a debug_sleep op), from
    /proc/PID/syscall or /proc/PID/wchan: the readiness a test needs before queueing requests
    behind it, instead of sleeping and hoping the process got there."""
    import os

    numbers = _SLEEP_SYSCALLS.get(os.uname().machine, set())

    def sleeping() -> bool:
        with open(f"/proc/{pid}/wchan") as f:
            if "nanosleep" in f.read():
                return True
        with open(f"/proc/{pid}/syscall") as f:
            fields = f.read().split()
        return bool(fields) and fields[0].isdigit() and int(fields[0]) in numbers

    wait_until(sleeping, timeout, interval=0.002, what=f"process {pid} sleeping")


def assert_one_message(err: str, *phrases: str) -> None:
    """A command's error as users see it: one message on stderr, starting with "shardd", wrapped to
    at most 3 lines of 80 columns (continuation lines indented), containing each of ``phrases``."""
    assert "Traceback" not in err, err
    lines = err.rstrip("\n").splitlines()
    assert 1 <= len(lines) <= 3, err
    assert all(len(line) <= 80 for line in lines), err
    assert lines[0].startswith("shardd"), err
    assert all(line.startswith("  ") for line in lines[1:]), err
    text = " ".join(line.strip() for line in lines)
    for phrase in phrases:
        assert phrase in text, (phrase, err)


def run_cli(endpoint: str | None, *args: str, input: str | bytes | None = None, text: bool = True,
            env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    """``shardd ARGS`` as a user runs it: a new interpreter, the real entry point (``python -m
    shardd``), output captured. ``endpoint`` goes in $SHARDD_ENDPOINT (None: the environment's);
    ``env`` is the whole environment (default: this process's). Standard input is ``input``, or
    empty, so no command can wait on a terminal. ``timeout`` is a deadline against a hang."""
    environ = dict(os.environ if env is None else env)
    if endpoint is not None:
        environ["SHARDD_ENDPOINT"] = endpoint
    return subprocess.run([sys.executable, "-m", "shardd", *args], capture_output=True, text=text, timeout=timeout,
                          env=environ, cwd=cwd, input=input, stdin=subprocess.DEVNULL if input is None else None)
