"""Cluster chaos: random membership, process and etcd failures under a workload that checks itself.

    python bench/cluster_chaos.py                          # 180 s, seed from the clock, replicas off
    python bench/cluster_chaos.py --seed 7 --duration 300 --replicas 1
    python bench/cluster_chaos.py --events kill,freeze --overlap 0.5 --keep
    python bench/cluster_chaos.py --repro all              # the minimal reproductions of what it found
    python bench/cluster_chaos.py --help                   # every option

Theory of operation
-------------------
One etcd (``tests.etcd_server.running_etcd``) and a ``tests.cluster_harness.Cluster`` (lease
TTL ``--ttl``, ``--shards`` shards per node, ``cluster_replicas = --replicas``) of 3 nodes, in a
temp dir. For ``--duration`` seconds the main thread fires one random *event* at a time:

* ``add``    start a fresh node (at most ``--max-nodes`` serving);
* ``leave``  SIGTERM a random node (``Daemon.stop``: it hands its slots off, then exits 0);
* ``kill``   SIGKILL a random node's whole process tree (no handoff; a later ``add`` refills);
* ``freeze`` SIGSTOP a whole node (``Cluster.freeze``) for TTL + 2 s, then SIGCONT (``thaw``);
* ``etcd``   restart etcd (``EtcdServer.restart``: SIGTERM, then start on the same ports/data).

``leave`` and ``kill`` keep at least 2 nodes serving. After an event the main thread waits for
``Cluster.settled`` (every serving node installed one map naming exactly them, no handoff
pending) and records how long that took, then sleeps ``--gap`` seconds. With probability
``--overlap`` it does not wait (a ``leave`` then runs in a thread): the next event lands 0.05 to
1.5 s later, while the cluster is still moving slots, and the next settle covers both.

Meanwhile ``--writers`` threads each run a ``shardd.ClusterClient`` (``failover_timeout`` 30 s)
on their own ``--keys`` keys (``chaos:<writer>:<i>``; no other thread touches them), in a
closed loop of random ops: set (60 %) then an immediate get, delete (15 %) then an immediate
get, or a get (25 %). ``--preload N`` also writes N static keys (``pre:<n>:<i>``) before the
chaos, so that handoffs and replica copies take longer; a thread reads them round (``get_many``)
and they are read once more at the end.
Every write carries the writer's next sequence number (values are ``<writer>:<i>:<seq>``), so
a read can be judged exactly against the key's *baseline*: the last acknowledged write (set or
delete), or what a read observed since (an anomaly, or an in-doubt write, i.e. one that
raised, showing up). A read is an anomaly if it returns

* ``lost_write``          nothing, while the baseline is an acknowledged set;
* ``stale_read``          an older sequence than the baseline set's;
* ``resurrected_delete``  any older value, while the baseline is an acknowledged delete;
* ``phantom`` / ``corrupt`` a value never written to that key / that does not parse.

``immediate`` marks the get right after an acked write (read-your-writes). After an anomaly
the key's baseline becomes what was read, so one loss counts once and a later return of the
old value counts again (a resurrection). When the run ends, the cluster settles, the writers
stop, and every key is read once more (phase ``final``: lost acknowledged writes).

Exemptions (judged at the end, when every event is known): a node lost *without a handoff*
loses what it held. For ``kill`` those are the slots the victim owned or was handing over, per
the slot map in etcd and per every live node's ``topology`` just before the kill; for
``freeze``, those of them whose authority the map history in etcd (every revision of the
``map`` key, walked back) shows moving to another node while it was frozen or before the
cluster settled again. An anomaly of such a slot's key is *exempt* if the event came before the
read ended, the baseline op started before the victim was stopped, and the read returned what
the slot's new owner may rightly hold: with ``--replicas 0`` nothing (a slot gained without a
handoff starts empty: an *older* value coming back is never exempt); with ``--replicas 1`` the
key's state at some moment from ``--repl-window`` seconds (default 0.05) before the event on
(the replica's copy lags the owner by at most that). Everything else is a *violation*: printed
with the key, its slot, what was expected, what came back, the key's last ops, the slot's
owners in the maps around it and the events around it.

Also counted: the errors raised to the client, by type (the client rides MOVED, TRYAGAIN and
failovers out itself: what it raises, a user sees); client ops running longer than
failover_timeout + 3 timeouts + 15 s (*hangs*: the thread's stack is printed); nodes that died
by themselves; leaves that did not exit 0; settles that timed out; every ERROR / Traceback line
in the nodes' logs (the cluster's temp dir, kept, and its path printed, when anything failed or
with ``--keep``). Exit status 0 when nothing failed (no violation, no error raised to a
client, none of the above), 1 otherwise.

``--repro NAME[,NAME]`` (or ``all``) runs instead the minimal reproductions of failures the
chaos runs showed (``REPRODUCTIONS``): each a fresh etcd and cluster, one precise sequence of
events and a check; the exit status is 1 if any check fails.

Whatever happens (an error, Ctrl-C, SIGTERM, SIGHUP), every node is thawed and SIGKILLed as a
whole tree and etcd is stopped (``try/finally`` and an ``atexit`` hook; etcd also dies with this
process by PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import atexit
import base64
import bisect
import contextlib
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections import Counter, deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # a checkout runs without an install; tests.* are the harness

from shardd import ClusterClient  # noqa: E402
from shardd.errors import SharddError  # noqa: E402
from shardd.slots import SlotMap, slot_of  # noqa: E402

EVENTS = ("add", "leave", "kill", "freeze", "etcd")
LOSSY = ("kill", "freeze")
EXIT_OK, EXIT_FAILED = 0, 1
MAP_KEY = b"/shardd/test/map"  # Cluster names its cluster "test"; shardd.config.cluster_prefix
SET_P, DELETE_P = 0.60, 0.15   # the rest are gets
HISTORY = 8                    # ops remembered per key for the report

_now = time.monotonic


# --- the model of one key ------------------------------------------------------------------------


@dataclass(frozen=True)
class Baseline:
    """What a read of a key must return: ``seq`` (0: never written) and whether it is absent."""

    seq: int
    deleted: bool
    t_start: float     # when the op that made it started (or the read that observed it)
    t_ack: float       # when it was acknowledged (or observed)
    how: str           # "set", "delete", "observed" (after an anomaly), "in-doubt" (a failed write seen)

    def describe(self, t0: float) -> str:
        what = "absent" if self.deleted else f"seq {self.seq}"
        if self.deleted and self.seq:
            what += f" (deleted at seq {self.seq})"
        return f"{what} [{self.how}, started {self.t_start - t0:.3f}, acked {self.t_ack - t0:.3f}]"


@dataclass
class KeyState:
    index: int
    key: bytes
    slot: int
    base: Baseline = field(default_factory=lambda: Baseline(0, True, 0.0, 0.0, "initial"))
    sets: dict[int, float] = field(default_factory=dict)      # every set attempted: seq -> start
    deletes: dict[int, float] = field(default_factory=dict)   # every delete attempted: seq -> start
    doubt: dict[int, bool] = field(default_factory=dict)      # writes that raised: seq -> is delete
    history: deque[str] = field(default_factory=lambda: deque(maxlen=HISTORY))
    # every write: (start, end, seq, is delete, acknowledged), in order (the exemptions need them)
    log: list[tuple[float, float, int, bool, bool]] = field(default_factory=list)

    def states_since(self, since: float, until: float) -> set[int | None]:
        """What a copy of the key made at some moment in [since, until] can hold: its state
        after the last write acknowledged by ``since``, and after every write acknowledged
        after ``since`` or in doubt, started before ``until`` (None: absent)."""
        prev: tuple[float, float, int, bool, bool] | None = None
        for entry in self.log:
            if entry[4] and entry[1] <= since:
                prev = entry
        states: set[int | None] = {None if prev is None or prev[3] else prev[2]}
        for t_start, t_end, seq, delete, acked in self.log:
            if t_start < until and (t_end > since if acked else prev is None or t_start >= prev[0]):
                states.add(None if delete else seq)
        return states


@dataclass
class Anomaly:
    kind: str
    writer: int
    key: bytes
    slot: int
    expected: Baseline
    got: str
    t_start: float
    t_end: float
    immediate: bool
    phase: str
    history: list[str]
    got_state: int | None = None  # the seq read, None: absent (corrupt and phantom are never exempt)
    state: KeyState | None = None
    explained_by: list[int] = field(default_factory=list)


def parse_value(raw: Any, writer: int, index: int) -> int | None:
    """The sequence number in a value written by this harness for (writer, index), or None."""
    if not isinstance(raw, bytes):
        return None
    parts = raw.split(b":")
    if len(parts) != 3 or parts[0] != str(writer).encode() or parts[1] != str(index).encode():
        return None
    try:
        return int(parts[2])
    except ValueError:
        return None


def judge(state: KeyState, raw: Any, seq: int | None, t_start: float, t_end: float) -> tuple[str | None, Baseline]:
    """A read's verdict against the key's baseline: (anomaly kind or None, the new baseline)."""
    base = state.base
    if raw is None:
        if base.deleted:
            return None, base
        later_delete = [s for s, is_delete in state.doubt.items() if is_delete and s > base.seq]
        if later_delete:  # a delete that raised did apply
            return None, Baseline(max(later_delete), True, state.deletes[max(later_delete)], t_end, "in-doubt")
        return "lost_write", Baseline(base.seq, True, t_start, t_end, "observed")
    if seq is None:
        return "corrupt", base
    if seq not in state.sets:
        return "phantom", base
    if not base.deleted and seq == base.seq:
        return None, base
    if seq > base.seq:  # a write that raised did apply, or a value seen again after a stale read
        return None, Baseline(seq, False, state.sets[seq], t_end, "in-doubt" if seq in state.doubt else "observed")
    kind = "resurrected_delete" if base.deleted else "stale_read"
    if seq in state.doubt:  # a write that raised, applied after a later acknowledged one
        kind += "_late_write"
    return kind, Baseline(seq, False, t_start, t_end, "observed")


# --- events ---------------------------------------------------------------------------------------


@dataclass
class Event:
    n: int
    kind: str
    node: str
    t_begin: float
    t_stopped: float = 0.0           # kill/freeze: when the victim was stopped (SIGKILL/SIGSTOP done)
    t_end: float = 0.0               # the action done (thawed, exited, started, etcd back)
    settle_s: float | None = None
    overlapped: bool = False
    detail: str = ""
    error: str = ""
    epoch_before: int = 0
    epoch_after: int = 0
    authority: frozenset[int] = frozenset()  # kill/freeze: slots the victim owned or handed over
    lost: frozenset[int] = frozenset()       # slots whose data the event may lose (exemptions)

    def explains(self, anomaly: Anomaly, replicas: int, window: float) -> bool:
        """Whether this loss event may explain the anomaly: the event hit the key's slot before
        the read ended, the baseline op started before the victim stopped, and the read returned
        what the slot's new owner may hold: nothing (it starts empty; replicas off), or (replicas
        on) the key's state at some moment from ``window`` seconds before the event on."""
        if (anomaly.slot not in self.lost or anomaly.expected.t_start >= self.t_stopped
                or self.t_begin >= anomaly.t_end or anomaly.kind in ("corrupt", "phantom")):
            return False
        if not replicas:
            return anomaly.got_state is None
        assert anomaly.state is not None
        return anomaly.got_state in anomaly.state.states_since(self.t_begin - window, self.t_stopped)


# --- etcd: the map and its history --------------------------------------------------------------


class MapHistory:
    """Every revision of the cluster's ``map`` key in etcd (its v3 JSON gateway), by epoch; and
    when this process first saw each epoch (a thread polls the key every 0.1 s)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.maps: dict[int, SlotMap] = {}
        self.seen: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="map-poll", daemon=True)

    def _range(self, revision: int = 0) -> dict[str, Any] | None:
        body: dict[str, Any] = {"key": base64.b64encode(MAP_KEY).decode()}
        if revision:
            body["revision"] = revision
        request = urllib.request.Request(f"{self.endpoint}/v3/kv/range", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as reply:
            kvs = json.loads(reply.read()).get("kvs") or []
        return kvs[0] if kvs else None

    def current(self) -> SlotMap | None:
        try:
            kv = self._range()
        except (OSError, ValueError):
            return None
        if kv is None:
            return None
        smap = SlotMap.from_json(base64.b64decode(kv["value"]))
        with self._lock:
            self.maps.setdefault(smap.epoch, smap)
            self.seen.setdefault(smap.epoch, _now())
        return smap

    def backfill(self) -> None:
        """Walk the key's revisions back from the newest until every epoch is known."""
        try:
            kv = self._range()
            while kv is not None:
                smap = SlotMap.from_json(base64.b64decode(kv["value"]))
                with self._lock:
                    known = smap.epoch in self.maps
                    self.maps[smap.epoch] = smap
                if (known and all(e in self.maps for e in range(1, smap.epoch))) or smap.epoch <= 1:
                    return
                kv = self._range(int(kv["mod_revision"]) - 1)
        except (OSError, ValueError, KeyError) as exc:
            print(f"warning: map history incomplete: {exc!r}", file=sys.stderr)

    def epoch(self) -> int:
        smap = self.current()
        return smap.epoch if smap is not None else 0

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            self.current()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def between(self, first: int, last: int) -> list[SlotMap]:
        with self._lock:
            return [self.maps[e] for e in sorted(self.maps) if first <= e <= last]


def authority_slots(smap: SlotMap, node_id: str) -> set[int]:
    """Slots ``node_id`` owns or is handing over in ``smap``."""
    me = smap.index_of(node_id)
    if me < 0:
        return set()
    return {slot for slot, owner in enumerate(smap.owners) if owner == me} | {
        slot for slot, source in smap.handoff.items() if source == me}


def moved_away(maps: list[SlotMap], node_id: str, slots: frozenset[int]) -> frozenset[int]:
    """Of ``slots``, those that some map of ``maps`` gives to neither ``node_id`` as owner nor as source."""
    out: set[int] = set()
    for smap in maps:
        me = smap.index_of(node_id)
        for slot in slots:
            if me < 0 or (smap.owners[slot] != me and smap.handoff.get(slot) != me):
                out.add(slot)
    return frozenset(out)


def slot_story(maps: list[SlotMap], slot: int, seen: dict[int, float], t0: float) -> str:
    """The slot's owner / handoff source / replica in each map (epochs where it changed)."""
    lines, last = [], None
    for smap in maps:
        ids = [node.id.rsplit(":", 1)[-1] for node in smap.nodes]
        owner = ids[smap.owners[slot]] if smap.owners[slot] >= 0 else "-"
        source = smap.handoff.get(slot)
        replica = smap.replicas[slot] if smap.replicas else -1
        state = (owner, ids[source] if source is not None else "", ids[replica] if replica >= 0 else "")
        if state != last:
            when = f"seen {seen[smap.epoch] - t0:8.3f}" if smap.epoch in seen else "seen        ?"
            text = f"epoch {smap.epoch:4d} ({when}): owner {state[0]}"
            text += f", handoff from {state[1]}" if state[1] else ""
            text += f", replica {state[2]}" if state[2] else ""
            lines.append(text)
            last = state
    return "\n".join(lines)


# --- the workload -----------------------------------------------------------------------------------


class Writer(threading.Thread):
    """One client thread on its own keys (see the module docstring)."""

    def __init__(self, wid: int, seeds: list[str], keys: int, seed: int, timeout: float, failover: float,
                 t0: float, prefix: str = "chaos") -> None:
        super().__init__(name=f"writer-{wid}", daemon=True)
        self.wid = wid
        self.seeds = seeds
        self.timeout, self.failover = timeout, failover
        self.rng = random.Random(seed)
        self.t0 = t0
        self.keys = [KeyState(i, f"{prefix}:{wid}:{i}".encode(), slot_of(f"{prefix}:{wid}:{i}".encode()))
                     for i in range(keys)]
        self.seq = 0
        self.ops = Counter[str]()
        self.errors: Counter[str] = Counter()
        self.error_samples: list[tuple[float, str, str]] = []
        self.anomalies: list[Anomaly] = []
        self.crashes: list[str] = []
        self.busy: tuple[float, str] | None = None  # the op under way: (start, what)
        self.max_latency = (0.0, "")
        self.stopping = threading.Event()
        self.verify_only = False  # True: the thread only reads every key round (the preloaded keys)

    def run(self) -> None:
        try:
            with ClusterClient(self.seeds, timeout=self.timeout, failover_timeout=self.failover) as client:
                while self.verify_only and not self.stopping.is_set():  # the preloaded keys: read them round
                    self.sweep_many(client, phase="run", pause=0.1)
                while not self.stopping.is_set():
                    state = self.rng.choice(self.keys)
                    r = self.rng.random()
                    if r < SET_P:
                        self.write(client, state, delete=False)
                    elif r < SET_P + DELETE_P:
                        self.write(client, state, delete=True)
                    else:
                        self.read(client, state, immediate=False, phase="run")
        except Exception:  # a bug in the harness or the client library: reported, never silent
            self.crashes.append(traceback.format_exc())

    def _op(self, what: str, call: Any) -> tuple[Any, BaseException | None, float, float]:
        t_start = _now()
        self.busy = (t_start, what)
        try:
            return call(), None, t_start, _now()
        except SharddError as exc:
            return None, exc, t_start, _now()
        except Exception as exc:  # not a SharddError: a client bug, counted apart
            self.crashes.append(f"{what}: {traceback.format_exc()}")
            return None, exc, t_start, _now()
        finally:
            self.busy = None
            latency = _now() - t_start
            if latency > self.max_latency[0]:
                self.max_latency = (latency, f"{what} at {t_start - self.t0:.3f}")

    def _error(self, exc: BaseException, t: float, what: str) -> None:
        name = type(exc).__name__
        self.errors[name] += 1
        if sum(1 for _, n, _ in self.error_samples if n.startswith(name)) < 5:
            self.error_samples.append((t - self.t0, name, f"{what}: {str(exc)[:300]}"))

    def write(self, client: Any, state: KeyState, delete: bool) -> None:
        self.seq += 1
        seq = self.seq
        key = state.key
        if delete:
            state.deletes[seq] = _now()
            _, exc, t_start, t_end = self._op(f"delete {key.decode()}", lambda: client.delete(key))
        else:
            state.sets[seq] = _now()
            value = f"{self.wid}:{state.index}:{seq}".encode()
            _, exc, t_start, t_end = self._op(f"set {key.decode()}={seq}", lambda: client.set(key, value))
        what = f"{'del' if delete else 'set'} seq {seq}"
        self.ops["delete" if delete else "set"] += 1
        state.log.append((t_start, t_end, seq, delete, exc is None))
        if exc is not None:
            state.doubt[seq] = delete
            state.history.append(f"{t_start - self.t0:9.3f}..{t_end - self.t0:9.3f} {what}: "
                                 f"{type(exc).__name__} (in doubt)")
            self._error(exc, t_start, what)
            return
        state.base = Baseline(seq, delete, t_start, t_end, "delete" if delete else "set")
        state.history.append(f"{t_start - self.t0:9.3f}..{t_end - self.t0:9.3f} {what}: acked")
        self.read(client, state, immediate=True, phase="run")

    def read(self, client: Any, state: KeyState, immediate: bool, phase: str) -> None:
        key = state.key
        raw, exc, t_start, t_end = self._op(f"get {key.decode()}", lambda: client.get(key))
        self.ops["get"] += 1
        if exc is not None:
            state.history.append(f"{t_start - self.t0:9.3f}..{t_end - self.t0:9.3f} get: {type(exc).__name__}")
            self._error(exc, t_start, "get")
            return
        self.check(state, raw, t_start, t_end, immediate, phase)

    def check(self, state: KeyState, raw: Any, t_start: float, t_end: float, immediate: bool, phase: str) -> None:
        """Judge what a read returned; an anomaly is recorded, and the key's baseline moves on."""
        key = state.key
        seq = parse_value(raw, self.wid, state.index)
        kind, new = judge(state, raw, seq, t_start, t_end)
        got = "absent" if raw is None else (f"seq {seq}" if seq is not None else repr(raw[:60]))
        mark = " ANOMALY " + kind if kind else ""
        state.history.append(f"{t_start - self.t0:9.3f}..{t_end - self.t0:9.3f} get{' (ryw)' if immediate else ''}"
                             f"{' (final)' if phase == 'final' else ''}: {got}{mark}")
        if kind is not None:
            self.anomalies.append(Anomaly(kind, self.wid, key, state.slot, state.base, got, t_start, t_end,
                                          immediate, phase, list(state.history), seq, state))
        state.base = new

    def sweep(self, client: Any) -> None:
        """The final read of every key (the writers have stopped)."""
        for state in self.keys:
            self.read(client, state, immediate=False, phase="final")

    def preload(self, client: Any, chunk: int = 1000) -> None:
        """Write every key once (``set_many``), before the chaos: static keys that make handoffs
        and replica copies take longer; they are read once more at the end (``sweep_many``)."""
        for at in range(0, len(self.keys), chunk):
            part = self.keys[at:at + chunk]
            seqs = list(range(self.seq + 1, self.seq + 1 + len(part)))
            self.seq += len(part)
            t_start = _now()
            for state, seq in zip(part, seqs, strict=True):
                state.sets[seq] = t_start
            client.set_many([(state.key, f"{self.wid}:{state.index}:{seq}".encode())
                             for state, seq in zip(part, seqs, strict=True)])
            t_end = _now()
            for state, seq in zip(part, seqs, strict=True):
                state.base = Baseline(seq, False, t_start, t_end, "set")
                state.log.append((t_start, t_end, seq, False, True))
                state.history.append(f"{t_start - self.t0:9.3f}..{t_end - self.t0:9.3f} set seq {seq}: acked (preload)")
            self.ops["set"] += len(part)

    def sweep_many(self, client: Any, chunk: int = 500, phase: str = "final", pause: float = 0.0) -> None:
        """Read every key once with ``get_many`` (the final sweep, or a verifier's round)."""
        for at in range(0, len(self.keys), chunk):
            if phase != "final" and self.stopping.wait(pause):
                return
            part = self.keys[at:at + chunk]
            keys = [state.key for state in part]
            raw, exc, t_start, t_end = self._op(f"get_many of {len(part)}", partial(client.get_many, keys))
            self.ops["get"] += len(part)
            if exc is not None:
                self._error(exc, t_start, "get_many")
                continue
            for state in part:
                self.check(state, raw.get(state.key), t_start, t_end, immediate=False, phase=phase)


class Watchdog(threading.Thread):
    """Reports client ops that run far past their bound (Rule 1 of shardd.cluster_client)."""

    def __init__(self, writers: list[Writer], limit: float, t0: float) -> None:
        super().__init__(name="watchdog", daemon=True)
        self.writers, self.limit, self.t0 = writers, limit, t0
        self.hangs: list[str] = []
        self._halt = threading.Event()
        self._reported: set[tuple[int, float]] = set()

    def run(self) -> None:
        while not self._halt.wait(1.0):
            now = _now()
            for writer in self.writers:
                busy = writer.busy
                if busy is None or now - busy[0] < self.limit or (writer.wid, busy[0]) in self._reported:
                    continue
                self._reported.add((writer.wid, busy[0]))
                frame = sys._current_frames().get(writer.ident or 0)
                stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no frame)"
                self.hangs.append(f"writer {writer.wid}: {busy[1]} started at {busy[0] - self.t0:.3f} still "
                                  f"running after {now - busy[0]:.1f} s\n{stack}")

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


# --- the chaos -----------------------------------------------------------------------------------


class Chaos:
    def __init__(self, args: argparse.Namespace, etcd: Any, tmp: Path) -> None:
        from tests.cluster_harness import Cluster

        self.args = args
        self.etcd = etcd
        self.tmp = tmp
        self.rng = random.Random(args.seed)
        self.cluster = Cluster(tmp, etcd.endpoint, ttl=args.ttl, shards=args.shards, replicas=args.replicas,
                               leave_timeout=args.leave_timeout)
        self.history = MapHistory(etcd.endpoint)
        self.events: list[Event] = []
        self.gone: set[int] = set()      # ids (python id) of nodes we killed or that left
        self.leaving: dict[int, threading.Thread] = {}
        self.frozen: list[Any] = []      # processes SIGSTOPped right now
        self.crashes: list[str] = []     # nodes that died by themselves
        self.findings: list[str] = []    # settle timeouts, bad exit codes, event errors
        self.t0 = _now()
        self.writers: list[Writer] = []
        self.watchdog: Watchdog | None = None
        self.preloaded: Writer | None = None  # --preload: static keys, no thread
        self.log_limit: dict[int, int] = {}   # node (python id) -> its log's size when we killed it

    # --- helpers ---

    def active(self) -> list[Any]:
        """Nodes serving (or meant to): alive, not leaving, not killed."""
        return [n for n in self.cluster.live if id(n) not in self.gone and id(n) not in self.leaving]

    def rel(self, t: float) -> float:
        return t - self.t0

    def note(self, text: str) -> None:
        print(f"[{self.rel(_now()):8.2f}] {text}", flush=True)

    def check_crashes(self) -> None:
        for node in self.cluster.nodes:
            if (id(node) in self.gone or id(node) in self.leaving or node.proc is None
                    or node.proc.poll() is None):
                continue
            self.gone.add(id(node))
            text = f"node {node.endpoint} exited by itself with code {node.proc.returncode} (log {node.log_path})"
            self.crashes.append(text)
            self.note("CRASH: " + text)

    def authority_now(self, victim: Any) -> frozenset[int]:
        """The victim's slots per etcd's map and per every live node's installed map."""
        slots: set[int] = set()
        smap = self.history.current()
        if smap is not None:
            slots |= authority_slots(smap, victim.endpoint)
        for node in self.cluster.live:
            if id(node) in self.gone:
                continue
            installed = self.cluster.map_of(node, timeout=1.0)
            if installed is not None:
                slots |= authority_slots(installed, victim.endpoint)
        return frozenset(slots)

    def settle(self, event: Event) -> None:
        try:
            self.cluster.settled(self.active(), timeout=self.args.settle_timeout)
            event.settle_s = _now() - event.t_end
        except AssertionError as exc:
            event.error = f"not settled in {self.args.settle_timeout:.0f} s"
            text = str(exc)
            self.findings.append(f"event #{event.n} {event.kind} {event.node}: settle timed out: {text[:4000]}")
            self.note(f"event #{event.n}: SETTLE TIMEOUT {text[:300]}")

    # --- events ---

    def choose(self) -> str:
        n = len(self.active())
        allowed = set(self.args.events)
        weights = {
            "add": (4.0 if n < 3 else 1.0) if n < self.args.max_nodes else 0.0,
            "leave": 1.0 if n >= 3 else 0.0,
            "kill": 1.0 if n >= 3 else 0.0,
            "freeze": 1.0 if n >= 2 else 0.0,
            "etcd": 0.8,
        }
        kinds = [k for k in EVENTS if k in allowed and weights[k] > 0]
        if not kinds:
            return "add" if n < self.args.max_nodes else "etcd"
        return self.rng.choices(kinds, [weights[k] for k in kinds])[0]

    def fire(self, kind: str, overlap: bool) -> Event:
        event = Event(len(self.events) + 1, kind, "", _now(), overlapped=overlap)
        event.epoch_before = self.history.epoch()
        self.events.append(event)
        try:
            getattr(self, f"_do_{kind}")(event, overlap)
        except Exception as exc:  # an event that could not be carried out is a finding, not a crash
            event.error = f"{type(exc).__name__}: {str(exc)[:2000]}"
            self.findings.append(f"event #{event.n} {kind} {event.node} failed: {event.error}")
            self.note(f"event #{event.n} {kind} FAILED: {event.error[:300]}")
        if not event.t_end:
            event.t_end = _now()
        if not overlap:
            self.settle(event)
        event.epoch_after = self.history.epoch()
        settle = f"settled in {event.settle_s:.2f} s" if event.settle_s is not None else (
            "not waited (overlap)" if overlap else "NOT settled")
        self.note(f"event #{event.n} {kind} {event.node.rsplit(':', 1)[-1]}: took "
                  f"{event.t_end - event.t_begin:.2f} s, {settle}; {event.detail}")
        return event

    def _do_add(self, event: Event, overlap: bool) -> None:
        node = self.cluster.add(wait=True)
        event.node = node.endpoint
        event.t_end = _now()

    def _victim(self, event: Event) -> Any:
        node = self.rng.choice(self.active())
        event.node = node.endpoint
        return node

    def _do_leave(self, event: Event, overlap: bool) -> None:
        node = self._victim(event)
        if overlap:
            def stop() -> None:
                try:
                    code = node.stop(timeout=self.args.leave_timeout + 60)
                    if code != 0:
                        self.findings.append(f"event #{event.n} leave {node.endpoint}: exit code {code}")
                    event.detail += f" exited {code} after {_now() - event.t_begin:.2f} s"
                except AssertionError as exc:
                    self.findings.append(f"event #{event.n} leave {node.endpoint}: {str(exc)[:3000]}")
                    event.detail += " did not exit (killed)"
                finally:
                    self.gone.add(id(node))
                    self.leaving.pop(id(node), None)
            thread = threading.Thread(target=stop, name=f"leave-{event.n}", daemon=True)
            self.leaving[id(node)] = thread
            thread.start()
            event.detail = "SIGTERM, in a thread;"
            return
        self.leaving[id(node)] = threading.current_thread()
        try:
            code = node.stop(timeout=self.args.leave_timeout + 60)
        finally:
            self.gone.add(id(node))
            self.leaving.pop(id(node), None)
        event.detail = f"exited {code}"
        if code != 0:
            self.findings.append(f"event #{event.n} leave {node.endpoint}: exit code {code} (log {node.log_path})")

    def _do_kill(self, event: Event, overlap: bool) -> None:
        node = self._victim(event)
        event.authority = event.lost = self.authority_now(node)
        event.t_begin = _now()
        self.kill(node)
        event.t_stopped = event.t_end = _now()
        self.gone.add(id(node))
        event.detail = f"victim held {len(event.authority)} slots"

    def _do_freeze(self, event: Event, overlap: bool) -> None:
        node = self._victim(event)
        event.authority = self.authority_now(node)
        event.t_begin = _now()
        self.frozen = self.cluster.freeze(node)
        event.t_stopped = _now()
        left = self.args.ttl + 2.0
        while left > 0:  # the writers and the map poller run meanwhile
            time.sleep(min(left, 0.5))
            left = self.args.ttl + 2.0 - (_now() - event.t_stopped)
        self.cluster.thaw(self.frozen)
        self.frozen = []
        event.t_end = _now()
        event.detail = f"frozen {event.t_end - event.t_stopped:.2f} s, victim held {len(event.authority)} slots"

    def _do_etcd(self, event: Event, overlap: bool) -> None:
        event.node = "etcd"
        self.etcd.restart()
        event.t_end = _now()
        event.detail = "etcd restarted"

    # --- the run ---

    def start(self) -> None:
        self.history.start()
        for _ in range(3):
            self.cluster.add(wait=True)
        self.cluster.settled(timeout=self.args.settle_timeout)
        seeds = [node.endpoint for node in self.cluster.nodes]
        self.t0 = _now()
        if self.args.preload:
            self.preloaded = Writer(self.args.writers, seeds, self.args.preload, 0, self.args.client_timeout,
                                    self.args.failover, self.t0, prefix="pre")
            with ClusterClient(seeds, timeout=30.0, failover_timeout=self.args.failover) as client:
                self.preloaded.preload(client)
            self.note(f"{self.args.preload} keys preloaded")
            self.t0 = self.preloaded.t0 = _now()
        self.writers = [Writer(w, seeds, self.args.keys, self.args.seed * 1000 + w, self.args.client_timeout,
                               self.args.failover, self.t0) for w in range(self.args.writers)]
        for writer in self.writers:
            writer.start()
        if self.preloaded is not None:  # a thread reads them round, so that a loss shows near its cause
            self.preloaded.verify_only = True
            self.preloaded.start()

    def run(self) -> None:
        self.start()
        watchdog = Watchdog(self.checked(), self.args.failover + 3 * self.args.client_timeout + 15, self.t0)
        watchdog.start()
        self.watchdog = watchdog
        self.note(f"3 nodes settled; {len(self.writers)} writers started; chaos for {self.args.duration:.0f} s")
        end = self.t0 + self.args.duration
        time.sleep(min(3.0, self.args.duration))
        while _now() < end:
            self.check_crashes()
            overlap = self.rng.random() < self.args.overlap
            self.fire(self.choose(), overlap)
            self.check_crashes()
            gap = self.rng.uniform(0.05, 1.5) if overlap else self.rng.uniform(*self.args.gap)
            time.sleep(max(0.0, min(gap, end - _now())))
        # the end: every leave finished, the cluster settled, then the final sweep
        for thread in list(self.leaving.values()):
            thread.join(self.args.leave_timeout + 90)
        self.check_crashes()
        final = Event(len(self.events) + 1, "end", "", _now(), detail="final settle")
        final.t_end = final.t_begin
        final.epoch_before = self.history.epoch()
        self.events.append(final)
        self.settle(final)
        final.epoch_after = self.history.epoch()
        self.note(f"final settle: {final.settle_s if final.settle_s is not None else 'FAILED'}")
        for writer in self.checked():
            writer.stopping.set()
        for writer in self.checked():
            writer.join(self.args.failover + 3 * self.args.client_timeout + 30)
            if writer.is_alive():
                self.findings.append(f"writer {writer.wid} did not stop")
        watchdog.stop()
        seeds = [node.endpoint for node in self.active()] or [node.endpoint for node in self.cluster.nodes]
        for writer in self.writers:
            with ClusterClient(seeds, timeout=self.args.client_timeout, failover_timeout=self.args.failover) as client:
                writer.sweep(client)
        if self.preloaded is not None:
            with ClusterClient(seeds, timeout=30.0, failover_timeout=self.args.failover) as client:
                self.preloaded.sweep_many(client)

    def analyse(self) -> None:
        """Loss events' lost slots (freeze: from the map history), then each anomaly's exemption."""
        self.history.stop()
        self.history.backfill()
        last = max(self.history.maps, default=0)
        for i, event in enumerate(self.events):
            if event.kind != "freeze":
                continue
            until = next((e.epoch_before for e in self.events[i + 1:] if not e.overlapped), last)
            until = max(until, event.epoch_after)
            event.lost = moved_away(self.history.between(event.epoch_before + 1, until), event.node,
                                    event.authority)
            event.detail += f"; {len(event.lost)} of them moved (map history)"
        for writer in self.checked():
            for anomaly in writer.anomalies:
                anomaly.explained_by = [e.n for e in self.events if e.kind in LOSSY
                                        and e.explains(anomaly, self.args.replicas, self.args.repl_window)]

    # --- the report ---

    def checked(self) -> list[Writer]:
        """The writers, and the preloaded keys' pseudo-writer."""
        return [*self.writers, *([self.preloaded] if self.preloaded is not None else [])]

    def report(self) -> bool:
        t0 = self.t0
        anomalies = [a for w in self.checked() for a in w.anomalies]
        violations = [a for a in anomalies if not a.explained_by]
        exempt = [a for a in anomalies if a.explained_by]
        errors: Counter[str] = Counter()
        ops: Counter[str] = Counter()
        for writer in self.checked():
            errors.update(writer.errors)
            ops.update(writer.ops)
        client_crashes = [c for w in self.checked() for c in w.crashes]
        hangs = self.watchdog.hangs if self.watchdog is not None else []
        log_lines = self.daemon_log_problems()

        print("\n== summary ==")
        rows = [
            ("run", f"seed {self.args.seed}, {self.rel(_now()):.0f} s, replicas {self.args.replicas}, "
                    f"overlap {self.args.overlap}, {len(self.events) - 1} events"),
            ("preloaded keys", self.args.preload),
            ("client ops", ", ".join(f"{k} {v}" for k, v in sorted(ops.items())) or "0"),
            ("errors raised to the client", ", ".join(f"{k} {v}" for k, v in errors.most_common()) or "0"),
            ("client crashes (non-SharddError)", len(client_crashes)),
            ("hung client ops", len(hangs)),
            ("violations", len(violations)),
            *((f"  {kind}", n) for kind, n in sorted(Counter(a.kind for a in violations).items())),
            ("  of which read-your-writes", sum(a.immediate for a in violations)),
            ("  of which in the final sweep", sum(a.phase == "final" for a in violations)),
            ("exempt anomalies (loss events)", len(exempt)),
            *((f"  {kind}", n) for kind, n in sorted(Counter(a.kind for a in exempt).items())),
            ("nodes that died by themselves", len(self.crashes)),
            ("other findings", len(self.findings)),
            ("daemon log ERROR/Traceback lines", sum(len(lines) for _, lines in log_lines)),
            ("slowest client op", f"{self.slowest()}"),
            ("map epochs", f"{min(self.history.maps, default=0)}..{max(self.history.maps, default=0)}"),
        ]
        width = max(len(str(r[0])) for r in rows)
        for name, value in rows:
            print(f"{name:<{width}}  {value}")

        print("\n== settle times by event kind (s) ==")
        for kind in (*EVENTS, "end"):
            times = [e.settle_s for e in self.events if e.kind == kind and e.settle_s is not None]
            count = sum(1 for e in self.events if e.kind == kind)
            if count:
                spread = (f"min {min(times):.2f}  median {statistics.median(times):.2f}  max {max(times):.2f}"
                          if times else "")
                print(f"{kind:<7} {count:3d} events, {len(times):3d} waited  {spread}")

        print("\n== event log (times in s from the start of the load) ==")
        for e in self.events:
            print(self.event_line(e))

        if errors:
            print("\n== errors raised to the client (first few of each type) ==")
            for writer in self.checked():
                for t, name, text in writer.error_samples:
                    print(f"  writer {writer.wid} at {t:8.3f} {name}: {text}")
                    print(f"      around: {self.around(t + t0, before=2, after=0)}")

        if violations:
            self.print_violations(violations)
        if exempt and self.args.show_exempt:
            print(f"\n== exempt anomalies ({len(exempt)}) ==")
            for a in sorted(exempt, key=lambda a: a.t_start)[:self.args.max_report]:
                self.print_anomaly(a)

        for title, items in (("client crashes", client_crashes), ("hung client ops", hangs),
                             ("nodes that died by themselves", self.crashes), ("other findings", self.findings)):
            if items:
                print(f"\n== {title} ({len(items)}) ==")
                for item in items:
                    print(item.rstrip())
        if log_lines:
            print("\n== daemon log ERROR/Traceback lines ==")
            for path, lines in log_lines:
                print(f"{path}: {len(lines)} lines")
                for line in lines[:12]:
                    print(f"    {line}")
        return bool(violations or errors or client_crashes or hangs or self.crashes or self.findings or log_lines)

    def slowest(self) -> str:
        worst = max((w.max_latency for w in self.writers), default=(0.0, ""))
        return f"{worst[0]:.2f} s ({worst[1]})"

    def event_line(self, e: Event) -> str:
        settle = (f"settle {e.settle_s:6.2f}" if e.settle_s is not None else
                  "settle (overlap)" if e.overlapped else "settle  FAILED")
        lost = f" lost-slots {len(e.lost)}" if e.kind in LOSSY else ""
        err = f" ERROR {e.error[:200]}" if e.error else ""
        return (f"#{e.n:3d} {self.rel(e.t_begin):8.2f}..{self.rel(e.t_end):8.2f} {e.kind:<6} "
                f"{e.node.rsplit(':', 1)[-1]:<6} epochs {e.epoch_before:3d}->{e.epoch_after:3d}  {settle}{lost}  "
                f"{e.detail}{err}")

    def around(self, t: float, before: int = 3, after: int = 1) -> str:
        starts = [e.t_begin for e in self.events]
        i = bisect.bisect_right(starts, t)
        near = self.events[max(0, i - before):i + after]
        return "; ".join(f"#{e.n} {e.kind} {e.node.rsplit(':', 1)[-1]} at {self.rel(e.t_begin):.2f}" for e in near)

    def candidates(self, a: Anomaly) -> list[Event]:
        """Loss events that hit the anomaly's slot after its baseline op started, before the read ended."""
        return [e for e in self.events if e.kind in LOSSY and a.slot in e.authority and e.t_begin < a.t_end
                and e.t_stopped > a.expected.t_start]

    def print_violations(self, violations: list[Anomaly]) -> None:
        """Grouped by their latest candidate cause (the last loss event of the slot after the baseline op
        started; "none": no node of the slot was lost: a planned move or an etcd restart), a line
        per group, then the first few of each group in full."""
        groups: dict[int, list[Anomaly]] = {}
        for a in sorted(violations, key=lambda a: a.t_start):
            cause = (self.candidates(a) or [None])[-1]
            groups.setdefault(cause.n if cause is not None else 0, []).append(a)
        print(f"\n== violations ({len(violations)}), by latest candidate cause ==")
        by_n = {e.n: e for e in self.events}
        for n, items in sorted(groups.items()):
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(Counter(a.kind for a in items).items()))
            final = sum(a.phase == "final" for a in items)
            if n:
                e = by_n[n]
                ages = [e.t_begin - a.expected.t_ack for a in items]
                print(f"  after #{n} {e.kind} {e.node.rsplit(':', 1)[-1]} at {self.rel(e.t_begin):.2f}: {len(items)} "
                      f"({kinds}; {final} in the final sweep); baselines acked {min(ages) * 1000:.0f}.."
                      f"{max(ages) * 1000:.0f} ms before the event")
            else:
                print(f"  with no loss event of the slot: {len(items)} ({kinds}; {final} in the final sweep)")
        per = max(1, self.args.max_report // max(1, len(groups)))
        for n, items in sorted(groups.items()):
            print(f"\n-- {'after event #' + str(n) if n else 'with no loss event'}: first {min(per, len(items))} "
                  f"of {len(items)} --")
            for a in items[:per]:
                self.print_anomaly(a)

    def print_anomaly(self, a: Anomaly) -> None:
        t0 = self.t0
        marks = (" (read-your-writes)" if a.immediate else "") + (" (final sweep)" if a.phase == "final" else "")
        print(f"\n* {a.kind}{marks}: key {a.key.decode()} slot {a.slot} writer {a.writer}, "
              f"read {self.rel(a.t_start):.3f}..{self.rel(a.t_end):.3f}")
        print(f"  expected {a.expected.describe(t0)}")
        print(f"  got      {a.got}")
        if a.explained_by:
            print(f"  exempt by event(s) {a.explained_by}")
        for e in self.candidates(a):
            age = e.t_begin - a.expected.t_ack
            print(f"  slot was the victim's in #{e.n} {e.kind} at {self.rel(e.t_begin):.3f} "
                  f"(baseline acked {age * 1000:.1f} ms before it; moved: {a.slot in e.lost})")
        print("  events around it:")
        starts = [e.t_begin for e in self.events]
        i = bisect.bisect_right(starts, a.t_start)
        for e in self.events[max(0, i - 3):i + 1]:
            print("    " + self.event_line(e))
        print("  the key's last ops:")
        for line in a.history:
            print("    " + line)
        near = [e for e in self.events if e.t_begin <= a.t_end]
        first = near[-3].epoch_before if len(near) >= 3 else 1
        maps = self.history.between(max(1, first - 2), max(self.history.maps, default=0))
        story = slot_story(maps, a.slot, self.history.seen, t0)
        print("  the slot in the maps:")
        for line in story.splitlines()[:20]:
            print("    " + line)

    def daemon_log_problems(self) -> list[tuple[Path, list[str]]]:
        out = []
        for node in self.cluster.nodes:
            try:
                with open(node.log_path, "rb") as f:
                    text = f.read(self.log_limit.get(id(node), -1)).decode(errors="replace")
            except FileNotFoundError:
                continue
            lines = [line for line in text.splitlines() if "ERROR" in line or "Traceback" in line]
            if lines:
                out.append((node.log_path, lines))
        return out

    # --- cleanup ---

    def kill(self, node: Any) -> None:
        """SIGKILL a node's tree; what its log says after (a supervisor seeing its children die
        first) is not a finding."""
        with contextlib.suppress(OSError):
            self.log_limit.setdefault(id(node), node.log_path.stat().st_size)
        node.kill_all()

    def close(self) -> None:
        for writer in self.checked():
            writer.stopping.set()
        with contextlib.suppress(Exception):
            self.history.stop()
        if self.frozen:
            self.cluster.thaw(self.frozen)
            self.frozen = []
        for node in self.cluster.nodes:
            with contextlib.suppress(Exception):
                if node.proc is not None and node.proc.poll() is None:
                    self.cluster.thaw(self.cluster.tree(node))
            with contextlib.suppress(Exception):
                self.kill(node)
        for node in self.cluster.nodes:
            with contextlib.suppress(Exception):
                node._log.close()


_RUNNING: list[Chaos] = []


def _last_resort() -> None:
    for chaos in list(_RUNNING):
        with contextlib.suppress(Exception):
            chaos.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of chaos (default 180)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock; printed)")
    ap.add_argument("--replicas", type=int, choices=(0, 1), default=0, help="cluster_replicas (default 0)")
    ap.add_argument("--ttl", type=int, default=3, help="cluster_lease_ttl seconds (default 3)")
    ap.add_argument("--shards", type=int, default=2, help="shards per node (default 2)")
    ap.add_argument("--max-nodes", type=int, default=5, help="most nodes serving at once (default 5)")
    ap.add_argument("--writers", type=int, default=3, help="client threads (default 3)")
    ap.add_argument("--keys", type=int, default=200, help="keys per writer (default 200)")
    ap.add_argument("--preload", type=int, default=0,
                    help="static keys written once before the chaos and checked at the end: handoffs and "
                         "replica copies then take longer (default 0)")
    ap.add_argument("--client-timeout", type=float, default=3.0, help="ClusterClient timeout (default 3)")
    ap.add_argument("--failover", type=float, default=30.0, help="ClusterClient failover_timeout (default 30)")
    ap.add_argument("--gap", type=float, nargs=2, default=(1.0, 4.0), metavar=("MIN", "MAX"),
                    help="seconds between a settled event and the next (default 1 4)")
    ap.add_argument("--overlap", type=float, default=0.2,
                    help="probability that an event is not waited for before the next (default 0.2)")
    ap.add_argument("--events", type=lambda s: s.split(","), default=list(EVENTS),
                    help=f"comma-separated event kinds to use (default {','.join(EVENTS)})")
    ap.add_argument("--repl-window", type=float, default=0.05,
                    help="with --replicas 1: acks this close before a loss event may be lost (default 0.05)")
    ap.add_argument("--settle-timeout", type=float, default=120.0, help="seconds to wait for a settle (default 120)")
    ap.add_argument("--leave-timeout", type=float, default=60.0, help="cluster_leave_timeout (default 60)")
    ap.add_argument("--max-report", type=int, default=40, help="violations printed in full (default 40)")
    ap.add_argument("--show-exempt", action="store_true", help="print exempt anomalies too")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (node logs) even when all passed")
    ap.add_argument("--repro", type=lambda s: s.split(","), default=None, metavar="NAME[,NAME]",
                    help="instead of chaos, run minimal reproductions of what chaos runs found: all, or "
                         "some of " + ", ".join(REPRODUCTIONS))
    args = ap.parse_args(argv)
    if args.repro is not None and args.repro != ["all"] and set(args.repro) - set(REPRODUCTIONS):
        ap.error(f"unknown reproductions {sorted(set(args.repro) - set(REPRODUCTIONS))}")
    unknown = set(args.events) - set(EVENTS)
    if unknown:
        ap.error(f"unknown event kinds {sorted(unknown)}; choose from {','.join(EVENTS)}")
    if args.seed is None:
        args.seed = int(time.time()) % 100_000
    return args


# --- minimal reproductions (--repro NAME) ------------------------------------------------------
#
# Each is the smallest deterministic form found of a failure the chaos runs showed: a fresh etcd
# and cluster, one precise sequence of events, and a check; True when the check holds.


class _Repro:
    """A fresh etcd and Cluster in a temp dir for one reproduction; everything killed after."""

    def __init__(self, replicas: int = 0, ttl: int = 3) -> None:
        self.replicas, self.ttl = replicas, ttl
        self.tmp = Path(tempfile.mkdtemp(prefix="shardd-repro-"))

    def __enter__(self) -> _Repro:
        from tests.cluster_harness import Cluster
        from tests.etcd_server import EtcdServer

        self.etcd = EtcdServer(self.tmp / "etcd").start()
        self.cluster = Cluster(self.tmp, self.etcd.endpoint, ttl=self.ttl, replicas=self.replicas)
        _REPROS.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for node in self.cluster.nodes:
            with contextlib.suppress(Exception):
                if node.proc is not None and node.proc.poll() is None:
                    self.cluster.thaw(self.cluster.tree(node))
            with contextlib.suppress(Exception):
                node.kill_all()
        with contextlib.suppress(Exception):
            self.etcd.close()
        with contextlib.suppress(ValueError):
            _REPROS.remove(self)

    @staticmethod
    def load(seeds: list[str], items: dict[bytes, bytes]) -> None:
        pairs = list(items.items())
        with ClusterClient(seeds, timeout=30.0, failover_timeout=30.0) as client:
            for at in range(0, len(pairs), 1000):
                client.set_many(pairs[at:at + 1000])

    @staticmethod
    def read(seeds: list[str], keys: list[bytes]) -> dict[bytes, Any]:
        got: dict[bytes, Any] = {}
        with ClusterClient(seeds, timeout=30.0, failover_timeout=30.0) as client:
            for at in range(0, len(keys), 1000):
                got.update(client.get_many(keys[at:at + 1000]))
        return got

    def replicated(self, n: int, timeout: float = 60.0) -> None:
        """Wait until every key is on two nodes (its owner and its replica)."""
        deadline = _now() + timeout
        while sum(self.cluster.keys_per_node().values()) != 2 * n:
            if _now() > deadline:
                raise AssertionError("the keys never reached their replicas")
            time.sleep(0.1)

    @staticmethod
    def wait_log(nodes: list[Any], text: str, timeout: float = 60.0) -> Any:
        deadline = _now() + timeout
        while True:
            for node in nodes:
                if text in node.log():
                    return node
            if _now() > deadline:
                raise AssertionError(f"{text!r} never logged")
            time.sleep(0.002)


_REPROS: list[_Repro] = []


def _keys(n: int, prefix: str = "k") -> dict[bytes, bytes]:
    return {f"{prefix}{i}".encode(): f"v{i}".encode() for i in range(n)}


def repro_etcd_down_handoff() -> bool:
    """etcd goes away while a joining node's slots are handed to it: the sources' agents die on
    the done record's put (Agent._hand_off calls _report outside its try) and are restarted."""
    with _Repro() as r:
        a, b = r.cluster.add(), r.cluster.add()
        r.cluster.settled()
        r.load([a.endpoint], _keys(60_000))
        new = r.cluster.add()
        r.wait_log([a, b], f"keys) to {new.endpoint}")  # the first chunk is handed over
        r.etcd.stop()
        time.sleep(2.0)
        r.etcd.start()
        r.cluster.settled(timeout=120)
        crashed = [line for n in (a, b) for line in n.log().splitlines() if "cluster agent failed" in line]
        print(f"etcd stopped for 2 s after the first chunk handed to the new node; agent crashes: {len(crashed)}")
        for line in crashed:
            print("   " + line[:300])
        return not crashed


def repro_replica_join() -> bool:
    """replicas=1: a node joins and the owner of a third of the keys is SIGKILLed as soon as it
    installs the first map naming the new node. Keys acknowledged long before are lost: the new
    replica has no copy yet while the old one dropped its copy at once (cluster_view Rule 5), and
    slots being handed to the new node have their source as replica, i.e. no copy elsewhere."""
    with _Repro(replicas=1) as r:
        a, b, c = r.cluster.add(), r.cluster.add(), r.cluster.add()
        before = r.cluster.settled()
        items = _keys(30_000)
        r.load([a.endpoint], items)
        r.replicated(len(items))
        new = r.cluster.add(wait=False)
        while (smap := r.cluster.map_of(a, timeout=1.0)) is None or smap.index_of(new.endpoint) < 0:
            time.sleep(0.005)
        a.kill_all()
        new.wait_ready()
        r.cluster.settled([b, c, new], timeout=120)
        me = before.index_of(a.endpoint)
        doomed = [k for k in items if before.owners[slot_of(k)] == me]
        got = r.read([b.endpoint], doomed)
        lost = [k for k in doomed if k not in got]
        va, vn = smap.index_of(a.endpoint), smap.index_of(new.endpoint)
        why = Counter("replica is the new node" if smap.replicas[slot_of(k)] == vn else
                      "handoff source is the replica" if smap.handoff.get(slot_of(k)) == va
                      and smap.replicas[slot_of(k)] == va else "other" for k in lost)
        print(f"the victim owned {len(doomed)} keys, all on their replicas before the join; lost {len(lost)}: "
              f"{dict(why)}")
        return not lost


def repro_replica_after_join() -> bool:
    """replicas=1: a node joins, the cluster settles (every handoff done), and the new node is
    SIGKILLed at once: the keys handed to it are on no other node yet (the source, now its
    replica, gave its entries away and gets a copy back only when the new owner's agent syncs)."""
    with _Repro(replicas=1) as r:
        a, b, c = r.cluster.add(), r.cluster.add(), r.cluster.add()
        r.cluster.settled()
        items = _keys(80_000)  # more keys: a longer copy, a wider window
        r.load([a.endpoint], items)
        r.replicated(len(items))
        new = r.cluster.add()
        smap = r.cluster.settled()
        new.kill_all()  # at once: the window is the new owner's copy to its replicas (a fraction of a second)
        r.cluster.settled([a, b, c], timeout=120)
        me = smap.index_of(new.endpoint)
        doomed = [k for k in items if smap.owners[slot_of(k)] == me]
        got = r.read([a.endpoint], doomed)
        print(f"the new node owned {len(doomed)} keys when the cluster settled; lost after its SIGKILL right "
              f"then: {len(doomed) - len(got)}")
        return len(got) == len(doomed)


def repro_stream_stall() -> bool:
    """replicas=1, nodes A B C: SIGKILL C, write one key owned by A whose replica is C (A's
    replication task now waits 10 s for C's repl_apply), then 500 keys owned by A whose replica
    is B; 1 s later SIGKILL A. B, promoted, has none of the 500 (the documented window is ~5-12 ms)."""
    with _Repro(replicas=1) as r:
        a, b, c = r.cluster.add(), r.cluster.add(), r.cluster.add()
        smap = r.cluster.settled()
        ia, ib, ic = (smap.index_of(n.endpoint) for n in (a, b, c))

        def owned(replica: int, n: int, prefix: str) -> list[bytes]:
            out, i = [], 0
            while len(out) < n:
                key = f"{prefix}{i}".encode()
                i += 1
                if smap.owners[slot_of(key)] == ia and smap.replicas[slot_of(key)] == replica:
                    out.append(key)
            return out

        to_c, to_b = owned(ic, 1, "c"), owned(ib, 500, "b")
        with ClusterClient([a.endpoint], timeout=10.0) as client:
            c.kill_all()
            client.set(to_c[0], b"x")
            time.sleep(0.2)
            for key in to_b:
                client.set(key, b"acked")
        time.sleep(1.0)
        a.kill_all()
        r.cluster.settled([b], timeout=120)
        got = r.read([b.endpoint], to_b)
        print(f"keys owned by A, replica B, acked 1 s before A's SIGKILL: lost {len(to_b) - len(got)} of {len(to_b)}")
        return len(got) == len(to_b)


def repro_freeze_source_handoff() -> bool:
    """A handoff source is SIGSTOPped mid-chunk for TTL+2 s; its slots go to the new owner, where
    every key is rewritten; on SIGCONT the source's agent finishes the chunk: the entries it took
    before the freeze must not overwrite the new owner's (fixed on main in d4d64c8)."""
    with _Repro() as r:
        a, b = r.cluster.add(), r.cluster.add()
        r.cluster.settled()
        items = _keys(60_000)
        r.load([a.endpoint], items)
        new = r.cluster.add()
        source = r.wait_log([a, b], f"keys) to {new.endpoint}")
        frozen = r.cluster.freeze(source)
        t = _now()
        other = b if source is a else a
        while (smap := r.cluster.map_of(other)) is None or smap.index_of(source.endpoint) >= 0:
            time.sleep(0.05)
        r.load([other.endpoint, new.endpoint], dict.fromkeys(items, b"fresh"))
        time.sleep(max(0.0, r.ttl + 2 - (_now() - t)))
        r.cluster.thaw(frozen)
        r.cluster.settled(timeout=120)
        got = r.read([other.endpoint], list(items))
        stale = sum(1 for v in got.values() if v != b"fresh")
        print(f"froze the source mid-handoff; every key rewritten on the new owners; after the thaw "
              f"{stale} older values came back, {len(items) - len(got)} keys absent")
        return stale == 0 and len(got) == len(items)


def repro_freeze_owner_stream() -> bool:
    """replicas=1: the owner A is SIGSTOPped while writes stream to its replica B; B is promoted
    and every key is rewritten there; on SIGCONT A's agent applies what it had pulled: older
    values must not come back (fixed on main in d4d64c8)."""
    with _Repro(replicas=1) as r:
        nodes = [r.cluster.add() for _ in range(3)]
        smap = r.cluster.settled()
        time.sleep(2.0)
        a = nodes[0]
        ia = smap.index_of(a.endpoint)
        keys, i, rb = [], 0, None
        while len(keys) < 300:
            key = f"t{i}".encode()
            i += 1
            if smap.owners[slot_of(key)] == ia and rb in (None, smap.replicas[slot_of(key)]):
                rb = smap.replicas[slot_of(key)]
                keys.append(key)
        b = next(n for n in nodes if n.endpoint == smap.nodes[rb].endpoint)  # type: ignore[index]
        stop = threading.Event()

        def load() -> None:
            with ClusterClient([a.endpoint], timeout=2.0, failover_timeout=0.2) as client:
                n = 0
                while not stop.is_set():
                    with contextlib.suppress(SharddError):
                        client.set(keys[n % len(keys)], f"old{n}".encode())
                    n += 1

        thread = threading.Thread(target=load)
        thread.start()
        time.sleep(1.0)
        frozen = r.cluster.freeze(a)
        t = _now()
        stop.set()
        thread.join()
        while (m := r.cluster.map_of(b)) is None or m.index_of(a.endpoint) >= 0:
            time.sleep(0.05)
        r.load([b.endpoint], dict.fromkeys(keys, b"fresh"))
        time.sleep(max(0.0, r.ttl + 2 - (_now() - t)))
        r.cluster.thaw(frozen)
        r.cluster.settled(timeout=120)
        time.sleep(1.0)
        got = r.read([b.endpoint], keys)
        stale = sum(1 for v in got.values() if v != b"fresh")
        print(f"froze the owner under write load; 300 keys rewritten on the promoted replica; after the thaw "
              f"{stale} older values came back")
        return stale == 0 and len(got) == len(keys)


def repro_multikey_redirects() -> bool:
    """A get_many of 500 keys while slots are handed over (join, leave) raises Moved ("still
    redirected after 16 redirects"): the new owner answers ask for one slot per round (a multi-key
    part is refused as a whole with its first key's redirect) and MAX_REDIRECTS is per call."""
    with _Repro() as r:
        a = r.cluster.add()
        r.cluster.add()
        r.cluster.settled()
        items = _keys(60_000)
        r.load([a.endpoint], items)
        keys = list(items)[:500]
        errors: Counter[str] = Counter()
        calls = 0
        stop = threading.Event()

        def read() -> None:
            nonlocal calls
            with ClusterClient([a.endpoint], timeout=10.0, failover_timeout=30.0) as client:
                while not stop.is_set():
                    try:
                        got = client.get_many(keys)
                        if len(got) != len(keys):
                            errors["missing keys"] += 1
                    except SharddError as exc:
                        errors[f"{type(exc).__name__}: {str(exc)[:60]}"] += 1
                    calls += 1

        thread = threading.Thread(target=read)
        thread.start()
        try:
            for _ in range(3):  # a join, then a graceful leave of the node that joined
                node = r.cluster.add()
                r.cluster.settled(timeout=120)
                node.stop(timeout=120)
                r.cluster.settled(r.cluster.live, timeout=120)
        finally:
            stop.set()
            thread.join(60)
        print(f"{calls} get_many of 500 keys during 3 joins and leaves; errors: {dict(errors) or 0}")
        return not errors


def repro_dead_source_redirects() -> bool:
    """A handoff source is SIGKILLed mid-handoff while a client sets keys of the slots it was
    handing over, on a client already connected to it through its router (direct=False, as
    always with replicas on): the new owner answers ask (to the dead source), the ask fails at
    once (NotSent), the map is unchanged for ~TTL, and the call raises Moved after 16 redirects
    within milliseconds instead of riding the failover out (failover_timeout 30 s)."""
    with _Repro() as r:
        a, b = r.cluster.add(), r.cluster.add()
        r.cluster.settled()
        r.load([a.endpoint], _keys(60_000))
        new = r.cluster.add()
        r.wait_log([a], f"keys) to {new.endpoint}")  # a hands its first chunk over: more to come
        smap = r.cluster.map_of(new, timeout=5.0)
        assert smap is not None
        ia = smap.index_of(a.endpoint)
        pending = [s for s, source in smap.handoff.items() if source == ia]
        keys, i = [], 0
        while len(keys) < 200 and pending:
            key = f"h{i}".encode()
            i += 1
            if smap.handoff.get(slot_of(key)) == ia:
                keys.append(key)
        errors: Counter[str] = Counter()
        with ClusterClient([a.endpoint, b.endpoint, new.endpoint], timeout=3.0, failover_timeout=30.0,
                           direct=False) as client:  # as with replicas on (no direct mode there)
            client.topology()  # the map with the handoffs pending; and a connection to the source
            client.get(keys[0])  # (asked there: the source still serves it)
            a.kill_all()
            t = _now()
            for key in keys:
                try:
                    client.set(key, b"v")
                except SharddError as exc:
                    errors[f"{type(exc).__name__}: {str(exc)[:50]}"] += 1
        print(f"{len(pending)} slots pending from the killed source; {len(keys)} sets of their keys in "
              f"{_now() - t:.1f} s; errors: {dict(errors) or 0}")
        return not errors


REPRODUCTIONS = {
    "etcd-down-handoff": repro_etcd_down_handoff,
    "replica-join": repro_replica_join,
    "replica-after-join": repro_replica_after_join,
    "stream-stall": repro_stream_stall,
    "freeze-source-handoff": repro_freeze_source_handoff,
    "freeze-owner-stream": repro_freeze_owner_stream,
    "multikey-redirects": repro_multikey_redirects,
    "dead-source-redirects": repro_dead_source_redirects,
}


def run_repros(names: list[str]) -> int:
    failed = []
    for name in names:
        print(f"== {name}: {REPRODUCTIONS[name].__doc__.split(chr(10))[0]}", flush=True)
        try:
            ok = REPRODUCTIONS[name]()
        except Exception:
            print(traceback.format_exc())
            ok = False
        print(f"   {'holds' if ok else 'FAILS'}\n", flush=True)
        if not ok:
            failed.append(name)
    print(f"{len(names) - len(failed)} of {len(names)} hold; failing: {', '.join(failed) or 'none'}")
    return EXIT_FAILED if failed else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.repro:
        atexit.register(lambda: [r.close() for r in list(_REPROS)])
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
        return run_repros(list(REPRODUCTIONS) if args.repro == ["all"] else args.repro)
    from tests.etcd_server import running_etcd

    def on_signal(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    atexit.register(_last_resort)
    command = shlex.join(["python", "bench/cluster_chaos.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"{command}\nseed {args.seed}, replicas {args.replicas}, {os.cpu_count()} CPUs, "
          f"load {'/'.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="shardd-chaos-"))
    failed = True
    chaos: Chaos | None = None
    try:
        with running_etcd(tmp / "etcd") as etcd:
            chaos = Chaos(args, etcd, tmp)
            _RUNNING.append(chaos)
            try:
                chaos.run()
            except BaseException:
                print(f"chaos run aborted:\n{traceback.format_exc()}", flush=True)
                chaos.findings.append("the run was aborted: " + traceback.format_exc(limit=3))
                raise
            finally:
                chaos.close()
                with contextlib.suppress(Exception):
                    chaos.analyse()
                failed = chaos.report()
    finally:
        if chaos is not None:
            with contextlib.suppress(ValueError):
                _RUNNING.remove(chaos)
        if failed or args.keep:
            print(f"\nkept: {tmp} (node logs: {tmp}/node*/shardd.log, etcd: {tmp}/etcd/etcd.log)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{'FAILED' if failed else 'PASSED'} (seed {args.seed})")
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
