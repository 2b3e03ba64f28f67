"""How fast a killed worker's shard is served again.

    python bench/restart.py [--rounds 10] [--shards 2]

Starts `shardd serve`, then repeatedly kills worker 0 with SIGKILL and measures, on a
monotonic clock:

* kill → bound: until the replacement worker has bound its ipc socket (the socket file in
  the runtime directory is created anew); that is process start-up, imports and pinning;
* bound → served: until a GET through the router for a key on shard 0 answers OK; that is
  how long the router takes to find the new worker;
* kill → served: the outage a client sees (UNAVAILABLE meanwhile; other shards serve).

Each round starts a fresh daemon, so every kill is a first death (later ones within a minute
add the supervisor's crash backoff). Prints each round and the medians.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from shardd.client import Client
from shardd.errors import SharddError
from shardd.hashing import shard_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_served(client: Client, key: bytes, deadline: float) -> float:
    while time.monotonic() < deadline:
        try:
            client.get(key)
            return time.monotonic()
        except SharddError:
            time.sleep(0.0005)
    raise SystemExit("shard 0 was not served again within 30 s")


def one_round(shards: int) -> tuple[float, float, float]:
    """A fresh daemon, one SIGKILL of worker 0: (kill→bound, bound→served, kill→served) in ms.

    A fresh daemon each round, so every kill is the shard's first death: later deaths within a
    minute add the supervisor's crash backoff, which is not what this measures.
    """
    runtime = tempfile.mkdtemp(prefix="shardd-bench-")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    log_path = os.path.join(runtime, "daemon.log")
    log = open(log_path, "wb")  # noqa: SIM115 - closed when the daemon has stopped
    proc = subprocess.Popen([sys.executable, "-m", "shardd", "serve", "--bind", endpoint, "--shards",
                             str(shards), "--runtime-dir", runtime], stdout=log, stderr=subprocess.STDOUT)
    key = next(k for k in (f"r{i}".encode() for i in range(1000)) if shard_for(k, shards) == 0)
    sock_path = os.path.join(runtime, "shard-0.ipc")
    try:
        with Client(endpoint, timeout=0.05) as c:
            ready_by = time.monotonic() + 30
            while True:  # the supervisor past boot (a death during boot stops the daemon)
                with open(log_path, "rb") as f:
                    if b"supervisor: ready:" in f.read():
                        break
                if time.monotonic() > ready_by:
                    raise SystemExit("the daemon did not become ready within 30 s")
                time.sleep(0.01)
            with Client(endpoint) as admin:
                pid = next(r["pid"] for r in admin.stats()["shards"] if r["shard"] == 0)
            st = os.stat(sock_path)
            before = (st.st_ino, st.st_ctime_ns)
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            bound = None
            deadline = killed + 30
            while bound is None and time.monotonic() < deadline:
                try:
                    st = os.stat(sock_path)
                    if (st.st_ino, st.st_ctime_ns) != before:
                        bound = time.monotonic()
                except FileNotFoundError:
                    pass
                time.sleep(0.0002)
            served = wait_served(c, key, deadline)
            bound = bound or served
            return (bound - killed) * 1e3, (served - bound) * 1e3, (served - killed) * 1e3
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--shards", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for n in range(args.rounds):
        rows.append(one_round(args.shards))
        print(f"round {n + 1}: kill→bound {rows[-1][0]:6.1f} ms  bound→served {rows[-1][1]:6.1f} ms  "
              f"kill→served {rows[-1][2]:6.1f} ms", flush=True)
    cols = list(zip(*rows, strict=True))
    print(f"median of {len(rows)}: kill→bound {statistics.median(cols[0]):.1f} ms, "
          f"bound→served {statistics.median(cols[1]):.1f} ms (max {max(cols[1]):.1f}), "
          f"kill→served {statistics.median(cols[2]):.1f} ms (max {max(cols[2]):.1f})")


if __name__ == "__main__":
    main()
