"""A shard worker: the serialized actor that owns one shard's store.

Entered through ``run_worker(config, shard_id)`` in a spawned process. The worker pins
itself to one CPU *before* it creates its transport (transport.Hub), so the ZeroMQ I/O
thread shares that core (docs/design.md, decision 3), listens on its ipc endpoint (an inbox),
and applies each Batch it receives op by op, in arrival order, answering with one
BatchReply. Between batches it runs the store's active expiry on a timer.

Invariants:
1. Every Batch gets exactly one BatchReply with exactly one reply per op, in order; the
   router matches replies by seq and position.
2. Nothing a peer sends can raise out of the loop: decoding errors and store errors become
   error replies; an unexpected exception becomes INTERNAL_ERROR and is logged.
3. SIGTERM finishes the batch in hand, then closes the transport and removes its ipc file.

Size: ~600 lines, over the ~500 aim: Shard (op application, counters, resize steps, stats,
configure) is one actor's state and is kept whole; the loops and snapshot loading are the rest.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec
import psutil

from shardd import histogram, snapshot, transport
from shardd import protocol as p
from shardd.cluster_view import ClusterView
from shardd.codec import codec_for
from shardd.config import RESTART_KEYS, Config, allowed_cpus, build_config
from shardd.errors import BadRequest, ConfigError, ExitCode, InternalError, ServerError
from shardd.hashing import shard_for, shards_for
from shardd.hot_marks import HotMarks
from shardd.hotkeys import HotKeys
from shardd.keyscan import KeyScans
from shardd.logs import setup_logging
from shardd.memory import tune_allocator
from shardd.slots import slots_of
from shardd.store import Store

log = logging.getLogger("shardd.worker")

# At most this many messages are taken from the socket before timers get a look-in.
_DRAIN_LIMIT = 256

# Batches from another worker's RESP endpoint come from a DEALER with this identity prefix
# (resp_worker.PeerLinks); they are checked as direct clients' requests, the router's are not.
PEER_IDENTITY = b"peer:"

# Rates (ops/s, service-time quantiles, hot keys) cover the last one to two windows.
WINDOW_S = 10.0

# Views of the op table (protocol.OPS).
_KEYED = p.ops_where(kind=p.KEYED)
_MOVES = p.ops_where(resize=p.MOVES)  # mid-resize, a key this shard does not hold is MOVED
_DIRECT = p.ops_where(direct=True)  # what a worker's own endpoint accepts
_CONFIG_KEYS = frozenset(Config.__struct_fields__)
_MULTI_KEYS = frozenset((p.GetMany, p.DeleteMany))
# What may change a key a near-cache client holds (hot_marks, Rule 2): every keyed write (those
# that only ask, like touch without a TTL, too: an extra invalidation costs a miss, never a stale read).
_KEYED_WRITES = p.ops_where(kind=p.KEYED, write=True)
_MULTI_WRITES = frozenset((p.SetMany, p.DeleteMany, p.SetManyNx))
# How often hot keys are re-marked, and the feed's heartbeat (hot_marks, Rule 4).
MARK_EVERY_S = 1.0
HEARTBEAT_S = 0.1


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def pin_to_cpu(shard_id: int, enabled: bool) -> int | None:
    """Pin this process to one allowed CPU, round-robin by shard id; None when not pinned."""
    if not enabled:
        return None
    cpus = allowed_cpus()
    cpu = cpus[shard_id % len(cpus)]
    try:
        psutil.Process().cpu_affinity([cpu])
    except (OSError, AttributeError, psutil.Error) as exc:
        log.warning("cannot pin to CPU %d (%s); running unpinned", cpu, exc)
        return None
    return cpu


class Shard:
    """Applies decoded ops to one Store and keeps the shard's counters.

    No sockets: the loop hands it frames and sends what it returns. Its only I/O is writing a
    snapshot file (``snapshot``), sleeping in the test-only ``debug_sleep`` and reading this
    process's RSS for ``stats``.
    """

    def __init__(self, store: Store, config: Config, shard_id: int, cpu: int | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.shard_id = shard_id
        self.cpu = cpu
        self.limits = config.limits
        self.config = config  # the settings as they are now; configure() validates against it
        self.debug_ops = config.enable_debug_ops
        self.expiry_interval_ms = config.expiry_interval_ms
        self.expiry_budget_ms = config.expiry_budget_ms
        self.ops = 0
        self._clock = clock
        self._started = clock()
        self._process = psutil.Process()
        self.shards = config.shards
        self.max_memory = config.max_memory
        # Resize state (see router.py, "Resizing"): the epoch of the topology this shard serves,
        # and while a resize runs, the shard count it is moving to and the keys left to scan.
        self.epoch = 1
        self.new_shards: int | None = None
        # Maintenance mode as the router last told us: our own endpoint refuses writes like the router.
        self.maintenance = False
        # Old shards that may still be sending this shard entries (until their migrate_done).
        self._awaiting: set[int] = set()
        self.mailbox_limit = config.mailbox_limit
        self.busy = 0  # direct requests answered BUSY
        self.direct_endpoint: str | None = None  # set once the direct socket is bound
        self.feed_endpoint: str | None = None    # the invalidation feed's, once bound (hot_marks)
        self.resp: Any = None  # this worker's RESP endpoint (resp_worker), with resp_front = "workers"
        self._to_scan: list[bytes] = []
        self._scan_at = 0
        # slot_take / slot_copy cursors: the slots walked and their keys left
        self._walks: dict[str, tuple[tuple[int, ...], list[bytes]]] = {}
        # Service time of each op inside the worker (decode, apply, encode), log-linear buckets.
        self.service = histogram.new_counts()
        self.service_sum_ns = 0
        self._window_started = self._started
        self._window_ops = 0  # ops and service counts at the start of the previous window
        self._window_service = histogram.new_counts()
        self._last = (self._started, 0, histogram.new_counts())
        self.hot: HotKeys | None = None
        # Cluster mode: a copy of the router's slot states, for requests on our own endpoint.
        self.cluster = ClusterView(config.cluster_name, config.node_id()) if config.clustered else None
        self._track: Callable[[bytes], None] | None = None  # self.hot.add, bound once (hotkeys Rule 4)
        self.scans = KeyScans(store.keys, store.exists, clock)  # the scan op's snapshots (keyscan)
        self._set_hotkeys_capacity(config.hotkeys_capacity)
        # Near caches (hot_marks): not in cluster mode, where slots move between nodes under the keys.
        self.near: HotMarks | None = None
        if config.near_cache and not config.clustered:
            self.near = HotMarks(shard_id, config.hot_key_share, config.hot_key_min_rate, config.hot_keys_max,
                                 config.near_cache_lease_ms)
            store.vanishing = self.near.touched
        self._next_marking = self._started + MARK_EVERY_S
        s = store
        # type(op) → function(op) → reply value. Built once: the dispatch is a dict lookup. Every
        # keyed, multi-key, fan-out and internal op of the op table (protocol.OPS) is here, and of
        # the router's own ops those it sends on (configure, debug_sleep); tests/unit/test_op_table.py.
        self._handlers: dict[type, Callable[[Any], Any]] = {
            p.Get: lambda op: s.get(op.key),
            p.Set: lambda op: s.set(op.key, op.value, op.ttl_ms, op.cond),
            p.Delete: lambda op: s.delete(op.key),
            p.Exists: lambda op: s.exists(op.key),
            p.Expire: lambda op: s.expire(op.key, op.ttl_ms),
            p.Ttl: lambda op: s.ttl(op.key),
            p.Persist: lambda op: s.persist(op.key),
            p.Incr: lambda op: s.incr(op.key, op.delta),
            p.Append: lambda op: s.append(op.key, op.value, self.limits.max_value_bytes),
            p.GetDel: lambda op: s.getdel(op.key),
            p.Touch: lambda op: s.touch(op.key, op.ttl_ms),
            p.Gets: lambda op: s.gets(op.key),
            p.Cas: lambda op: s.cas(op.key, op.value, op.version, op.ttl_ms),
            p.SetGet: lambda op: s.setget(op.key, op.value, op.ttl_ms, op.cond, op.keep_ttl),
            p.ExpireIf: lambda op: s.expire_if(op.key, op.ttl_ms, op.when),
            p.GetEx: lambda op: s.getex(op.key, op.ttl_ms, op.persist),
            p.Strlen: lambda op: s.strlen(op.key),
            p.NearGet: self.near_get,
            p.SetManyNx: lambda op: s.set_many_nx(op.items, op.ttl_ms),  # the router sent it whole: one shard
            p.Scan: lambda op: self.scans.scan(op.cursor, op.count, op.match),
            p.GetMany: lambda op: s.get_many(op.keys),
            p.SetMany: lambda op: s.set_many(op.items, op.ttl_ms),
            p.DeleteMany: lambda op: s.delete_many(op.keys),
            p.Flush: self.flush,
            p.Ping: lambda op: 1,  # the number of shards that answered, as through the router: this one
            p.Health: lambda op: 1,  # the router fans health out as ping; the same answer if it is not
            p.Stats: lambda op: self.stats(),
            p.Hotkeys: self.hotkeys,
            p.Snapshot: self.snapshot,
            p.DebugSleep: self._debug_sleep,
            p.Configure: self.configure,
            p.Migrate: self.migrate,
            p.MigrateOut: self.migrate_out,
            p.MigrateIn: self.migrate_in,
            p.MigrateDone: self.migrate_done,
            p.SetMaintenance: self.set_maintenance,
            p.SetTopology: self.set_topology,
            p.Describe: lambda op: {"shard": self.shard_id, "pid": os.getpid(), "direct": self.direct_endpoint,
                                   "invalidations": self.feed_endpoint},
            p.SlotTake: self.slot_take,
            p.SlotDrop: self.slot_drop,
            p.SlotPut: self.slot_put,
            p.SlotCopy: self.slot_copy,
            p.ReplRead: self.repl_read,
            p.SlotStates: self.slot_states,
        }

    def apply(self, frame: bytes, direct: bool = False) -> bytes:
        """Decode one envelope, apply it, and return the encoded reply (never raises).

        ``direct``: the request came from a client on this worker's own endpoint, not through
        the router, so it may be for a key this shard does not own (the client's topology is
        stale): that is answered MOVED, and anything but data ops is refused.
        """
        env = p.decode_envelope(frame, self.limits)
        if type(env) is bytes:
            return env
        status, value = self.run(env.op, direct)
        return p.encode_reply(env.id, status, value)

    def run(self, op: Any, direct: bool = True) -> tuple[int, Any]:
        """Apply one decoded, checked op: (status, value) (never raises). ``direct`` as for ``apply``;
        the RESP endpoint in this worker (resp_worker) runs its local ops as direct ones."""
        cls = type(op)
        if direct:
            refusal = self._direct_refusal(op, cls)
            if refusal is not None:
                return refusal
        self.ops += 1
        track = self._track
        if track is not None:
            if cls in _KEYED:
                track(op.key)
            elif cls in _MULTI_KEYS:
                deque(map(track, op.keys), 0)  # no Python loop per key
            elif cls is p.SetMany or cls is p.SetManyNx:
                deque(map(track, next(zip(*op.items, strict=True), ())), 0)
        if self.new_shards is not None and cls in _MOVES:
            key = op.key
            if shard_for(key, self.new_shards) != self.shard_id and not self.store.exists(key):
                # Moved out already, or never here: either way its new owner answers.
                return p.MOVED, {"epoch": self.epoch, "shard": shard_for(key, self.new_shards)}
        near = self.near
        if near is not None and near.marked:  # a near-cache client may hold this key (hot_marks, Rule 2)
            if cls in _KEYED_WRITES:
                near.wrote(op.key)
            elif cls in _MULTI_WRITES:
                deque(map(near.wrote, op.keys if cls is p.DeleteMany else next(zip(*op.items, strict=True), ())), 0)
        try:
            return p.OK, self._handlers.get(cls, _router_only)(op)
        except ServerError as exc:  # e.g. NotInteger from INCR: the op's own failure
            return exc.status, exc.message
        except Exception as exc:  # Invariant 2: a bug must not take the shard down.
            log.exception("internal error applying %s", cls.__name__)
            return p.INTERNAL_ERROR, f"internal error: {exc!r}"

    def apply_batch(self, frame: bytes, direct: bool = False) -> bytes | None:
        """One Batch frame in, one BatchReply frame out; None if the frame is not a Batch.
        ``direct``: from another worker's RESP endpoint (resp_worker), checked as a direct client's."""
        try:
            batch = p.decode_batch(frame)
        except Exception:
            log.warning("dropped a frame that is not a Batch (%d bytes)", len(frame))
            return None
        self.store.touch_clock()
        apply = self.apply
        perf = time.perf_counter_ns
        counts = self.service
        replies = []
        append = replies.append
        start = perf()
        t0 = start
        for raw in batch.ops:
            append(apply(bytes(raw), direct))
            t1 = perf()
            v = (t1 - t0) | 8  # histogram.bucket_of, inlined: this runs once per op
            b = v.bit_length()
            counts[(b << 2) | ((v >> (b - 3)) & 3)] += 1
            t0 = t1
        self.service_sum_ns += t0 - start
        return p.encode_batch_reply(batch.seq, replies)

    def tick(self) -> None:
        """Timer work between batches: start a new rate window when the current one is over, re-mark hot keys."""
        now = self._clock()
        if now >= self._next_marking:
            self._next_marking = now + MARK_EVERY_S
            self.mark_hot(now)
        if now - self._window_started >= WINDOW_S:
            self._last = (self._window_started, self._window_ops, self._window_service)
            self._window_started, self._window_ops, self._window_service = now, self.ops, list(self.service)
            if self.hot is not None:
                self.hot.rotate(now)
            self.scans.prune(now)  # idle scans give their snapshots back even if no scan comes again
            # Entries are long-lived and never form reference cycles, but the cyclic GC still
            # walks them all in every full collection: with a million keys that is a pause of
            # 70-250 ms on this machine. Freezing moves what exists now out of its reach, so a
            # full collection only walks objects made since the last window.
            gc.freeze()

    def _direct_refusal(self, op: Any, cls: type) -> tuple[int, Any] | None:
        """MOVED or TRYAGAIN for keys this shard must not answer for; BAD_REQUEST for router-only ops."""
        if cls not in _DIRECT:
            return p.BAD_REQUEST, f"{cls.__struct_config__.tag} goes to the router, not to a shard's own endpoint"
        if self.maintenance and p.is_write(p.OPS[cls], op):
            return p.MAINTENANCE, "the daemon is in maintenance mode: writes are refused, reads work; retry later"
        cluster = self.cluster
        if cluster is not None and cls is not p.Ping and cls is not p.DebugSleep:
            # A cluster node: only keys of slots the node serves now (the router's states, pushed
            # on the same FIFO link as the handoff steps, so a frozen slot is frozen here first).
            if cls in _KEYED:
                refusal = cluster.refusal(op.key, time.monotonic())
            else:
                keys = next(zip(*op.items, strict=True), ()) if cls is p.SetMany else op.keys
                refusal = cluster.refusal_many(list(keys), time.monotonic())
            if refusal is not None:
                return refusal
        shards, me = self.shards, self.shard_id
        if cls in _KEYED:
            keys: Any = (op.key,)
            owners: Any = (shard_for(op.key, shards),)
        else:  # a multi-key op: every key placed in one call (hashing.shards_for)
            keys = next(zip(*op.items, strict=True), ()) if cls is p.SetMany else getattr(op, "keys", ())
            owners = shards_for(keys, shards)
        if self.new_shards is None:
            if owners.count(me) == len(owners):
                return None
            owner = next(owner for owner in owners if owner != me)
            return p.MOVED, {"epoch": self.epoch, "shard": owner}
        for key, owner in zip(keys, owners, strict=True):
            refusal = self._refusal_while_resizing(key, owner)
            if refusal is not None:
                return refusal
        return None

    def _refusal_while_resizing(self, key: bytes, old_owner: int) -> tuple[int, Any] | None:
        """Whether a direct client may have ``key`` answered here while a resize runs.

        We answer for keys we hold. A key we do not hold is answered MOVED if another shard
        will own it. If we will own it but it belonged to another shard, its entry may still be
        on the way (taken from the old owner, not yet adopted here): answering now could
        acknowledge a write that the arriving entry then overwrites, or miss a value that
        exists. So until that old owner's ``migrate_done`` has arrived it is TRYAGAIN, which
        applies nothing; the router path stays correct because the router sends a moved entry
        to its new owner before anything it re-routes there (see shardd.migration).
        """
        if self.store.exists(key):
            return None
        new_owner = shard_for(key, self.new_shards)
        if new_owner != self.shard_id:
            return p.MOVED, {"epoch": self.epoch, "shard": new_owner}
        if old_owner in self._awaiting:
            return p.TRYAGAIN, (f"shard {self.shard_id} owns this key once the resize to {self.new_shards} "
                                f"shards ends, and its entry may still be on its way from shard {old_owner}; "
                                f"send it through the router, or retry")
        return None

    # --- resizing (the router drives it; see router.py) --------------------------------

    def migrate(self, op: p.Migrate) -> int:
        """Enter migrating mode; returns the number of keys to scan."""
        if self.near is not None:
            self.near.reset()  # keys are about to move: clients drop this shard's copies (hot_marks, Rule 3)
        self.shards, self.new_shards, self.epoch = op.shards, op.new_shards, op.epoch
        self._awaiting = set(range(op.shards)) - {self.shard_id}
        self._to_scan = self.store.keys()  # keys made later are never created here (MOVED)
        self._scan_at = 0
        return len(self._to_scan)

    def migrate_out(self, op: p.MigrateOut) -> dict[str, Any]:
        """Remove and return live entries whose new owner is another shard (bounded work per call)."""
        if self.new_shards is None:
            raise BadRequest("migrate_out without migrate")
        keys, at, end = self._to_scan, self._scan_at, min(len(self._to_scan), self._scan_at + op.scan)
        new_shards, me, take = self.new_shards, self.shard_id, self.store.take
        entries = []
        while at < end and len(entries) < op.limit:
            key = keys[at]
            at += 1
            if shard_for(key, new_shards) != me:
                entry = take(key)
                if entry is not None:
                    entries.append((key, *entry))
        self._scan_at = at
        done = at >= len(keys)
        if done:
            self._to_scan = []
        return {"entries": entries, "done": done}

    def migrate_in(self, op: p.MigrateIn) -> int:
        """Adopt entries moved here; returns how many fit (the rest broke the memory bound)."""
        adopted = self.store.restore_many(op.entries, len(op.entries))
        gc.freeze()  # a resize adopts entries in bulk: keep them out of full collections (see tick)
        return adopted

    # --- cluster handoffs (docs/cluster.md; the router orders them with client requests) ----

    def _keys_in(self, slots: list[int]) -> list[bytes]:
        wanted = frozenset(slots)
        keys = self.store.keys()
        return [key for key, slot in zip(keys, slots_of(keys), strict=True) if slot in wanted]

    def _walk(self, walk: str, slots: list[int], limit: int, read: Callable[[bytes], Any]) -> dict[str, Any]:
        """Up to ``limit`` live entries of ``slots`` as ``read`` (take or peek) gives them, TTLs as
        time left. The key list is made once per set of slots and consumed across calls (``walk``
        names the cursor: a take and a copy may run at once); no key of a slot being taken is
        created meanwhile, as the router froze it first."""
        wanted = tuple(slots)
        cursor = self._walks.get(walk)
        if cursor is None or cursor[0] != wanted:
            cursor = self._walks[walk] = (wanted, self._keys_in(slots))
        keys, now = cursor[1], monotonic_ms()
        entries = []
        while keys and len(entries) < limit:
            key = keys.pop()
            entry = read(key)
            exported = self._exported(key, entry, now) if entry is not None else None
            if exported is not None:  # (expired: nothing to hand over)
                entries.append(exported)
        if not keys:
            del self._walks[walk]
        return {"entries": entries, "more": bool(keys)}

    def slot_take(self, op: p.SlotTake) -> dict[str, Any]:
        """Remove and return up to ``limit`` live entries of these slots (a handoff)."""
        return self._walk("take", op.slots, op.limit, self.store.take)  # type: ignore[arg-type]

    def slot_drop(self, op: p.SlotDrop) -> int:
        """Delete every entry of these slots (a slot about to be served from empty, or imported)."""
        self._walks.clear()
        take = self.store.take
        return sum(1 for key in self._keys_in(op.slots) if take(key) is not None)

    def slot_put(self, op: p.SlotPut) -> int:
        """Store entries another node handed over (TTLs as time left, CAS versions kept), and
        delete the keys a replication stream says were deleted."""
        now = monotonic_ms()
        entries = [(key, value, now + ttl if ttl > 0 else 0, version) for key, value, ttl, version in op.entries]
        take = self.store.take
        for key in op.deleted:  # type: ignore[union-attr]
            take(key)
        return self.store.restore_many(entries, len(entries))

    def _exported(self, key: bytes, entry: tuple[bytes, int, int], now: int) -> tuple[bytes, bytes, int, int] | None:
        value, deadline, version = entry
        if deadline and deadline <= now:
            return None
        return key, value, deadline - now if deadline else 0, version

    def slot_copy(self, op: p.SlotCopy) -> dict[str, Any]:
        """Up to ``limit`` live entries of these slots, left in place (a replica's first copy)."""
        return self._walk("copy", op.slots, op.limit, self.store.peek)  # type: ignore[arg-type]

    def repl_read(self, op: p.ReplRead) -> dict[str, Any]:
        """These keys as they are now: the entries that live, the keys that do not (deleted)."""
        peek, now = self.store.peek, monotonic_ms()
        entries, deleted = [], []
        for key in op.written:
            entry = peek(key)
            exported = self._exported(key, entry, now) if entry is not None else None
            if exported is None:
                deleted.append(key)
            else:
                entries.append(exported)
        return {"entries": entries, "deleted": deleted}

    def slot_states(self, op: p.SlotStates) -> bool:
        """The router's view of which slots the node serves (direct mode on a cluster node)."""
        if self.cluster is not None:
            if op.states is not None:
                self.cluster.load(op.states)
            self.cluster.valid_until = op.valid_until
        return True

    def set_maintenance(self, op: p.SetMaintenance) -> bool:
        self.maintenance = op.on
        return True

    def migrate_done(self, op: p.MigrateDone) -> bool:
        """Every entry moving here from ``op.source`` has been adopted: its keys are ours to answer."""
        self._awaiting.discard(op.source)
        return True

    def set_topology(self, op: p.SetTopology) -> bool:
        self.epoch, self.shards, self.new_shards = op.epoch, op.shards, None
        self._to_scan = []
        self._awaiting = set()
        self.set_memory(self.max_memory)  # the share changes with the shard count
        return True

    def set_memory(self, max_memory: int | None = None, policy: str | None = None) -> int:
        """Apply the daemon's ``max_memory`` (this shard gets its share) and/or eviction policy."""
        if max_memory is not None:
            self.max_memory = max_memory
        max_bytes = None if max_memory is None else max_memory // max(1, self.shards)
        return self.store.configure(max_bytes, policy)

    def flush(self, op: p.Flush) -> int:
        if self.near is not None:
            self.near.reset()
        return self.store.flush()

    def near_get(self, op: p.NearGet) -> tuple[bytes | None, int, int, int, int]:
        """A GET that says whether the client may keep the value (protocol.NearGet, hot_marks)."""
        key = op.key
        if op.hits and self.hot is not None:
            self.hot.credit(key, op.hits)
        value = self.store.get(key)
        near = self.near
        if near is None:  # -1: this daemon has no near caches; the client stops asking
            return value, -1, self.shard_id, 0, 0
        lease = 0
        if value is not None and key in near.marked and self.new_shards is None:
            lease = near.lease(key, self.store.ttl(key))
        return value, lease, self.shard_id, near.incarnation, near.seq

    def mark_hot(self, now: float) -> None:
        """Re-mark this shard's hot keys from the last one to two windows' rates (hot_marks, Rule 1)."""
        near, hot = self.near, self.hot
        if near is None:
            return
        if hot is None or self.new_shards is not None:  # no counts, or keys on the move: nothing is hot
            if near.marked:
                near.evaluate([], 0.0, now)
            return
        span, rows = hot.top(max(2 * near.max_keys, 16), now)
        base = self._last[1] if hot.previous is not None else self._window_ops
        near.evaluate([(key, rate) for key, rate, _, _ in rows], (self.ops - base) / span, now)

    def hotkeys(self, op: p.Hotkeys) -> dict[str, Any]:
        """This shard's top keys; with near caches on, also "hot" (those of them marked for near
        caches) and "marked" (how many keys it has marked in all, listed or not)."""
        if self.hot is None:
            reply: dict[str, Any] = {"top": op.top, "window_s": 0.0, "keys": []}
        else:
            span, rows = self.hot.top(op.top, self._clock())
            reply = {"top": op.top, "window_s": round(span, 3),
                     "keys": [[key, round(rate, 3), count, error] for key, rate, count, error in rows]}
        near = self.near
        if near is not None:
            reply["hot"] = [row[0] for row in reply["keys"] if row[0] in near.marked]
            reply["marked"] = len(near.marked)
        return reply

    def stats(self) -> dict[str, Any]:
        s = self.store
        now = self._clock()
        since, ops_then, service_then = self._last
        recent = histogram.delta(self.service, service_then)
        p50, p99 = histogram.quantile(recent, 0.5), histogram.quantile(recent, 0.99)
        return {
            "max_bytes": s.max_bytes,
            "policy": s.policy,
            "expiring": s.expiring,
            "evicted": s.evicted,
            "evictions": dict(s.evictions),
            "oom_rejected": s.oom_rejected,
            "ops_per_s": round((self.ops - ops_then) / max(now - since, 1e-3), 1),
            "service_p50_us": None if p50 is None else round(p50 / 1000, 1),
            "service_p99_us": None if p99 is None else round(p99 / 1000, 1),
            "service_count": sum(self.service),
            "service_sum_s": self.service_sum_ns / 1e9,
            "service_buckets": histogram.cumulative(self.service),
            "shard": self.shard_id,
            "pid": os.getpid(),
            "cpu": self.cpu,
            "keys": len(s),
            "used_bytes": s.used_bytes,
            "arena_bytes": s.arena_bytes,
            "garbage_bytes": s.garbage_bytes,
            "index_bytes": s.index_bytes,
            "aside_bytes": s.aside_bytes,
            "compressed_keys": s.packed_keys,
            "compressed_raw_bytes": s.packed_raw_bytes,
            "compressed_bytes": s.packed_bytes,
            "rss_bytes": self._process.memory_info().rss,
            **({"near": self.near.stats()} if self.near is not None else {}),
            **({"resp": self.resp.stats()} if self.resp is not None else {}),
            "ops": self.ops,
            "hits": s.hits,
            "misses": s.misses,
            "sets": s.sets,
            "deletes": s.deletes,
            "expired": s.expired,
            "uptime_s": round(self._clock() - self._started, 3),
        }

    def snapshot(self, op: p.Snapshot) -> dict[str, Any]:
        """Write this shard's live keys to ``op.directory`` (TTLs as wall-clock deadlines)."""
        started = time.perf_counter()
        wall_now, mono_now = time.time_ns() // 1_000_000, monotonic_ms()
        to_wall = wall_now - mono_now
        entries = [(key, value, expires + to_wall if expires else 0, version)
                   for key, value, expires, version in self.store.export()]
        data = snapshot.encode(entries, self.shard_id, self.shards, wall_now)
        try:
            snapshot.write_atomic(snapshot.shard_file(op.directory, self.shard_id), data)
        except OSError as exc:
            raise InternalError(f"shard {self.shard_id}: cannot write snapshot: {exc}") from None
        seconds = time.perf_counter() - started
        log.info("snapshot: %d keys, %d bytes in %.3f s", len(entries), len(data), seconds)
        return {"shard": self.shard_id, "keys": len(entries), "bytes": len(data), "seconds": round(seconds, 3)}

    def configure(self, op: p.Configure) -> list[str]:
        """Apply live settings (SIGHUP reload, tune); returns the keys applied here.

        config.SETTINGS says which keys a worker applies (WORKER_LIVE, every one handled below);
        other live keys are only kept in ``config``, and a restart-only key is BAD_REQUEST. Values
        are validated like the config file's first (BAD_REQUEST and nothing changed if one is
        wrong): the sender is trusted, but a bad value must not poison the shard.
        """
        restart = sorted(k for k in op.settings if k in RESTART_KEYS)
        if restart:
            raise BadRequest(f"configure: {', '.join(restart)} only take effect after a restart")
        known = {k: v for k, v in op.settings.items() if k in _CONFIG_KEYS}
        try:
            checked = build_config({**msgspec.structs.asdict(self.config), **known})
        except ConfigError as exc:
            raise BadRequest(f"configure: {exc}") from None
        self.config = checked
        settings = {k: getattr(checked, k) for k in known}
        applied = []
        if "log_level" in settings:
            logging.getLogger().setLevel(str(settings["log_level"]).upper())
            applied.append("log_level")
        for key in ("expiry_interval_ms", "expiry_budget_ms"):
            if key in settings:
                setattr(self, key, int(settings[key]))
                applied.append(key)
        limits = {k: settings[k] for k in ("max_key_bytes", "max_value_bytes", "max_message_bytes") if k in settings}
        if limits:
            self.limits = msgspec.structs.replace(self.limits, **limits)
            applied.extend(limits)
        if "hotkeys_capacity" in settings:
            self._set_hotkeys_capacity(int(settings["hotkeys_capacity"]))
            applied.append("hotkeys_capacity")
        near_keys = [k for k in ("hot_key_share", "hot_key_min_rate", "hot_keys_max", "near_cache_lease_ms")
                     if k in settings]
        if near_keys and self.near is not None:  # taken at the next marking (hot_marks, Rule 1)
            near = self.near
            near.share, near.min_rate = checked.hot_key_share, checked.hot_key_min_rate
            near.max_keys, near.lease_ms = checked.hot_keys_max, checked.near_cache_lease_ms
        applied.extend(near_keys)
        if "mailbox_limit" in settings:  # bounds what direct clients may queue here
            self.mailbox_limit = int(settings["mailbox_limit"])
            applied.append("mailbox_limit")
        compression = [k for k in ("compression", "compression_min_bytes", "compression_min_saving") if k in settings]
        if compression:
            c = checked
            self.store.configure(codec=codec_for(c.compression, c.compression_min_bytes, c.compression_min_saving))
            applied.extend(compression)
        memory = [k for k in ("max_memory", "eviction_policy") if k in settings]
        if memory:
            self.set_memory(settings.get("max_memory"), settings.get("eviction_policy"))
            applied.extend(memory)
        return applied

    def _set_hotkeys_capacity(self, capacity: int) -> None:
        """Track up to ``capacity`` hot keys (0: off); counts so far are kept when it only changes."""
        if not capacity:
            self.hot = None
        elif self.hot is None:
            self.hot = HotKeys(capacity, WINDOW_S, self._clock())
        else:
            self.hot.resize(capacity)
        self._track = self.hot.add if self.hot is not None else None

    def _debug_sleep(self, op: p.DebugSleep) -> bool:
        if not self.debug_ops:
            raise BadRequest("debug_sleep is disabled (enable_debug_ops = false)")
        time.sleep(op.ms / 1000)
        return True


def run_worker(config: Config, shard_id: int) -> int:
    """Serve shard ``shard_id`` until SIGTERM; the entry point of a worker process."""
    setup_logging(config.log_level, f"worker {shard_id}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which orders the stop
    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    wakeup = transport.signal_wakeup_pipe([signal.SIGTERM], on_term)
    cpu = pin_to_cpu(shard_id, config.pin_cpus)  # before the Hub: its Context's I/O thread inherits the mask
    hub = transport.Hub(transport.ServerAuth(config.auth_dir) if config.auth_dir and config.direct else None)
    try:
        try:
            inbox = hub.worker_inbox(config.worker_endpoint(shard_id))
        except transport.BindError as exc:
            log.error("%s", exc)
            return ExitCode.BOOT_FAILED
        direct = None
        if config.direct:
            try:
                direct = hub.direct_inbox(config.direct_host(), config.max_message_bytes)
            except transport.BindError as exc:
                log.error("%s; direct clients will use the router", exc)
        tune_allocator()
        store = Store(monotonic_ms, max_bytes=config.shard_max_bytes(config.shards), policy=config.eviction_policy,
                      codec=codec_for(config.compression, config.compression_min_bytes, config.compression_min_saving))
        if config.state_dir:
            load_snapshot(store, config, shard_id)
        shard = Shard(store, config, shard_id, cpu)
        if direct is not None:
            shard.direct_endpoint = direct.endpoint
        feed = None
        if shard.near is not None:
            try:
                feed = hub.publisher(config.direct_host())
                shard.feed_endpoint = feed.endpoint
            except transport.BindError as exc:
                log.error("%s; no near caches for this shard", exc)
                shard.near = store.vanishing = None
        if config.resp_bind and config.resp_front == "workers":
            try:
                shard.resp = _start_resp(config, shard, hub)
            except OSError as exc:
                log.error("%s", exc.strerror or exc)
                return ExitCode.BOOT_FAILED
        log.info("serving shard %d on %s (cpu %s)", shard_id, config.worker_endpoint(shard_id), cpu)
        try:
            _serve(hub, inbox, shard, wakeup, lambda: stopping, direct, feed)
        finally:
            if shard.resp is not None:
                shard.resp.close()
    finally:
        transport.remove_ipc_file(config.worker_endpoint(shard_id))
        hub.close()
    log.info("stopped")
    return ExitCode.OK


def _start_resp(config: Config, shard: Shard, hub: transport.Hub) -> Any:
    """This worker's share of the RESP endpoint (resp_worker): SO_REUSEPORT on resp_bind, and a
    link to the router's control endpoint for what is not this shard's."""
    from shardd.resp_server import RespServer
    from shardd.resp_worker import RouterLink, WorkerFront

    channel = hub.shard_channel(config.control_endpoint())
    link = RouterLink(channel)
    hub.watch(channel, link.on_readable, link.on_event)

    def connect_peer(owner: int) -> Any:
        return hub.shard_channel(config.worker_endpoint(owner), PEER_IDENTITY + b"%d" % shard.shard_id)

    front = WorkerFront(shard, link, connect_peer, hub.watch)
    return RespServer(config, front, hub, reuse_port=True)


def _serve(hub: transport.Hub, inbox: transport.ClientInbox, shard: Shard, wakeup: int,
           should_stop: Callable[[], bool], direct: transport.ClientInbox | None = None,
           feed: transport.Publisher | None = None) -> None:
    apply_batch, send = shard.apply_batch, inbox.send
    publish = _publisher(shard, feed)

    def on_batches() -> None:
        for peer, frame, _, _ in inbox.receive(_DRAIN_LIMIT):  # extra frames are dropped
            reply = apply_batch(frame, peer.startswith(PEER_IDENTITY))
            if reply is not None:
                publish()  # invalidations before the acknowledgements (hot_marks, Rule 2)
                send(peer, reply)

    hub.watch(inbox, on_batches)
    hub.watch_fd(wakeup, lambda: transport.drain_fd(wakeup))
    if direct is not None:
        hub.watch(direct, lambda: _serve_direct(direct, shard, publish))
    heartbeat_every_ms = int(HEARTBEAT_S * 1000)
    next_heartbeat = 0 if feed is not None else 1 << 62
    if feed is not None and shard.near is not None:
        near = shard.near

        def greet() -> None:  # a new subscriber learns the feed's sequence number at once
            if feed.subscriptions():
                feed.send(near.heartbeat())

        hub.watch(feed, greet)
    active_expire, maintain = shard.store.active_expire, shard.store.maintain
    next_expiry = monotonic_ms() + shard.expiry_interval_ms
    resp = shard.resp
    while not should_stop():
        hub.poll(max(0, min(next_expiry, next_heartbeat) - monotonic_ms()))
        if resp is not None:
            resp.router.flush_outboxes()  # this pass's ops for other shards, one batch per shard
            publish()
            resp.flush()
        now = monotonic_ms()
        if now >= next_expiry:
            active_expire(shard.expiry_budget_ms)
            maintain()  # segment cleaning between batches, so that writes seldom pay for it
            shard.tick()
            next_expiry = now + shard.expiry_interval_ms
            publish()  # what expiry, eviction and re-marking queued
        if now >= next_heartbeat and feed is not None and shard.near is not None:
            publish()
            feed.send(shard.near.heartbeat())
            next_heartbeat = now + heartbeat_every_ms


def _publisher(shard: Shard, feed: transport.Publisher | None) -> Callable[[], None]:
    """A function that sends the invalidations the shard owes, if any (hot_marks, Rule 2)."""
    near = shard.near
    if feed is None or near is None:
        return lambda: None
    take, send = near.take, feed.send

    def publish() -> None:
        if near.pending or near.all_pending:
            send(take())  # type: ignore[arg-type]

    return publish


def _serve_direct(inbox: transport.ClientInbox, shard: Shard, publish: Callable[[], None]) -> None:
    """Requests from direct-mode clients: one envelope per frame, one reply each.

    The mailbox limit holds here too: of the requests waiting when we look, those past
    ``mailbox_limit`` are answered BUSY at once instead of being queued behind the rest.
    As in the router (its Rule 5), a peer past mailbox_limit/8 messages in this pass counts
    against 7/8 of the limit, and those within it are always served (the pass itself is
    bounded), so a flooder's backlog never turns a light client's request into BUSY.
    A client that left or stopped reading loses its reply, never blocks the shard.
    """
    limit = shard.mailbox_limit
    fair_share = limit >> 3
    seen: dict[bytes, int] = {}
    taken = []
    for peer, frame, extra, _ in inbox.receive(limit + _DRAIN_LIMIT):
        sent = seen[peer] = seen.get(peer, 0) + 1
        taken.append((peer, frame, extra, sent > fair_share))
    if not taken:
        return
    shard.store.touch_clock()
    apply, send = shard.apply, inbox.send
    admitted = 0
    for peer, frame, extra, heavy in taken:
        if extra:
            reply = p.encode_reply(p.salvage_id(frame), p.BAD_REQUEST,
                                   f"a request must be exactly one frame; got {extra} extra frame(s)")
        elif heavy and admitted >= limit - fair_share:
            shard.busy += 1
            reply = p.encode_reply(p.salvage_id(frame), p.BUSY,
                                   f"shard {shard.shard_id} has more than {limit} requests waiting "
                                   f"(mailbox_limit); back off and retry")
        else:
            admitted += 1
            reply = apply(frame, True)
            publish()  # invalidations before the acknowledgement (hot_marks, Rule 2)
        send(peer, reply)


def load_snapshot(store: Store, config: Config, shard_id: int) -> int:
    """Load the keys this shard owns from the current snapshot generation, if there is one.

    Every file of the generation is read (the writer may have had another shard count) and
    entries are kept if ``shard_for`` places them here; those that expired while the daemon
    was down are dropped. A bad file is logged and skipped, never half-loaded.
    """
    generation = snapshot.current(config.state_dir)
    if generation is None:
        return 0
    started = time.perf_counter()
    wall_now, mono_now = time.time_ns() // 1_000_000, monotonic_ms()
    to_mono = mono_now - wall_now
    shards = config.shards
    loaded = expired = 0
    for name, data in snapshot.read_generation(generation):
        try:
            header = snapshot.peek_header(data, name)
            # Same shard count as the writer: placement is unchanged, so only our own file
            # holds our keys and nothing needs re-hashing.
            same_layout = header["shards"] == shards
            if same_layout and header["shard"] != shard_id:
                continue
            _, entries = snapshot.decode(data, name)
        except snapshot.SnapshotError as exc:
            log.error("snapshot %s not loaded: %s", os.path.basename(generation), exc)
            continue
        fresh = []
        for key, value, expires, version in entries:
            if not same_layout and shard_for(key, shards) != shard_id:
                continue
            if expires and expires <= wall_now:
                expired += 1
                continue
            fresh.append((key, value, expires + to_mono if expires else 0, version))
        loaded += store.restore_many(fresh, len(fresh))
    gc.freeze()  # see Shard.tick
    log.info("loaded %d keys from snapshot %s in %.3f s (%d had expired while down)",
             loaded, os.path.basename(generation), time.perf_counter() - started, expired)
    return loaded


def _router_only(op: p.Op) -> None:
    raise BadRequest(f"{type(op).__struct_config__.tag} is answered by the router, not by a shard")
