"""redis-py's own test-suite, its string and keyspace command tests, against shardd's RESP endpoint.

    python bench/redis_py_suite.py                     # RESP3 (redis-py's default), 2 shards
    python bench/redis_py_suite.py --protocol 2        # RESP2
    python bench/redis_py_suite.py --tests DIR         # an unpacked redis-py source tree (has tests/)
    python bench/redis_py_suite.py --help

Not part of the pytest suite: it downloads redis-py's source distribution and runs someone
else's tests, which take minutes and whose failures are mostly by design (shardd has no lists,
hashes, ACL, MULTI, ...).

Theory of operation
-------------------
1. redis-py's sdist ships its tests/. Unless ``--tests`` names a tree, the script fetches the sdist
   of the *installed* redis-py version with ``pip download --no-binary :all: --no-deps`` into
   ``--cache`` and unpacks it there (once).
2. The suite needs pytest-asyncio and pytest-timeout; when they are not importable, a venv with
   the system's site-packages (so shardd, redis-py and hiredis are the installed ones) gets them
   in ``--cache``. Nothing is installed into the running interpreter.
3. A daemon (``python -m shardd serve --resp-bind``) starts on free loopback ports with
   ``--shards`` workers; the script waits until a redis PING is answered.
4. It collects tests/test_commands.py and tests/test_asyncio/test_commands.py with
   ``--redis-url`` pointing at the endpoint and keeps the tests whose name is ``test_<command>``
   or ``test_<command>_...`` for a string, keyspace or server command the endpoint claims
   (``COMMANDS`` below), then runs those, one pytest run, with a junit XML report.
5. It prints passed/failed/skipped counts and every failure grouped by reason (the first line of
   its error, with unknown commands grouped by command name).

redis-py's conftest reads ``cluster_enabled`` from INFO and fails the whole session when the key
is missing; shardd's INFO has no "# Cluster" section, so a tiny plugin passed with ``-p`` adds
``cluster_enabled: 0`` to what the conftest reads. The script says so when it does.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parent.parent

# Test names "test_<word>" / "test_<word>_..." for these words: the string, keyspace and server
# commands of docs/resp.md, plus redis-py's own spellings of them (getitem, delitem, get_and_set).
COMMANDS = [
    "append", "decr", "decrby", "delete", "delitem", "unlink", "exists", "expire", "expireat", "expiretime",
    "pexpire", "pexpireat", "pexpiretime", "get", "getdel", "getex", "getitem", "getset", "incr", "incrby",
    "mget", "mset", "msetnx", "psetex", "pttl", "set", "setex", "setnx", "strlen", "ttl", "type", "scan",
    "scan_iter", "persist", "touch", "dbsize", "echo", "ping", "time", "select", "info", "client_setname",
    "client_getname", "client_id", "client_setinfo", "config_get", "flushall", "flushdb", "hello",
    "case_insensitive", "response_callbacks", "command_count", "command_info", "reset", "quit",
]
SELECT = re.compile(rf"::test_(?:{'|'.join(sorted(COMMANDS, key=len, reverse=True))})(?:_|\[|$)")
FILES = ["tests/test_commands.py", "tests/test_asyncio/test_commands.py"]

PLUGIN = '''
import sys
import pytest

@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    for module in list(sys.modules.values()):
        get_info = getattr(module, "_get_info", None)
        if get_info is not None and module.__name__.endswith("conftest") and not hasattr(get_info, "_shardd"):
            def patched(url, _get_info=get_info):
                info = _get_info(url)
                info.setdefault("cluster_enabled", 0)
                return info
            patched._shardd = True
            module._get_info = patched
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch_tests(cache: Path) -> Path:
    version = importlib.metadata.version("redis")
    tree = cache / f"redis-{version}"
    if (tree / "tests" / "conftest.py").exists():
        return tree
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                    f"redis=={version}", "-d", str(cache)], check=True)
    sdist = cache / f"redis-{version}.tar.gz"
    with tarfile.open(sdist) as tar:
        tar.extractall(cache, filter="data")
    if not (tree / "tests" / "conftest.py").exists():
        sys.exit(f"redis-py {version}'s source distribution has no tests/ ({sdist})")
    return tree


def python_with_plugins(cache: Path) -> str:
    probe = subprocess.run([sys.executable, "-c", "import pytest_asyncio, pytest_timeout"], capture_output=True)
    if probe.returncode == 0:
        return sys.executable
    venv = cache / "venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "pytest-asyncio", "pytest-timeout"], check=True)
    return str(python)


class Shardd:
    def __init__(self, shards: int, workdir: Path) -> None:
        self.port = free_port()
        self.log = open(workdir / "shardd.log", "wb")  # noqa: SIM115 - held for the daemon's lifetime
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shardd", "serve", "--bind", f"tcp://127.0.0.1:{free_port()}", "--resp-bind",
             f"tcp://127.0.0.1:{self.port}", "--shards", str(shards), "--runtime-dir", str(workdir / "run")],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                sys.exit(f"shardd exited {self.proc.returncode}: see {workdir / 'shardd.log'}")
            with contextlib.suppress(redis.RedisError), redis.Redis(port=self.port, socket_timeout=5) as r:
                if r.ping():
                    return
            if time.monotonic() > deadline:
                self.stop()
                sys.exit("shardd's RESP endpoint did not answer PING within 60 s")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()


def reason_of(message: str) -> str:
    first = message.strip().splitlines()[0] if message.strip() else "(no message)"
    unknown = re.search(r"unknown command '([^']*)'", message)
    if unknown:
        return f"unknown command {unknown.group(1).upper()} (not supported by shardd)"
    subcommand = re.search(r"unknown subcommand '([^']*)'", message)
    if subcommand:
        return f"unknown subcommand {subcommand.group(1).upper()}"
    first = re.sub(r"0x[0-9a-f]+", "0x...", first)
    return first[:160]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", type=Path, help="an unpacked redis-py source tree (default: download the sdist)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "shardd-redis-py",
                        help="where the sdist and the venv go (default: %(default)s)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--protocol", choices=["2", "3"], default="", help="RESP version (default: redis-py's)")
    parser.add_argument("--show", type=int, default=12, help="test names listed per failure reason")
    args = parser.parse_args()

    tree = args.tests or fetch_tests(args.cache)
    python = python_with_plugins(args.cache)
    with tempfile.TemporaryDirectory(prefix="redis-py-suite-") as tmp:
        work = Path(tmp)
        (work / "shardd_compat.py").write_text(PLUGIN)
        server = Shardd(args.shards, work)
        try:
            url = f"redis://127.0.0.1:{server.port}/0"
            env = dict(os.environ, PYTHONPATH=f"{work}{os.pathsep}{tree}")
            base = [python, "-m", "pytest", "-p", "shardd_compat", "-o", "addopts=", "-o", "log_cli=false", "-q",
                    "-m", "not onlycluster and not redismod and not ssl", "--redis-url", url,
                    "-p", "no:cacheprovider", "--timeout", "30"]
            if args.protocol:
                base += ["--protocol", args.protocol]
            collected = subprocess.run([*base, "--collect-only", *FILES], cwd=tree, env=env, capture_output=True,
                                       text=True)
            ids = [line.strip() for line in collected.stdout.splitlines() if "::" in line]
            chosen = [i for i in ids if SELECT.search(i)]
            if not chosen:
                sys.exit(f"nothing collected:\n{collected.stdout[-3000:]}\n{collected.stderr[-3000:]}")
            print(f"redis-py {importlib.metadata.version('redis')}: {len(chosen)} of {len(ids)} tests in "
                  f"{', '.join(FILES)} are string/keyspace/server command tests; running them against shardd "
                  f"({args.shards} shards, RESP{args.protocol or ' default'})")
            print("note: INFO has no cluster_enabled field; redis-py's conftest needs it, so a plugin adds "
                  "cluster_enabled: 0")
            junit = work / "junit.xml"
            args_file = work / "ids.txt"
            args_file.write_text("\n".join(chosen))
            subprocess.run([*base, f"--junitxml={junit}", f"@{args_file}"], cwd=tree, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if not junit.exists():
                sys.exit("pytest wrote no report")
            report(junit, args.show)
        finally:
            server.stop()


def report(junit: Path, show: int) -> None:
    counts: dict[str, int] = defaultdict(int)
    failures: dict[str, list[str]] = defaultdict(list)
    skips: dict[str, int] = defaultdict(int)
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        if "test_asyncio" in case.get("classname", ""):
            name = "asyncio " + name
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                failures[reason_of(child.get("message") or child.text or "")].append(name)
            elif child.tag == "skipped":
                outcome = "skipped"
                skips[(child.get("message") or "")[:100]] += 1
        counts[outcome] += 1
    total = sum(counts.values())
    print(f"\n{total} tests: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
    if skips:
        print("\nskipped (redis-py's own conditions):")
        for message, n in sorted(skips.items(), key=lambda kv: -kv[1]):
            print(f"  {n:4d}  {message}")
    print("\nfailures by reason:")
    for reason, names in sorted(failures.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        print(f"  {len(names):4d}  {reason}")
        for name in sorted(names)[:show]:
            print(f"          {name}")
        if len(names) > show:
            print(f"          ... and {len(names) - show} more")


if __name__ == "__main__":
    main()
