"""A shard worker: the serialized actor that owns one shard's store.

Entered through ``run_worker(config, shard_id)`` in a spawned process. The worker pins
itself to one CPU *before* it creates its ZeroMQ Context, so the Context's I/O thread
shares that core (DESIGN.md fixed decision 3), binds a ROUTER socket on its ipc endpoint,
and applies each Batch it receives op by op, in arrival order, answering with one
BatchReply. Between batches it runs the store's active expiry on a timer.

Invariants:
1. Every Batch gets exactly one BatchReply with exactly one reply per op, in order; the
   router matches replies by seq and position.
2. Nothing a peer sends can raise out of the loop: decoding errors and store errors become
   error replies; an unexpected exception becomes INTERNAL_ERROR and is logged.
3. SIGTERM finishes the batch in hand, then closes the socket (which removes its ipc file).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import psutil

from shardd import protocol as p
from shardd import transport
from shardd.config import Config, allowed_cpus
from shardd.errors import BadRequest, ExitCode, ServerError
from shardd.logs import setup_logging
from shardd.store import Store

log = logging.getLogger("shardd.worker")

# At most this many messages are taken from the socket before timers get a look-in.
_DRAIN_LIMIT = 256


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
    """Applies decoded ops to one Store and keeps the shard's counters. No I/O."""

    def __init__(self, store: Store, config: Config, shard_id: int, cpu: int | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.shard_id = shard_id
        self.cpu = cpu
        self.limits = config.limits
        self.debug_ops = config.enable_debug_ops
        self.ops = 0
        self._clock = clock
        self._started = clock()
        self._process = psutil.Process()
        s = store
        # type(op) → function(op) → reply value. Built once: the dispatch is a dict lookup.
        self._handlers: dict[type, Callable[[Any], Any]] = {
            p.Get: lambda op: s.get(op.key),
            p.Set: lambda op: s.set(op.key, op.value, op.ttl_ms, op.cond),
            p.Delete: lambda op: s.delete(op.key),
            p.Exists: lambda op: s.exists(op.key),
            p.Expire: lambda op: s.expire(op.key, op.ttl_ms),
            p.Ttl: lambda op: s.ttl(op.key),
            p.Persist: lambda op: s.persist(op.key),
            p.Incr: lambda op: s.incr(op.key, op.delta),
            p.Gets: lambda op: s.gets(op.key),
            p.Cas: lambda op: s.cas(op.key, op.value, op.version, op.ttl_ms),
            p.GetMany: lambda op: s.get_many(op.keys),
            p.SetMany: lambda op: s.set_many(op.items, op.ttl_ms),
            p.DeleteMany: lambda op: s.delete_many(op.keys),
            p.Flush: lambda op: s.flush(),
            p.Ping: lambda op: True,
            p.Stats: lambda op: self.stats(),
            p.DebugSleep: self._debug_sleep,
        }

    def apply(self, frame: bytes) -> bytes:
        """Decode one envelope, apply it, and return the encoded reply (never raises)."""
        env = p.decode_envelope(frame, self.limits)
        if type(env) is bytes:
            return env
        self.ops += 1
        try:
            value = self._handlers[type(env.op)](env.op)
        except ServerError as exc:  # e.g. NotInteger from INCR: the op's own failure
            return p.encode_reply(env.id, exc.status, exc.message)
        except Exception as exc:  # Invariant 2: a bug must not take the shard down.
            log.exception("internal error applying %s", type(env.op).__name__)
            return p.encode_reply(env.id, p.INTERNAL_ERROR, f"internal error: {exc!r}")
        return p.encode_reply(env.id, p.OK, value)

    def apply_batch(self, frame: bytes) -> bytes | None:
        """One Batch frame in, one BatchReply frame out; None if the frame is not a Batch."""
        try:
            batch = p.decode_batch(frame)
        except Exception:
            log.warning("dropped a frame that is not a Batch (%d bytes)", len(frame))
            return None
        apply = self.apply
        return p.encode_batch_reply(batch.seq, [apply(bytes(raw)) for raw in batch.ops])

    def stats(self) -> dict[str, Any]:
        s = self.store
        return {
            "shard": self.shard_id,
            "pid": os.getpid(),
            "cpu": self.cpu,
            "keys": len(s),
            "used_bytes": s.used_bytes,
            "rss_bytes": self._process.memory_info().rss,
            "ops": self.ops,
            "hits": s.hits,
            "misses": s.misses,
            "sets": s.sets,
            "deletes": s.deletes,
            "expired": s.expired,
            "uptime_s": round(self._clock() - self._started, 3),
        }

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
    cpu = pin_to_cpu(shard_id, config.pin_cpus)  # before the Context: its I/O thread inherits the mask
    ctx = transport.new_context()
    try:
        sock = transport.bind_worker_router(ctx, config.worker_endpoint(shard_id))
    except transport.ZMQError as exc:
        log.error("cannot bind %s: %s", config.worker_endpoint(shard_id), exc)
        return ExitCode.BOOT_FAILED
    shard = Shard(Store(monotonic_ms), config, shard_id, cpu)
    log.info("serving shard %d on %s (cpu %s)", shard_id, config.worker_endpoint(shard_id), cpu)
    try:
        _serve(sock, shard, config, wakeup, lambda: stopping)
    finally:
        sock.close(linger=0)
        transport.remove_ipc_file(config.worker_endpoint(shard_id))
        ctx.term()
    log.info("stopped")
    return ExitCode.OK


def _serve(sock: transport.Socket, shard: Shard, config: Config, wakeup: int,
           should_stop: Callable[[], bool]) -> None:
    poller = transport.Poller()
    poller.register(sock, transport.POLLIN)
    poller.register(wakeup, transport.POLLIN)
    recv, send, getsockopt = sock.recv, sock.send, sock.getsockopt
    SNDMORE, POLLIN, EVENTS, RCVMORE = transport.SNDMORE, transport.POLLIN, transport.EVENTS, transport.RCVMORE
    apply_batch = shard.apply_batch
    active_expire = shard.store.active_expire
    interval, budget = config.expiry_interval_ms, config.expiry_budget_ms
    next_expiry = monotonic_ms() + interval
    while not should_stop():
        timeout = max(0, next_expiry - monotonic_ms())
        ready = poller.poll(timeout)
        if ready:
            for _ in range(_DRAIN_LIMIT):
                if not getsockopt(EVENTS) & POLLIN:
                    break
                peer = recv()
                frame = recv()
                while getsockopt(RCVMORE):  # a peer that sent extra frames: drop them
                    recv()
                reply = apply_batch(frame)
                if reply is not None:
                    send(peer, SNDMORE)
                    send(reply)
            transport.drain_fd(wakeup)
        now = monotonic_ms()
        if now >= next_expiry:
            active_expire(budget)
            next_expiry = now + interval
