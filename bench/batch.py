"""get_many(100) side by side: shardd through the router, shardd direct, pymemcache → memcached.

    python bench/batch.py                   # 100k keys x 100 B, 3 rounds x 5 s per system
    python bench/batch.py --rounds 1 --duration 2     # quick look
    python bench/batch.py --profile router  # also cProfile the client for one system
    python bench/batch.py --micro           # CPU per batch of each stage, no I/O, no daemon

Theory of operation
-------------------
Starts a memcached and a 2-shard shardd daemon on free loopback ports (bench/compare.py's
``start_memcached`` / ``start_shardd``: no persistence, stopped on every exit path), loads the
same ``--keys`` keys of ``--value-size`` bytes into both, then, in this one process, runs
``get_many`` of ``--batch`` distinct keys (pre-drawn, the same batches for every system) in a
closed loop for ``--duration`` seconds per system. Systems take turns for ``--rounds`` rounds,
so a burst of load elsewhere on the machine hits them alike; each system's figure is its
median round, in keys/s. Every batch must find all its keys (a miss is an error). The load
average is printed with the figures: shardd's path crosses four processes and their ZeroMQ I/O
threads, so other work on the machine costs it more than it costs pymemcache's single thread.

``--micro`` times each stage's own Python work per get_many instead, in this process, with no
socket (as bench/client_overhead.py): the client (a fake socket answers at once), the router
(route and gather over fake shard channels) and a worker (``Shard.apply`` of one shard's part,
through the router and on its own endpoint, hot-key tracking on and off). Thread CPU time, best
of ``--rounds`` runs: on a busy machine the minimum is the stable figure.

Targets: direct ≥ 1.5x pymemcache's get_many; router ≥ 1.0x.
"""

from __future__ import annotations

import argparse
import atexit
import cProfile
import importlib.util
import itertools
import pstats
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _load_compare() -> Any:
    name = "shardd_bench_compare"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, HERE / "compare.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


compare = _load_compare()

SYSTEMS = ("router", "direct", "memcached")
TARGETS = {"direct": 1.5, "router": 1.0}  # x memcached's keys/s


def run_for(mget: Any, batches: list[list[bytes]], seconds: float) -> float:
    """keys/s of ``mget`` over ``batches`` (cycled) for ``seconds``, after a short warm-up."""
    size = len(batches[0])
    count = len(batches)
    warm_until = time.perf_counter() + min(0.5, seconds / 4)
    i = 0
    while time.perf_counter() < warm_until:
        mget(batches[i % count])
        i += 1
    start = time.perf_counter()
    stop = start + seconds
    done = 0
    while True:
        found = mget(batches[done % count])
        if found != size:
            raise RuntimeError(f"a get_many of {size} keys found {found}")
        done += 1
        if not done & 15 and time.perf_counter() >= stop:
            break
    return done * size / (time.perf_counter() - start)


# --- --micro: each stage's CPU per batch, without I/O --------------------------------------------


def _best_us(fn: Any, calls: int, runs: int) -> float:
    """Best (lowest) thread CPU µs per call of ``fn`` over ``runs`` runs of ``calls`` calls."""
    best = float("inf")
    for _ in range(runs):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time() - start) / calls * 1e6)
    return best


def _cycle(items: list[Any]) -> Any:
    """A function returning the next of ``items`` at each call, round and round."""
    return itertools.cycle(items).__next__


def _calling(fn: Any, next_arg: Any, *more: Any) -> Any:
    """A function of no arguments calling ``fn(next_arg(), *more)``."""
    return lambda: fn(next_arg(), *more)


class _AnsweringSocket:
    """A client socket whose recv is the get_many reply to the request just sent."""

    def __init__(self, value: bytes) -> None:
        from shardd import protocol

        self.protocol, self.value, self.last = protocol, value, b""

    def send(self, frame: bytes, flags: int = 0) -> None:
        env = self.protocol.decode_envelope(frame, self.protocol.Limits())
        self.last = self.protocol.encode_reply(env.id, 0, [self.value] * len(env.op.keys))

    def poll(self, timeout: Any = None, flags: int = 1) -> int:
        return 1

    def recv(self, flags: int = 0) -> bytes:
        return self.last

    def close(self, linger: Any = None) -> None:
        pass


def micro(args: argparse.Namespace, batches: list[list[bytes]]) -> None:
    from shardd import protocol as p
    from shardd.client import Client
    from shardd.config import Config, build_config
    from shardd.hashing import shard_for
    from shardd.router import Router
    from shardd.shard_link import ShardLink
    from shardd.store import Store
    from shardd.transport_client import Dealer
    from shardd.worker import Shard, monotonic_ms

    value = b"v" * args.value_size
    shards, runs, calls = args.shards, max(15, args.rounds * 5), 300
    answer = _AnsweringSocket(value)
    print(f"CPU µs per get_many({args.batch}) of {args.value_size}-byte values, {shards} shards, no I/O "
          f"(best of {runs} runs)")
    for direct in (False, True):
        client = Client("tcp://127.0.0.1:1", timeout=5, direct=direct)
        client._link._sock.close(0)
        client._link._sock = answer
        if direct:
            client.placement.learn({"epoch": 1, "shards": shards,
                                    "endpoints": [f"tcp://127.0.0.1:{i + 2}" for i in range(shards)]})
            workers = []
            for _ in range(shards):
                worker = Dealer.__new__(Dealer)
                worker._sock = _AnsweringSocket(value)  # one each: a reply must come from its own worker
                workers.append(worker)
            client._workers = workers
        us = _best_us(_calling(client.get_many, _cycle(batches)), calls, runs)
        print(f"  client, {'direct' if direct else 'router'} mode: {us:8.1f}  (the fake server's decode and "
              f"encode included)")

    class Channel:
        def __init__(self) -> None:
            self.sent: list[bytes] = []
            self.replies: list[bytes] = []

        def send(self, frame: bytes) -> bool:
            self.sent.append(frame)
            return True

        def receive(self) -> list[bytes]:
            replies, self.replies = self.replies, []
            return replies

    class Inbox:
        def __init__(self) -> None:
            self.incoming: list[Any] = []

        def receive(self, limit: int) -> list[Any]:
            taken, self.incoming = self.incoming, []
            return taken

        def send(self, peer: bytes, frame: bytes) -> bool:
            return True

    config = Config(shards=shards, runtime_dir=tempfile.gettempdir())
    inbox = Inbox()
    links = [ShardLink(i, Channel()) for i in range(shards)]
    router = Router(config, inbox, links)
    for link in links:
        link.up = True
    frames = [p.encode_request(7, p.GetMany(keys)) for keys in batches]

    def answers(link: ShardLink) -> list[bytes]:  # what a worker would send back, made ahead
        made = []
        for frame in link.channel.sent:
            batch = p.decode_batch(frame)
            replies = [p.encode_reply(0, 0, [value] * len(p.decode_envelope(bytes(raw), config.limits).op.keys))
                       for raw in batch.ops]
            made.append((batch.seq, replies))
        link.channel.sent = []
        return made

    state = {"i": 0}

    def route_and_gather() -> None:
        i = state["i"] = state["i"] + 1
        inbox.incoming = [(b"peer", frames[i % len(frames)], 0, False)]
        router.on_frontend()
        for link in links:
            for seq, replies in answers(link):
                link.channel.replies.append(p.encode_batch_reply(seq, replies))
            router.on_shard(link)

    def fake_workers_only() -> None:  # answers()'s share of route_and_gather, subtracted from it
        sent = [p.encode_batch(1, [p.encode_request(0, p.GetMany(batches[0][i::shards]))]) for i in range(shards)]
        for frame in sent:
            batch = p.decode_batch(frame)
            replies = [p.encode_reply(0, 0, [value] * len(p.decode_envelope(bytes(raw), config.limits).op.keys))
                       for raw in batch.ops]
            p.encode_batch_reply(batch.seq, replies)
    total = _best_us(route_and_gather, calls, runs)
    fake = _best_us(fake_workers_only, calls, runs)
    print(f"  router, route + gather:   {total - fake:8.1f}")

    store = Store(monotonic_ms, max_bytes=None)
    for i in range(args.keys):
        key = compare.key_name(i)
        if shard_for(key, shards) == 0:
            store.set(key, value, None, 0)
    import gc

    gc.freeze()  # as the worker does for long-lived entries (Shard.tick)
    parts = [p.encode_request(1, p.GetMany([k for k in keys if shard_for(k, shards) == 0])) for keys in batches]
    for capacity in (256, 0):
        shard = Shard(store, build_config({"shards": shards, "hotkeys_capacity": capacity}), 0, None)
        for direct in (False, True):
            us = _best_us(_calling(shard.apply, _cycle(parts), direct), calls, runs)
            print(f"  worker, shard 0's part ({len(p.decode_envelope(parts[0], p.Limits()).op.keys)} keys), "
                  f"{'own endpoint' if direct else 'via router  '}, hotkeys_capacity {capacity:3d}: {us:8.1f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=100_000, help="keys loaded (default 100000)")
    ap.add_argument("--value-size", type=int, default=100, help="bytes per value (default 100)")
    ap.add_argument("--batch", type=int, default=100, help="keys per get_many (default 100)")
    ap.add_argument("--shards", type=int, default=2, help="shardd shards (default 2)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per system per round (default 5)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported (default 3)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ",".join(SYSTEMS))
    ap.add_argument("--profile", choices=SYSTEMS, help="cProfile this process for one extra round of that system")
    ap.add_argument("--micro", action="store_true", help="time each stage's CPU per batch without I/O, then stop")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    systems = [s for s in args.systems.split(",") if s]
    if unknown := set(systems) - set(SYSTEMS):
        ap.error(f"unknown systems {sorted(unknown)}")

    if args.micro:
        micro(args, compare.key_batches(random.Random(args.seed), args.keys, args.batch))
        return 0
    atexit.register(compare.stop_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    from pymemcache.client.base import Client as MemcacheClient

    from shardd import Client

    value = b"v" * args.value_size
    rng = random.Random(args.seed)
    batches = compare.key_batches(rng, args.keys, args.batch)
    with tempfile.TemporaryDirectory(prefix="shardd-batch-") as tmp:
        try:
            memcached = compare.start_memcached(Path(tmp), args.keys, args.value_size)
            shardd, _ = compare.start_shardd(Path(tmp), args.shards, direct=True)
        except compare.SetupError as exc:
            print(f"batch: {exc}", file=sys.stderr)
            return 2
        compare.make_adapter("memcached", memcached.port).load(0, args.keys, value)
        compare.make_adapter("shardd", shardd.port).load(0, args.keys, value)
        endpoint = f"tcp://127.0.0.1:{shardd.port}"
        router = Client(endpoint, timeout=5)
        direct = Client(endpoint, timeout=5, direct=True)
        direct.ping()
        mc = MemcacheClient(("127.0.0.1", memcached.port), no_delay=True, connect_timeout=5, timeout=5)
        mgets = {
            "router": lambda keys: len(router.get_many(keys)),
            "direct": lambda keys: len(direct.get_many(keys)),
            "memcached": lambda keys: len(mc.get_many(keys)),
        }
        runs: dict[str, list[float]] = {s: [] for s in systems}
        load_before = compare.loadavg()
        for r in range(args.rounds):
            for system in systems:
                runs[system].append(run_for(mgets[system], batches, args.duration))
            print(f"round {r + 1}: " + "  ".join(f"{s} {runs[s][-1]:,.0f}" for s in systems), flush=True)
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            run_for(mgets[args.profile], batches, args.duration)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(18)
        router.close()
        direct.close()
        mc.close()
        compare.stop_all()

    median = {s: statistics.median(v) for s, v in runs.items()}
    base = median.get("memcached")
    print(f"\nget_many({args.batch}) of {args.value_size}-byte values, {args.keys:,} keys, {args.shards} shards; "
          f"median of {args.rounds} x {args.duration:g} s; load average before {load_before}, after {compare.loadavg()}"
          " (past ~1 on 2 cores other work is competing: shardd's 4 processes suffer more than one memcached thread)")
    print(f"{'system':<12}{'keys/s':>12}{'x memcached':>14}  target")
    met = True
    for system in systems:
        ratio = median[system] / base if base else None
        goal = TARGETS.get(system)
        if goal is None or ratio is None:
            verdict = ""
        else:
            ok = ratio >= goal
            met &= ok
            verdict = f"≥ {goal:g}x: {'met' if ok else 'NOT met'}"
        shown = f"{ratio:.2f}x" if ratio is not None else "—"
        print(f"{system:<12}{median[system]:>12,.0f}{shown:>14}  {verdict}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
