"""Save and load time of a warm restart: N keys, snapshot on SIGTERM, reload on start.

    python bench/warm_restart.py --keys 1000000 --value-size 100 [--shards-after 3]

Starts `shardd serve` with a temporary state directory, loads the keys with set_many,
stops it with SIGTERM (drain + snapshot), starts it again (optionally with another shard
count) and prints the snapshot and load figures the daemon logged, the time from start to
ready, and a spot check that the keys came back.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

from shardd.client import Client
from shardd.errors import SharddError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(state: str, shards: int, log_path: str) -> tuple[subprocess.Popen, str, float]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    log = open(log_path, "ab")  # noqa: SIM115 - closed when the process is reaped
    proc = subprocess.Popen([sys.executable, "-m", "shardd", "serve", "--bind", endpoint, "--shards", str(shards),
                             "--state-dir", state], stdout=log, stderr=subprocess.STDOUT)
    with Client(endpoint, timeout=0.5) as c:
        while True:
            if proc.poll() is not None:
                with open(log_path) as f:
                    tail = f.read()[-3000:]
                sys.exit(f"daemon exited {proc.returncode}; the end of its log:\n{tail}")
            try:
                if c.ping() == shards:
                    break
            except SharddError:
                time.sleep(0.05)
    return proc, endpoint, time.monotonic() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--shards-after", type=int, default=0, help="shard count of the restart (default: same)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="shardd-warm-") as tmp:
        state, log_path = os.path.join(tmp, "state"), os.path.join(tmp, "shardd.log")
        proc, endpoint, _ = start(state, args.shards, log_path)
        value = b"v" * args.value_size
        t = time.monotonic()
        with Client(endpoint, timeout=30) as c:
            batch = 2000
            for lo in range(0, args.keys, batch):
                c.set_many({f"key:{i}".encode(): value for i in range(lo, min(args.keys, lo + batch))})
            rss = sum(row["rss_bytes"] for row in c.stats()["shards"])
        print(f"loaded {args.keys} keys x {args.value_size} B in {time.monotonic() - t:.1f} s "
              f"(workers' RSS {rss / 2**20:.0f} MiB)")
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(300)
        print(f"graceful stop (drain + snapshot + exit): {time.monotonic() - t:.2f} s, exit {proc.returncode}")
        after = args.shards_after or args.shards
        proc, endpoint, ready_s = start(state, after, log_path)
        with Client(endpoint, timeout=10) as c:
            probe = [f"key:{i}".encode() for i in range(0, args.keys, max(1, args.keys // 1000))]
            found = len(c.get_many(probe))
            total = sum(row["keys"] for row in c.stats()["shards"])
        print(f"restart with {after} shards: ready after {ready_s:.2f} s; {total} keys; "
              f"spot check {found}/{len(probe)}")
        proc.send_signal(signal.SIGTERM)
        proc.wait(300)
        text = open(log_path).read()  # noqa: SIM115
        for line in re.findall(r".*(?:snapshot gen-|snapshot: |loaded \d+ keys).*", text):
            print("  log:", line.split(": ", 1)[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
