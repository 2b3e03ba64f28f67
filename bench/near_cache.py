"""Near caches (issue 15): hot-shard share, throughput, latency, staleness and stale reads, feature off vs on.

    python bench/near_cache.py                       # 6 client processes, 4 shards, router mode
    python bench/near_cache.py --procs 4 --direct    # 4 processes, direct mode
    python bench/near_cache.py --help                # every option

Theory of operation
-------------------
For each mode (``off``, then ``on``) the parent starts a daemon of its own (``python -m shardd
serve`` on a free port, ``--shards`` shards, a config file with ``near_cache = false|true``; the
helpers are bench/compare.py's), and loads ``--keys`` keys of 100 bytes. In ``off`` the daemon
has no feature at all (no marking, no feed) and the clients are ``Client(near_cache=False)``:
plain GETs. In ``on`` both are at their defaults.

The keys are Zipf-ranked (``--zipf``, 1.2): the names of the top ``--hot`` ranks (32) are chosen
so that they all hash to shard 0 (``shardd.hashing.shard_for``); rank ``r`` past those goes to
shard ``(r - hot) % shards``, so the tail is even. Two phases run against each daemon, each
with fresh client processes (``spawn``), each its own ``shardd.Client``:

- **read-mostly** (``--throughput-write-ratio``, 0.01): the throughput and share figures;
- **writes** (``--write-ratio``, 0.10): the same with 10% writes; staleness is measured here.

Every process runs a pre-drawn plan of ranks in a closed loop. A write is a SET of a Zipf key
whose value starts with its version (writer id << 40 | the writer's counter, 8 bytes) and the
time it was sent. It is always followed by a read-back (a GET of the key), and in the writes
phase preceded by a pre-read: a bare ``near_get`` sent to the daemon even when the key is in the
near cache (``off``: a GET). Both count as reads of the mix, and writes are drawn so that they
are exactly the stated fraction of all ops. The processes start together; after ``--warmup``
seconds (in ``on``, also until no shard's number of marked keys changed between two reads one
second apart, at most ``--max-warmup``) the parent reads every shard's ``stats`` and worker CPU,
waits ``--seconds``, reads them again and tells the clients to stop. The measured window lies
between the two reads: ops that *start* in it are counted. Aggregate ops/s counts what the
clients saw (near-cache hits are ops served); latency is per op, from just before the call to
its return, split by what the op was (near-cache hit, read from the daemon, pre-read, write,
read-back).

**Server work.** Each shard's ``ops`` counter (every op the worker applied) over the window:
ops/s, its share, and the hot shard's ops over the mean of all shards (target <= 1.5).
Worker CPU seconds (psutil) are shown beside them.

**Where a write stands in its shard's feed.** Each client hooks its NearCache's ``on_message``
(when it applied each feed message) and ``admit`` (what each ``near_get`` reply said). A write W
to key k records when it was sent and acknowledged, ``lo`` = the seq of its pre-read and ``hi`` =
the seq of its read-back (read after W's ack, and W's invalidation is taken before the ack, so
``seq(I_W) <= hi``). If both said k was marked (lease > 0) and were less than a marking period
(1 s) apart, k was marked throughout (a shard re-marks at most once a second, and an unmark
would have lasted to the read-back), so I_W exists and lies in (lo, hi]: the messages naming k
in that range are I_W and other writers' writes to k in between. The last one is I_W or later.

**Staleness** (``on``, writes phase), of the window's writes to keys marked throughout. A
watcher process subscribes to every feed (``transport_client.Subscriber``) and timestamps each
message as it takes it. Staleness = that message's arrival - W's ack, 0 if it arrived before the
ack (it is published before the reply): at the watcher (the socket of a process that does
nothing else) with the last candidate (errs high), the same over writes with exactly one
candidate (then it is I_W), and as applied by each *other* client (on its next ``get``, which
drains the feed first).

**Stale reads** (``on``, both phases, every read). For each read by client C of key k starting
at t that returned version V: let S be the highest seq of a message naming k that C had applied
before t. W's invalidation was surely among what C had applied if S >= the last candidate (key
marked throughout), or S > hi (any message taken after the read-back names k after W was
applied). If such a W was sent after V's write was acknowledged (so W is newer than V), the
read is stale. Writes that failed (their ack is unknown) are left out, so a read is flagged only
when it is definitely stale; the reads that had at least one such delivered write to compare
with are counted as "checked". The target is 0.

The script always exits 0: it reports, including targets it missed.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import importlib.util
import json
import math
import multiprocessing as mp
import os
import pickle
import queue
import random
import shlex
import shutil
import struct
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _load(name: str, filename: str) -> Any:
    """Another bench/ file as a module (bench/ is not a package)."""
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, HERE / filename)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


compare = _load("shardd_bench_compare", "compare.py")
Histogram = compare.Histogram

VALUE_SIZE = 100
PLAN_SIZE = 1 << 16  # pre-drawn ops per process, cycled
PRELOAD_VERSION = 0
WRITER_SHIFT = 40
MODES = ("off", "on")
PHASES = ("read-mostly", "writes")
READ, WRITE, PRE_READ = 0, 1, 2
# What each measured op was, for the latency breakdown.
OP_KINDS = ("near-cache hit", "read from the daemon", "pre-read", "write", "read-back")
HIT, SERVED, PRE, SET, BACK = range(5)
MARK_EVERY_S = 1.0  # shardd.worker.MARK_EVERY_S: consecutive markings of a shard are at least this far apart
X = "\N{MULTIPLICATION SIGN}"

# --- pure parts ---------------------------------------------------------------------------


def key_names(n: int, shards: int, hot: int, hot_shard: int = 0) -> list[bytes]:
    """Names for Zipf ranks 0..n-1: the top ``hot`` on ``hot_shard``, rank r past them on (r - hot) % shards."""
    from shardd.hashing import shard_for

    free: list[list[bytes]] = [[] for _ in range(shards)]
    want = [0] * shards
    want[hot_shard] += hot
    for r in range(hot, n):
        want[(r - hot) % shards] += 1
    i = 0
    while any(len(free[s]) < want[s] for s in range(shards)):
        name = b"near:%d" % i
        i += 1
        s = shard_for(name, shards)
        if len(free[s]) < want[s]:
            free[s].append(name)
    taken = [0] * shards
    names = []
    for r in range(n):
        s = hot_shard if r < hot else (r - hot) % shards
        names.append(free[s][taken[s]])
        taken[s] += 1
    return names


def make_plan(rng: random.Random, sampler: Any, write_ratio: float, pre_read: bool,
              size: int = PLAN_SIZE) -> tuple[array, bytes]:
    """(ranks, kinds): kind 0 a read, 2 a pre-read, 1 a write. Every write comes as [pre-read,] write,
    read-back of one key, and writes are ``write_ratio`` of all ops: a group of g ops is drawn with
    probability p = w / (1 - (g - 1) w) per slot, so that p / (1 + (g - 1) p) = w."""
    group = (PRE_READ, WRITE, READ) if pre_read else (WRITE, READ)
    p = write_ratio / (1 - (len(group) - 1) * write_ratio)
    ranks = array("i")
    kinds = bytearray()
    while len(ranks) < size:
        r = sampler.sample()
        if rng.random() < p and len(ranks) + len(group) <= size:
            ranks.extend([r] * len(group))
            kinds.extend(group)
        else:
            ranks.append(r)
            kinds.append(READ)
    return ranks, bytes(kinds)


def make_value(version: int, sent: float) -> bytes:
    head = version.to_bytes(8, "little") + struct.pack("<d", sent)
    return head + b"." * (VALUE_SIZE - len(head))


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of ``values``, or None if empty."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]


# A write's record (client processes): key, version, sent, acked, shard, lo, hi, lease_lo, lease_hi,
# pre-read sent, read-back answered, writer. lo / hi: (incarnation, seq) of the pre-read / the
# read-back (None if unknown); lease_lo / lease_hi: their leases (> 0: the key was marked then).
W_KEY, W_VERSION, W_SENT, W_ACKED, W_SHARD, W_LO, W_HI, W_LEASE_LO, W_LEASE_HI, W_PRE, W_BACK, W_WRITER = range(12)


def marked_throughout(w: tuple) -> bool:
    """The key was marked from the pre-read to the read-back, so the write had an invalidation:
    both said so, and they are less than a marking period apart, so the shard re-marked at most
    once between them (an unmark then would have lasted to the read-back)."""
    lo, hi = w[W_LO], w[W_HI]
    return (lo is not None and hi is not None and lo[0] == hi[0] and w[W_LEASE_LO] > 0 and w[W_LEASE_HI] > 0
            and w[W_BACK] - w[W_PRE] < 0.9 * MARK_EVERY_S)


def candidates(w: tuple, seqs_naming: dict[bytes, list[int]]) -> list[int]:
    """For a write marked throughout: the messages naming its key numbered in (lo, hi]. Its own
    invalidation is one of them (taken after the pre-read, before the ack, so before the read-back);
    the others are other writers' writes to the key in that span. With one candidate, it is the
    write's own; the last one is it or a later one (a pairing that errs high)."""
    seqs = seqs_naming.get(w[W_KEY])
    if not seqs:
        return []
    return seqs[bisect.bisect_right(seqs, w[W_LO][1]):bisect.bisect_right(seqs, w[W_HI][1])]


def delivery_threshold(w: tuple, cover: int | None) -> int | None:
    """The lowest seq of a message naming w's key whose delivery proves w's invalidation was delivered:
    its covering message, or (key maybe not marked) any message taken after the read-back, hi + 1."""
    if cover is not None:
        return cover
    return None if w[W_HI] is None else w[W_HI][1] + 1


def stale_reads(reads: tuple[array, array, array], keys: list[bytes], applied: list[tuple],
                writes_by_key: dict[bytes, tuple[list[int], list[float]]],
                acks: dict[int, float]) -> tuple[int, int, list]:
    """(reads checked, stale reads, examples) for one client (see the module docstring).

    ``applied``: this client's KEYS messages as (time applied, shard, incarnation, seq, keys);
    ``writes_by_key``: key -> (delivery thresholds sorted, running max of the writes' send times).
    A read that started at t is stale if a write whose threshold is at most the highest seq naming
    the key that this client applied before t was sent after the read's value was acknowledged.
    """
    per_key: dict[bytes, tuple[list[float], list[int]]] = {}
    for t, _, _, seq, mkeys in applied:
        for k in mkeys:
            ts, ss = per_key.setdefault(k, ([], []))
            ts.append(t)
            ss.append(max(seq, ss[-1]) if ss else seq)
    t0s, kids, vers = reads
    checked = stale = 0
    examples = []
    for t, r, v in zip(t0s, kids, vers, strict=True):
        key = keys[r]
        got = per_key.get(key)
        if got is None:
            continue
        i = bisect.bisect_left(got[0], t) - 1
        if i < 0:
            continue
        thresholds, maxsent = writes_by_key.get(key, ((), ()))
        j = bisect.bisect_right(thresholds, got[1][i]) - 1
        if j < 0:
            continue
        checked += 1
        ack = acks.get(v)
        if ack is not None and maxsent[j] > ack:
            stale += 1
            if len(examples) < 5:
                # newer_write_sent > read_at would mean the checker is wrong, not the client
                examples.append({"key": key.decode(), "read_at": t, "version": v, "version_ack": ack,
                                 "newer_write_sent": maxsent[j], "delivered_seq": got[1][i]})
    return checked, stale, examples


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


# --- client and watcher processes ------------------------------------------------------------


class Hooks:
    """A client's NearCache, watched: when it applied each feed message, what each near_get reply said."""

    def __init__(self, client: Any) -> None:
        from shardd import protocol

        self.applied: list[tuple] = []     # (time, shard, incarnation, seq, keys) of KEYS messages
        self.others = 0                    # ALL messages and undecodable frames
        self.last: tuple | None = None     # (key, shard, incarnation, seq, lease_ms) of the last near_get reply
        near = client._near
        if near is None:
            return
        on_message, admit = near.on_message, near.admit
        decode, keys_kind, beat = protocol.decode_invalidation, protocol.INVALIDATE_KEYS, protocol.HEARTBEAT
        mono = time.monotonic
        applied = self.applied

        def hooked_message(frame: bytes, now: float) -> None:
            on_message(frame, now)
            t = mono()  # after applying it: a read that started later must not see what it dropped
            try:
                m = decode(frame)
            except Exception:
                self.others += 1
                return
            if m.kind == keys_kind:
                applied.append((t, m.shard, m.incarnation, m.seq, tuple(m.keys)))
            elif m.kind != beat:
                self.others += 1

        def hooked_admit(key: bytes, answer: Any, sent_at: float, writes_then: int) -> Any:
            with contextlib.suppress(Exception):
                _, lease, shard, inc, seq = answer
                self.last = (key, shard, inc, seq, lease)
            return admit(key, answer, sent_at, writes_then)

        near.on_message = hooked_message
        near.admit = hooked_admit


def _client_process(index: int, spec: dict[str, Any], sync: dict[str, Any], results: Any) -> None:
    """One client process: plan, connect, ready, run the closed loop until told to stop, report."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from shardd import Client

        rng = random.Random(spec["seed"] * 1000 + index)
        sampler = compare.ZipfSampler(spec["keys"], spec["zipf"], rng)
        ranks, kinds = make_plan(rng, sampler, spec["write_ratio"], spec["pre_read"])
        client = Client(spec["endpoint"], timeout=5.0, direct=spec["direct"], near_cache=spec["near"])
        client.ping()
        hooks = Hooks(client)
    except Exception as exc:
        results.put(("error", index, f"{type(exc).__name__}: {exc}"))
        return
    results.put(("ready", index, None))
    if not sync["go"].wait(120):
        return
    try:
        report = _run(client, hooks, index, ranks, kinds, spec["names"], spec["shard_of"], sync)
        path = Path(spec["out"]) / f"client-{index}.pkl"
        path.write_bytes(pickle.dumps(report, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception as exc:
        results.put(("error", index, f"{type(exc).__name__}: {exc}"))
    else:
        results.put(("done", index, str(path)))
    finally:
        client.close()


def _pre_reader(client: Any) -> Any:
    """The pre-read of a write: with a near cache a bare near_get (never served from the copy, never
    kept), which says where the shard's feed stood and whether the key is marked; else a GET."""
    from shardd import protocol

    if client._near is None:
        get = client.get
        return lambda key: (get(key), None, 0)
    reply_to, near_get, ok = client._reply, protocol.NearGet, protocol.OK

    def pre_read(key: bytes) -> tuple[bytes | None, tuple[int, int] | None, int]:
        reply = reply_to(near_get(key, 0))
        if reply.status != ok:
            raise RuntimeError(f"near_get: status {reply.status}: {reply.value}")
        value, lease, _, inc, seq = reply.value
        return value, (inc, seq), lease

    return pre_read


def _run(client: Any, hooks: Hooks, index: int, ranks: array, kinds: bytes, keys: list[bytes],
         shards: list[int], sync: dict[str, Any]) -> dict[str, Any]:
    get, set_, pre_read = client.get, client.set, _pre_reader(client)
    mono = time.monotonic
    from_bytes = int.from_bytes
    stop_at, measure_from = sync["stop_at"], sync["measure_from"]
    t0s, t1s, kids, vers, ops = array("d"), array("d"), array("i"), array("q"), array("b")
    near = client._near
    write_log: list[tuple] = []
    failed_versions: list[int] = []
    errors: dict[str, int] = {}
    writer = (index + 1) << WRITER_SHIFT
    counter = version = 0
    pre: tuple | None = None       # (sent, lo, lease) of the pre-read of the write to come
    pending: list | None = None    # the write whose read-back comes next
    snaps: dict[str, Any] = {}
    mask = len(ranks) - 1
    i = 0
    while True:
        if not i & 63:
            now = mono()
            stop = stop_at.value
            if stop and now >= stop:
                break
            if "from" not in snaps and measure_from.value and now >= measure_from.value:
                snaps["from"] = (client.near_cache_stats(), time.process_time())
        r = ranks[i & mask]
        kind = kinds[i & mask]
        i += 1
        key = keys[r]
        try:
            if kind == READ:
                hits = near.hits if near is not None else 0
                t0 = mono()
                value = get(key)
                t1 = mono()
                op = HIT if near is not None and near.hits != hits else SERVED
                if pending is not None:
                    op = BACK
                    last = hooks.last
                    if last is not None and last[0] == key:
                        pending[W_HI], pending[W_LEASE_HI] = (last[2], last[3]), last[4]
                    pending[W_BACK] = t1
                    write_log.append(tuple(pending))
                    pending = None
            elif kind == PRE_READ:
                t0 = mono()
                value, lo, lease = pre_read(key)
                t1 = mono()
                pre = (t0, lo, lease)
                op = PRE
            else:
                counter += 1
                version = writer | counter
                t0 = mono()
                set_(key, make_value(version, t0))
                t1 = mono()
                lo, lease, pre_sent = (pre[1], pre[2], pre[0]) if pre is not None else (None, 0, t0)
                pending = [key, version, t0, t1, shards[r], lo, None, lease, 0, pre_sent, 0.0, index]
                pre = None
                value = None
                op = SET
        except Exception as exc:
            name = type(exc).__name__
            errors[name] = errors.get(name, 0) + 1
            if kind == WRITE:
                failed_versions.append(version)  # may or may not have been applied: its ack is unknown
            pre = pending = None
            continue
        t0s.append(t0)
        t1s.append(t1)
        kids.append(r)
        ops.append(op)
        vers.append(-2 if kind == WRITE else -1 if value is None else from_bytes(value[:8], "little"))
    snaps["to"] = (client.near_cache_stats(), time.process_time())
    return {"index": index, "t0": t0s, "t1": t1s, "kid": kids, "ver": vers, "op": ops, "writes": write_log,
            "failed_versions": failed_versions, "errors": errors, "applied": hooks.applied, "others": hooks.others,
            "near_from": snaps.get("from", (None, None))[0], "near_to": snaps["to"][0],
            "cpu_from": snaps.get("from", (None, None))[1], "cpu_to": snaps["to"][1]}


def _watcher_process(spec: dict[str, Any], sync: dict[str, Any], results: Any) -> None:
    """Subscribe to every feed and timestamp each message as it is taken off the socket."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from shardd import Client, protocol
        from shardd.transport_client import Subscriber

        with Client(spec["endpoint"], timeout=5.0, near_cache=False) as c:
            feeds = {e for e in c.topology().get("invalidations", []) if e}
        sub = Subscriber()
        sub.follow(feeds)
    except Exception as exc:
        results.put(("error", -1, f"watcher: {type(exc).__name__}: {exc}"))
        return
    results.put(("ready", -1, None))
    decode, keys_kind = protocol.decode_invalidation, protocol.INVALIDATE_KEYS
    mono = time.monotonic
    log: list[tuple] = []
    beats = others = 0
    stop_at = sync["stop_at"]
    try:
        sync["go"].wait(120)
        while not (stop_at.value and mono() >= stop_at.value + 0.05):
            if not sub.wait(0.05):
                continue
            while (frame := sub.take()) is not None:
                t = mono()
                m = decode(frame)
                if m.kind == keys_kind:
                    log.append((t, m.shard, m.incarnation, m.seq, tuple(m.keys)))
                elif m.kind == protocol.HEARTBEAT:
                    beats += 1
                else:
                    others += 1
        path = Path(spec["out"]) / "watcher.pkl"
        path.write_bytes(pickle.dumps({"log": log, "beats": beats, "others": others}))
    except Exception as exc:
        results.put(("error", -1, f"watcher: {type(exc).__name__}: {exc}"))
    else:
        results.put(("done", -1, str(path)))
    finally:
        sub.close()


# --- the parent -----------------------------------------------------------------------------


def shard_snapshot(client: Any) -> dict[str, Any]:
    """Every shard's ops, near block and worker CPU seconds, at one instant (the middle of the read)."""
    import psutil

    t0 = time.monotonic()
    stats = client.stats()
    t1 = time.monotonic()
    shards = []
    for s in stats["shards"]:
        cpu = None
        with contextlib.suppress(Exception):
            ct = psutil.Process(s["pid"]).cpu_times()
            cpu = ct.user + ct.system
        shards.append({"ops": s.get("ops", 0), "near": s.get("near"), "cpu": cpu,
                       "service_s": s.get("service_sum_s", 0.0), "served": s.get("service_count", 0)})
    return {"t": (t0 + t1) / 2, "shards": shards}


def daemon_cpu(server: Any) -> float:
    total = 0.0
    for proc in server.processes():
        with contextlib.suppress(Exception):
            ct = proc.cpu_times()
            total += ct.user + ct.system
    return total


def run_phase(server: Any, mode: str, phase: str, args: argparse.Namespace, names: list[bytes],
              shard_of: list[int], tmp: Path) -> dict[str, Any]:
    from shardd import Client

    endpoint = f"tcp://127.0.0.1:{server.port}"
    out = tmp
    out.mkdir()
    write_ratio = args.write_ratio if phase == "writes" else args.throughput_write_ratio
    spec = {"endpoint": endpoint, "direct": args.direct, "near": mode == "on", "keys": args.keys, "zipf": args.zipf,
            "seed": args.seed + (0 if phase == "writes" else 7), "write_ratio": write_ratio, "names": names,
            "shard_of": shard_of, "out": str(out), "pre_read": phase == "writes"}
    ctx = mp.get_context("spawn")
    sync = {"go": ctx.Event(), "stop_at": ctx.RawValue("d", 0.0), "measure_from": ctx.RawValue("d", 0.0)}
    results = ctx.Queue()
    procs = [ctx.Process(target=_client_process, args=(i, spec, sync, results), daemon=True)
             for i in range(args.procs)]
    if mode == "on":
        procs.append(ctx.Process(target=_watcher_process, args=(spec, sync, results), daemon=True))
    for p in procs:
        p.start()
    admin = Client(endpoint, timeout=5.0, near_cache=False)
    paths: dict[int, str] = {}
    errors: list[str] = []
    try:
        ready = 0
        while ready < len(procs):
            kind, who, what = results.get(timeout=120)
            if kind == "error":
                raise RuntimeError(f"process {who}: {what}")
            ready += kind == "ready"
        started = time.monotonic()
        sync["go"].set()
        # Warm-up: at least --warmup s; with the feature on, also until the marks settle.
        time.sleep(args.warmup)
        marks: list[list[int]] = []
        if mode == "on":
            while time.monotonic() - started < args.max_warmup:
                marked = [s["near"]["marked"] if s["near"] else 0 for s in shard_snapshot(admin)["shards"]]
                marks.append(marked)
                if len(marks) >= 2 and marks[-1] == marks[-2] and marked[0] > 0:
                    break
                time.sleep(1.0)
        warmup_s = time.monotonic() - started
        cpu_a = daemon_cpu(server)
        a = shard_snapshot(admin)
        sync["measure_from"].value = a["t"]
        time.sleep(max(0.0, a["t"] + args.seconds - time.monotonic()))
        b = shard_snapshot(admin)
        cpu_b = daemon_cpu(server)
        sync["stop_at"].value = b["t"]
        done = 0
        while done < len(procs):
            try:
                kind, who, what = results.get(timeout=120)
            except queue.Empty:
                errors.append("a process did not report within 120 s")
                break
            if kind == "error":
                errors.append(f"process {who}: {what}")
                done += 1
            elif kind == "done":
                paths[who] = what
                done += 1
    finally:
        sync["stop_at"].value = sync["stop_at"].value or time.monotonic()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        admin.close()
    reports = [pickle.loads(Path(paths[i]).read_bytes()) for i in sorted(k for k in paths if k >= 0)]
    watcher = pickle.loads(Path(paths[-1]).read_bytes()) if -1 in paths else None
    return analyse(mode, phase, write_ratio, names, a, b, cpu_b - cpu_a, reports, watcher, errors, warmup_s, marks)


def analyse(mode: str, phase: str, write_ratio: float, names: list[bytes], a: dict[str, Any], b: dict[str, Any],
            daemon_cpu_s: float, reports: list[dict[str, Any]], watcher: dict[str, Any] | None, errors: list[str],
            warmup_s: float, marks: list[list[int]]) -> dict[str, Any]:
    t_from, t_to = a["t"], b["t"]
    span = t_to - t_from
    # Client side: ops started in the window, latency, near-cache hits, client CPU.
    hist = Histogram()
    by_kind = [Histogram() for _ in OP_KINDS]
    ops = 0
    hits = misses = 0
    near_counts: dict[str, int] = {}
    client_cpu = 0.0
    op_errors: dict[str, int] = {}
    for rep in reports:
        t0s, t1s = rep["t0"], rep["t1"]
        lo = bisect.bisect_left(t0s, t_from)
        hi = bisect.bisect_left(t0s, t_to)
        record = hist.record
        kinds = rep["op"]
        for k in range(lo, hi):
            ns = int((t1s[k] - t0s[k]) * 1e9)
            record(ns)
            by_kind[kinds[k]].record(ns)
        ops += hi - lo
        nf, nt = rep["near_from"], rep["near_to"]
        if nf is not None and nt is not None:
            hits += nt["hits"] - nf["hits"]
            misses += nt["misses"] - nf["misses"]
            for name in ("admitted", "refused", "invalidations", "expired", "resets", "gaps"):
                near_counts[name] = near_counts.get(name, 0) + nt[name] - nf[name]
        if rep["cpu_from"] is not None:
            client_cpu += rep["cpu_to"] - rep["cpu_from"]
        for name, n in rep["errors"].items():
            op_errors[name] = op_errors.get(name, 0) + n
    # Server side: each shard's ops and CPU over the window.
    shard_ops = [(sb["ops"] - sa["ops"]) / span for sa, sb in zip(a["shards"], b["shards"], strict=True)]
    total = sum(shard_ops) or 1.0
    mean = total / len(shard_ops)
    shard_cpu = [None if sa["cpu"] is None or sb["cpu"] is None else (sb["cpu"] - sa["cpu"]) / span
                 for sa, sb in zip(a["shards"], b["shards"], strict=True)]
    service_us = [(sb["service_s"] - sa["service_s"]) * 1e6 / max(1, sb["served"] - sa["served"])
                  for sa, sb in zip(a["shards"], b["shards"], strict=True)]
    cpu_us = [None if c is None or not n else c * 1e6 / n for c, n in zip(shard_cpu, shard_ops, strict=True)]
    near_a = [s["near"] or {} for s in a["shards"]]
    near_b = [s["near"] or {} for s in b["shards"]]
    result: dict[str, Any] = {
        "mode": mode, "phase": phase, "write_ratio": write_ratio, "window_s": span, "warmup_s": warmup_s,
        "marks_during_warmup": marks, "ops_per_s": ops / span, "ops": ops,
        "p50_us": hist.percentile(50) / 1000, "p99_us": hist.percentile(99) / 1000,
        "p999_us": hist.percentile(99.9) / 1000, "max_us": hist.max / 1000,
        "latency_by_kind": {name: {"share": h.count / max(1, hist.count), "p50_us": h.percentile(50) / 1000,
                                   "p99_us": h.percentile(99) / 1000, "max_us": h.max / 1000}
                            for name, h in zip(OP_KINDS, by_kind, strict=True) if h.count},
        "shard_ops_per_s": shard_ops, "shard_share": [x / total for x in shard_ops],
        "hot_over_mean": shard_ops[0] / mean if mean else None, "server_ops_per_s": sum(shard_ops),
        "shard_cpu": shard_cpu, "shard_service_us": service_us, "shard_cpu_us_per_op": cpu_us,
        "daemon_cpu_per_s": daemon_cpu_s / span, "client_cpu_per_s": client_cpu / span,
        "near_hit_ratio": hits / (hits + misses) if hits + misses else None, "near_hits": hits,
        "near_counts": near_counts,
        "marked_from": [n.get("marked") for n in near_a], "marked_to": [n.get("marked") for n in near_b],
        "messages": sum(n.get("messages", 0) for n in near_b) - sum(n.get("messages", 0) for n in near_a),
        "keys_invalidated": (sum(n.get("keys_invalidated", 0) for n in near_b)
                             - sum(n.get("keys_invalidated", 0) for n in near_a)),
        "op_errors": op_errors, "errors": errors,
    }
    if mode == "on":
        result.update(check_staleness(names, reports, watcher, t_from, t_to))
    return result


def check_staleness(names: list[bytes], reports: list[dict[str, Any]], watcher: dict[str, Any] | None,
                    t_from: float, t_to: float) -> dict[str, Any]:
    """Staleness of the window's writes (watcher and other clients) and the stale-read check (all reads)."""
    acks: dict[int, float] = {PRELOAD_VERSION: float("-inf")}
    writes_all = []
    failed: set[int] = set()
    for rep in reports:
        failed.update(rep["failed_versions"])
        for w in rep["writes"]:
            acks[w[W_VERSION]] = w[W_ACKED]
            writes_all.append(w)
    for v in failed:
        acks.pop(v, None)
    # Which messages named each key (the watcher sees them all; without it, the clients' union).
    source = watcher["log"] if watcher else [m for rep in reports for m in rep["applied"]]
    arrival: dict[tuple[int, int], float] = {}
    incs: dict[int, set[int]] = {}
    naming: dict[bytes, set[int]] = {}
    for t, shard, inc, seq, mkeys in source:
        arrival.setdefault((shard, seq), t)
        incs.setdefault(shard, set()).add(inc)
        for k in mkeys:
            naming.setdefault(k, set()).add(seq)
    seqs_naming = {k: sorted(v) for k, v in naming.items()}
    covers: dict[int, int | None] = {}
    exact: set[int] = set()
    for w in writes_all:
        if marked_throughout(w):
            found = candidates(w, seqs_naming)
            covers[w[W_VERSION]] = found[-1] if found else None
            if len(found) == 1:
                exact.add(w[W_VERSION])
    window = [w for w in writes_all if t_from <= w[W_SENT] < t_to]
    marked = [w for w in window if w[W_VERSION] in covers]
    paired = [w for w in marked if covers[w[W_VERSION]] is not None]
    at_watcher: list[float] = []
    at_watcher_exact: list[float] = []
    early = 0
    applied_by = [{(m[1], m[3]): m[0] for m in rep["applied"]} for rep in reports]
    at_clients: list[float] = []
    back_ms = [(w[W_BACK] - w[W_ACKED]) * 1000 for w in paired]
    for w in paired:
        ident = (w[W_SHARD], covers[w[W_VERSION]])
        if watcher:
            lag = arrival[ident] - w[W_ACKED]
            early += lag < 0
            at_watcher.append(max(0.0, lag) * 1000)
            if w[W_VERSION] in exact:
                at_watcher_exact.append(max(0.0, lag) * 1000)
        for rep, seen in zip(reports, applied_by, strict=True):
            if rep["index"] != w[W_WRITER] and (t := seen.get(ident)) is not None:
                at_clients.append(max(0.0, t - w[W_ACKED]) * 1000)
    # Stale reads: every read of every client, warm-up included.
    by_key: dict[bytes, list[tuple[int, float]]] = {}
    for w in writes_all:
        threshold = delivery_threshold(w, covers.get(w[W_VERSION]))
        if threshold is not None and w[W_VERSION] in acks:
            by_key.setdefault(w[W_KEY], []).append((threshold, w[W_SENT]))
    writes_by_key = {}
    for k, v in by_key.items():
        v.sort()
        running, m = [], float("-inf")
        for _, sent in v:
            m = max(m, sent)
            running.append(m)
        writes_by_key[k] = ([s for s, _ in v], running)
    checked = stale = reads = 0
    examples: list = []
    for rep in reports:
        vers = rep["ver"]
        keep = [j for j in range(len(vers)) if vers[j] >= 0]
        sel = (array("d", (rep["t0"][j] for j in keep)), array("i", (rep["kid"][j] for j in keep)),
               array("q", (vers[j] for j in keep)))
        reads += len(keep)
        c, n, ex = stale_reads(sel, names, rep["applied"], writes_by_key, acks)
        checked += c
        stale += n
        examples.extend(ex)
    return {
        "writes_in_window": len(window), "writes_marked": len(marked), "writes_paired": len(paired),
        "arrived_before_ack": early,
        "staleness_watcher_ms": {"p50": pct(at_watcher, 50), "p99": pct(at_watcher, 99),
                                 "max": max(at_watcher, default=None), "n": len(at_watcher)},
        "staleness_clients_ms": {"p50": pct(at_clients, 50), "p99": pct(at_clients, 99),
                                 "max": max(at_clients, default=None), "n": len(at_clients)},
        "staleness_exact_ms": {"p50": pct(at_watcher_exact, 50), "p99": pct(at_watcher_exact, 99),
                               "max": max(at_watcher_exact, default=None), "n": len(at_watcher_exact)},
        "ack_to_readback_ms": {"p50": pct(back_ms, 50), "p99": pct(back_ms, 99), "max": max(back_ms, default=None)},
        "reads_total": reads, "reads_checked": checked, "stale_reads": stale, "stale_examples": examples[:5],
        "incarnations_per_shard": {s: len(v) for s, v in incs.items()},
        "watcher_messages": len(watcher["log"]) if watcher else None,
        "feed_other_messages": sum(r["others"] for r in reports) + (watcher["others"] if watcher else 0),
    }


# --- output -------------------------------------------------------------------------------------


def medians(results: list[dict[str, Any]], phase: str) -> list[dict[str, Any]]:
    """Per mode, the round with the median aggregate ops/s of ``phase`` (compare.median_run)."""
    out = []
    for mode in MODES:
        runs = [r for r in results if r["phase"] == phase and r["mode"] == mode]
        if runs:
            out.append(compare.median_run(runs))
    return out


def format_results(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = []
    for phase in PHASES:
        rows = medians(results, phase)
        if not rows:
            continue
        rounds = max(r["round"] for r in results) + 1
        lines.append(f"\n== {phase}: {rows[0]['write_ratio']:.0%} writes, {args.procs} client processes, "
                     f"{'direct' if args.direct else 'router'} mode"
                     + (f"; median of {rounds} rounds by ops/s" if rounds > 1 else "") + " ==")
        lines.append(f"{'':34}" + "".join(f"{r['mode']:>24}" for r in rows))

        def row(label: str, cells: list[str]) -> None:
            lines.append(f"{label:34}" + "".join(f"{c:>24}" for c in cells))

        row("warm-up s / window s", [f"{r['warmup_s']:.1f} / {r['window_s']:.1f}" for r in rows])
        row("aggregate ops/s (client-visible)", [fmt(r["ops_per_s"], 0) for r in rows])
        row("client latency p50 / p99 µs", [f"{fmt(r['p50_us'])} / {fmt(r['p99_us'])}" for r in rows])
        row("client latency p99.9 / max µs", [f"{fmt(r['p999_us'])} / {fmt(r['max_us'], 0)}" for r in rows])
        row("server ops/s (sum of shards)", [fmt(r["server_ops_per_s"], 0) for r in rows])
        for s in range(len(rows[0]["shard_ops_per_s"])):
            row(f"  shard {s} ops/s (share)", [f"{r['shard_ops_per_s'][s]:,.0f} ({r['shard_share'][s]:.1%})"
                                               for r in rows])
        row("hot shard ops / mean", [f"{fmt(r['hot_over_mean'], 2)}{X}" for r in rows])
        row("worker CPU s/s by shard", ["/".join(fmt(c, 2) for c in r["shard_cpu"]) for r in rows])
        row("worker CPU µs per op by shard", ["/".join(fmt(c, 0) for c in r["shard_cpu_us_per_op"]) for r in rows])
        # A worker times the ops of the router's batches only: in direct mode these are a few admin ops.
        row("op service µs (in apply) by shard", ["/".join(fmt(c, 1) for c in r["shard_service_us"])
                                                  if not args.direct else "n/a (direct mode)" for r in rows])
        row("daemon CPU s/s (all processes)", [fmt(r["daemon_cpu_per_s"], 2) for r in rows])
        row("client CPU s/s (all clients)", [fmt(r["client_cpu_per_s"], 2) for r in rows])
        row("near-cache hit ratio", ["-" if r["near_hit_ratio"] is None else f"{r['near_hit_ratio']:.1%}"
                                     for r in rows])
        row("  copies admitted / refused", [f"{r['near_counts'].get('admitted', 0):,} / "
                                            f"{r['near_counts'].get('refused', 0):,}" if r["near_counts"] else "-"
                                            for r in rows])
        row("  dropped: invalidated / expired", [f"{r['near_counts'].get('invalidations', 0):,} / "
                                                 f"{r['near_counts'].get('expired', 0):,}" if r["near_counts"] else "-"
                                                 for r in rows])
        row("keys marked per shard (end)", ["/".join(str(m) for m in r["marked_to"]) if r["marked_to"][0] is not None
                                            else "-" for r in rows])
        row("invalidation msgs / keys (window)", [f"{r['messages']:,} / {r['keys_invalidated']:,}" for r in rows])
        row("op errors", [", ".join(f"{k} {v}" for k, v in r["op_errors"].items()) or "none" for r in rows])
        row("load average after", [r["loadavg_after"].split(" ")[0] for r in rows])
        for r in (r for r in results if r["phase"] == phase):
            tag = f"  {r['mode']} round {r['round']}:"
            line = (f"{tag} {r['ops_per_s']:,.0f} ops/s, p99 {fmt(r['p99_us'], 0)} µs, hot/mean "
                    f"{fmt(r['hot_over_mean'], 2)}{X}, load {r['loadavg_after'].split(' ')[0]}")
            pad = " " * len(tag)
            line += "\n" + pad + " latency µs by op: " + "; ".join(
                f"{name} {v['share']:.0%} p50 {v['p50_us']:,.0f} p99 {v['p99_us']:,.0f}"
                for name, v in r["latency_by_kind"].items())
            if r["mode"] == "on":
                sw, sc, se = r["staleness_watcher_ms"], r["staleness_clients_ms"], r["staleness_exact_ms"]
                ab = r["ack_to_readback_ms"]
                line += (f", hit ratio {fmt(100 * (r['near_hit_ratio'] or 0), 1)}%, marked {r['marked_to']}"
                         f"\n{' ' * len(tag)} writes in window {r['writes_in_window']:,}: to a key marked throughout "
                         f"{r['writes_marked']:,}, paired with their invalidation {r['writes_paired']:,} "
                         f"({r['arrived_before_ack']:,} arrived before the ack)"
                         f"\n{' ' * len(tag)} staleness ms at the watcher p50 {fmt(sw['p50'], 3)} p99 "
                         f"{fmt(sw['p99'], 3)} max {fmt(sw['max'], 3)}; applied at the other clients p50 "
                         f"{fmt(sc['p50'], 3)} p99 {fmt(sc['p99'], 3)} max {fmt(sc['max'], 3)} (n {sc['n']:,})"
                         f"\n{pad} staleness ms at the watcher, one-candidate pairings only: p50 {fmt(se['p50'], 3)} "
                         f"p99 {fmt(se['p99'], 3)} max {fmt(se['max'], 3)} (n {se['n']:,}); ack to read-back ms "
                         f"p50 {fmt(ab['p50'], 3)} p99 {fmt(ab['p99'], 3)} max {fmt(ab['max'], 3)}"
                         f"\n{' ' * len(tag)} stale reads {r['stale_reads']:,} of {r['reads_checked']:,} checked "
                         f"({r['reads_total']:,} reads)")
                if r["stale_examples"]:
                    line += f"\n{' ' * len(tag)} stale examples {r['stale_examples']}"
            lines.append(line)
            for e in r["errors"]:
                lines.append(f"{tag} {e}")
    lines.append("\n== targets (issue 15) ==")
    lines.extend(targets(results))
    return "\n".join(lines)


def targets(results: list[dict[str, Any]]) -> list[str]:
    out = []
    for phase in PHASES:
        by_mode = {r["mode"]: r for r in medians(results, phase)}
        off, on = by_mode.get("off"), by_mode.get("on")
        if on is not None:
            ratio = on["hot_over_mean"]
            out.append(f"{'PASS' if ratio is not None and ratio <= 1.5 else 'FAIL'}  [{phase}] hot shard ops / mean "
                       f"<= 1.5: on {fmt(ratio, 2)}{X} (off {fmt(off['hot_over_mean'], 2) if off else '-'}{X})")
        if on is not None and off is not None:
            gain = on["ops_per_s"] / off["ops_per_s"] if off["ops_per_s"] else None
            out.append(f"{'PASS' if gain is not None and gain >= 2 else 'FAIL'}  [{phase}] aggregate throughput "
                       f">= 2{X} off: {fmt(on['ops_per_s'], 0)} / {fmt(off['ops_per_s'], 0)} = {fmt(gain, 2)}{X}")
    runs = [r for r in results if r["mode"] == "on" and r["phase"] == "writes"]
    if runs:
        worst = max(runs, key=lambda r: r["staleness_watcher_ms"]["p99"] or 0.0)
        p99 = worst["staleness_watcher_ms"]["p99"]
        out.append(f"{'PASS' if p99 is not None and p99 <= 5 else 'FAIL'}  [writes] p99 staleness <= 5 ms "
                   f"(worst round): {fmt(p99, 3)} ms at the watcher, "
                   f"{fmt(worst['staleness_clients_ms']['p99'], 3)} ms applied at the other clients")
    on_runs = [r for r in results if r["mode"] == "on"]
    if on_runs:
        n = sum(r["stale_reads"] for r in on_runs)
        checked = sum(r["reads_checked"] for r in on_runs)
        out.append(f"{'PASS' if n == 0 and checked else 'FAIL'}  0 stale reads after an invalidation was delivered: "
                   f"{n} of {checked:,} checked reads (all rounds and phases)")
    return out


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--procs", type=int, default=6, help="client processes (4-8 in the issue)")
    ap.add_argument("--shards", type=int, default=4, help="daemon shards")
    ap.add_argument("--keys", type=int, default=10_000, help="key space (100-byte values)")
    ap.add_argument("--hot", type=int, default=32, help="top ranks placed on shard 0")
    ap.add_argument("--zipf", type=float, default=1.2, help="Zipf exponent")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=3.0, help="minimum warm-up seconds")
    ap.add_argument("--max-warmup", type=float, default=30.0, help="longest warm-up waiting for marks to settle")
    ap.add_argument("--write-ratio", type=float, default=0.10, help="writes in the 'writes' phase (staleness)")
    ap.add_argument("--throughput-write-ratio", type=float, default=0.01,
                    help="writes in the 'read-mostly' phase")
    ap.add_argument("--direct", action="store_true", help="clients in direct mode")
    ap.add_argument("--modes", default="off,on", help="which of off,on to run")
    ap.add_argument("--phases", default=",".join(PHASES), help="which of read-mostly,writes to run")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra daemon setting for the 'on' daemon (repeatable), e.g. hot_keys_max=128")
    ap.add_argument("--rounds", type=int, default=1, help="off/on rounds, alternating; medians are shown")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    args = ap.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    args.phases = [p for p in args.phases.split(",") if p]
    if not set(args.modes) <= set(MODES) or not set(args.phases) <= set(PHASES):
        ap.error("--modes takes off,on and --phases read-mostly,writes")
    if not 0 <= args.write_ratio < 1 or not 0 <= args.throughput_write_ratio < 1:
        ap.error("write ratios must be in [0, 1)")
    return args


def _setting(text: str) -> tuple[str, Any]:
    key, _, raw = text.partition("=")
    for cast in (int, float):
        with contextlib.suppress(ValueError):
            return key.strip(), cast(raw)
    return key.strip(), {"true": True, "false": False}.get(raw.strip().lower(), raw.strip())


def run_mode(mode: str, rnd: int, args: argparse.Namespace, names: list[bytes], shard_of: list[int],
             extra: dict[str, Any], tmp: Path) -> list[dict[str, Any]]:
    """One daemon with the feature off or on, loaded, then each phase with fresh clients."""
    from shardd import Client

    settings = {"near_cache": mode == "on", **(extra if mode == "on" else {})}
    name = f"shardd-{mode}-{rnd}"
    server, _ = compare.start_shardd(tmp, args.shards, direct=args.direct, name=name, settings=settings)
    out = []
    try:
        with Client(f"tcp://127.0.0.1:{server.port}", timeout=10.0, near_cache=False) as c:
            for i in range(0, args.keys, 1000):
                c.set_many([(k, make_value(PRELOAD_VERSION, 0.0)) for k in names[i:i + 1000]])
        for phase in args.phases:
            print(f"-- round {rnd} {mode} / {phase} ... (load {Path('/proc/loadavg').read_text().split()[0]})",
                  flush=True)
            r = run_phase(server, mode, phase, args, names, shard_of, tmp / f"{name}-{phase}")
            r["round"] = rnd
            r["loadavg_after"] = Path("/proc/loadavg").read_text().strip()
            out.append(r)
            print(f"   {r['ops_per_s']:,.0f} ops/s, hot/mean {fmt(r['hot_over_mean'], 2)}, marked "
                  f"{r['marked_to']}, load {r['loadavg_after']}", flush=True)
    finally:
        server.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from shardd.hashing import shard_for

    names = key_names(args.keys, args.shards, args.hot)
    shard_of = [shard_for(k, args.shards) for k in names]
    assert all(s == 0 for s in shard_of[: args.hot])
    sampler = compare.ZipfSampler(args.keys, args.zipf)
    top = sum(sampler.probability(r) for r in range(args.hot))
    print(f"near_cache bench: {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"load average before: {Path('/proc/loadavg').read_text().strip()}; {os.cpu_count()} CPUs")
    print(f"{args.keys:,} keys of {VALUE_SIZE} B, Zipf s={args.zipf}; top {args.hot} ranks on shard 0 "
          f"({top:.1%} of accesses), the rest round-robin over {args.shards} shards")
    print("off = daemon near_cache = false (no marking, no feed) and Client(near_cache=False); on = defaults"
          + (f" + {args.set}" if args.set else ""))
    extra = dict(_setting(s) for s in args.set)
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="shardd-near-bench-"))
    try:
        for rnd in range(args.rounds):
            for mode in args.modes:
                results.extend(run_mode(mode, rnd, args, names, shard_of, extra, tmp))
    except Exception as exc:
        print(f"near_cache bench: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        compare.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    print(format_results(results, args))
    print(f"\nload average after: {Path('/proc/loadavg').read_text().strip()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv, "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
