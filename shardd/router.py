"""The router: owns the public endpoint and places every request on its shard.

Theory of operation
-------------------
Clients talk to one ROUTER socket. Each request frame is decoded once (to validate it and
find its key), then:

* a single-key op goes to the shard ``shard_for(key, N)``: its raw bytes are appended to
  that shard's outbox, untouched, and the worker's reply bytes come back to the client
  untouched;
* a multi-key op (get_many, set_many, delete_many) is split into one sub-op per shard
  involved and gathered into one reply;
* an admin op (ping, stats, flush) fans out to every shard and is gathered.

All requests read in one pass over the client socket are grouped per shard and sent as one
Batch per shard: per-message overhead dominates on this machine (DESIGN.md), so batching is
the main lever on throughput.

Rules
-----
Rule 1: ``inflight`` of a shard is exact: +1 for each op put in its outbox, -1 for each reply
        received or each op failed because the shard went down. Past ``mailbox_limit`` an op
        is answered BUSY at once and never queued. A multi-key op is checked against every
        shard it touches before any part is queued, so BUSY never half-applies a write.
Rule 2: a shard is "up" only between a completed handshake and a disconnect of its worker
        (socket monitor). When it goes down, everything in flight to it is answered
        UNAVAILABLE; other shards are untouched.
Rule 3: every Batch carries a seq; replies are matched by seq, so a reply from before a
        restart, or one for a request already failed, is recognised and dropped.
Rule 4: nothing a client sends raises out of the loop, and a client that vanished or stopped
        reading costs us a dropped reply, never a blocked send (all sends are non-blocking).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import msgspec

from shardd import protocol as p
from shardd import transport
from shardd.config import Config, build_config
from shardd.errors import ConfigError, ExitCode
from shardd.hashing import shard_for
from shardd.logs import setup_logging
from shardd.migration import Migration, MigrationStep

log = logging.getLogger("shardd.router")

# Messages taken from the client socket per pass before outboxes are flushed: bounds the
# latency batching adds, while a burst still becomes one Batch per shard.
_DRAIN_LIMIT = 512

# Below these means a balance ratio is noise: a few keys or ops/s on an idle daemon are
# never "imbalanced". (The check runs every imbalance_check_s, an internal stats fan-out.)
_BALANCE_MIN_KEYS = 1000
_BALANCE_MIN_OPS_PER_S = 100.0
_BALANCE_REWARN_S = 300.0

# Per-shard stats fields summed into the "total" row of stats.
_SUMMED = ("keys", "expiring", "used_bytes", "max_bytes", "rss_bytes", "ops", "ops_per_s", "hits", "misses",
           "sets", "deletes", "expired", "evicted", "oom_rejected", "mailbox", "mailbox_high", "busy")


class ReqPeer:
    """A client on a REQ socket: its replies need the empty delimiter frame echoed."""

    __slots__ = ("identity",)

    def __init__(self, identity: bytes) -> None:
        self.identity = identity


class ControlPeer:
    """A client of the control endpoint (the supervisor): replies go out on the control socket."""

    __slots__ = ("identity",)

    def __init__(self, identity: bytes) -> None:
        self.identity = identity


class Gather:
    """One client request answered from several shard replies (multi-key and admin ops)."""

    __slots__ = ("combine", "deadline", "done", "error", "parts", "peer", "remaining", "request_id",
                 "tolerant")

    def __init__(self, peer: Any, request_id: int, parts: int,
                 combine: Callable[[list[tuple[int, Any, Any]]], Any], tolerant: bool = False) -> None:
        self.peer = peer
        self.request_id = request_id
        self.remaining = parts
        self.parts: list[tuple[int, Any, Any]] = []  # (shard, context, value or (status, message))
        self.error: tuple[int, str] | None = None
        self.combine = combine
        # A tolerant gather (stats) still combines when some shards failed; others answer
        # the first error.
        self.tolerant = tolerant
        # A gather with a deadline (health) is completed by the router's clock if some shard
        # has not answered by then; later parts are ignored.
        self.deadline: float | None = None
        self.done = False


class ShardLink:
    """The router's view of one shard: its socket, health, mailbox and what is in flight."""

    __slots__ = ("busy", "direct", "high", "inflight", "monitor", "moved_until", "next_seq", "out_frames",
                 "out_targets", "pending", "shard", "sock", "up")

    def __init__(self, shard: int, sock: transport.Socket, monitor: transport.Socket) -> None:
        self.shard = shard
        self.sock = sock
        self.monitor = monitor
        self.up = False
        self.inflight = 0
        self.high = 0
        self.busy = 0
        self.next_seq = 1
        # seq → (targets, frames): the frames are kept (not copied) so a request failed
        # because its shard went down can be answered with its own request id.
        self.pending: dict[int, tuple[list[Any], list[bytes]]] = {}
        self.out_frames: list[bytes] = []
        self.out_targets: list[Any] = []
        # Replies to batches with a seq below this may carry MOVED (a resize is or was running).
        self.moved_until = 0
        self.direct: str | None = None  # the worker's own endpoint, for direct-mode clients


class Router:
    """The routing state machine; ``run_router`` drives it with sockets."""

    def __init__(self, config: Config, frontend: transport.Socket, links: list[ShardLink],
                 control: transport.Socket | None = None) -> None:
        self.config = config
        self.frontend = frontend
        self.control = control
        self.links = links
        self.n = len(links)
        self.limits = config.limits
        self.mailbox_limit = config.mailbox_limit
        self.requests = 0
        self.draining = False
        self.maintenance = False
        self.started = time.monotonic()
        self.timed: list[Gather] = []  # gathers with a deadline, in start order
        self.next_balance_check = self.started + config.imbalance_check_s
        self.imbalanced: dict[str, float] = {}  # dimension → when we last warned about it
        self._admin: dict[type, tuple[Callable, bool]] = {
            p.Ping: (_count_parts, False),
            p.Flush: (_sum_parts, False),
            p.Stats: (self._combine_stats, True),
            p.Health: (self._combine_health, True),
            p.Configure: (_count_parts, False),
            p.Hotkeys: (self._combine_hotkeys, True),
            p.Snapshot: (_by_shard, False),
        }
        self.drain_waiters: list[tuple[Any, int]] = []
        # Placement: ``n`` shards at ``epoch``. During a resize ``n`` stays the old count (requests
        # go to the old owner first; see shardd.migration) until the resize ends.
        self.epoch = 1
        self.pending_resize: tuple[int, Any, int] | None = None  # (shards, peer, request id)
        self.migration: Migration | None = None
        # Shards removed by a shrink, still answering what was sent to them (MOVED, mostly);
        # closed, and their workers stopped, once nothing is in flight to them.
        self.retiring: list[ShardLink] = []
        self.ctx: Any = None  # the zmq Context, to connect new shards (set by run_router)

    # --- replies to clients -------------------------------------------------------

    def send_to(self, peer: Any, frame: bytes) -> None:
        """Send one reply frame; a peer that left or stopped reading loses it (Rule 4)."""
        try:
            if type(peer) is bytes:
                send = self.frontend.send
                send(peer, transport.SNDMORE | transport.NOBLOCK)
            elif type(peer) is ReqPeer:
                send = self.frontend.send
                send(peer.identity, transport.SNDMORE | transport.NOBLOCK)
                send(b"", transport.SNDMORE)
            else:
                send = self.control.send
                send(peer.identity, transport.SNDMORE | transport.NOBLOCK)
            send(frame, transport.NOBLOCK)
        except transport.ZMQError:
            pass

    def reply(self, peer: Any, request_id: int, status: int, value: Any = None) -> None:
        if peer is None:  # the router's own request (balance check): nobody to answer
            return
        self.send_to(peer, p.encode_reply(request_id, status, value))

    # --- client requests ----------------------------------------------------------

    def on_frontend(self) -> None:
        """Read what the client socket has ready (bounded), route it, flush the outboxes."""
        self._read_clients(self.frontend, privileged=False)

    def on_control(self) -> None:
        """The control endpoint: same protocol, plus ops only the supervisor may send."""
        self._read_clients(self.control, privileged=True)

    def _read_clients(self, sock: transport.Socket, privileged: bool) -> None:
        recv, getsockopt = sock.recv, sock.getsockopt
        EVENTS, POLLIN, RCVMORE = transport.EVENTS, transport.POLLIN, transport.RCVMORE
        for _ in range(_DRAIN_LIMIT):
            if not getsockopt(EVENTS) & POLLIN:
                break
            peer: Any = recv()
            frame = recv()
            extra = 0
            if privileged:
                peer = ControlPeer(peer)
            if getsockopt(RCVMORE):
                if not frame and not privileged:  # REQ socket: empty delimiter, then the body
                    peer = ReqPeer(peer)
                    frame = recv()
                while getsockopt(RCVMORE):
                    recv()
                    extra += 1
            self.requests += 1
            if extra:
                self.reply(peer, p.salvage_id(frame), p.BAD_REQUEST,
                           f"a request must be exactly one frame; got {extra} extra frame(s)")
            elif self.draining and not privileged:
                self.reply(peer, p.salvage_id(frame), p.UNAVAILABLE, "the daemon is shutting down; retry shortly")
            else:
                try:
                    self.route(peer, frame, privileged)
                except Exception as exc:  # Rule 4: a bug in one request must not stop the router
                    log.exception("internal error routing a request")
                    self.reply(peer, 0, p.INTERNAL_ERROR, f"internal error: {exc!r}")
        self.flush_outboxes()

    def route(self, peer: Any, frame: bytes, privileged: bool = False) -> None:
        env = p.decode_envelope(frame, self.limits)
        if type(env) is bytes:
            self.send_to(peer, env)
            return
        op = env.op
        if self.maintenance and type(op) in _WRITES:
            self.reply(peer, env.id, p.MAINTENANCE,
                       "the daemon is in maintenance mode: writes are refused, reads work; retry later")
            return
        key = getattr(op, "key", None)
        if key is not None:
            link = self.links[shard_for(key, self.n)]
            problem = self._refusal(link)
            if problem is not None:
                self.reply(peer, env.id, *problem)
                return
            link.inflight += 1
            link.out_frames.append(frame)
            link.out_targets.append(peer)
            return
        cls = type(op)
        if self.migration is not None and cls in _REFUSED_WHILE_RESIZING:
            self.reply(peer, env.id, p.BUSY, f"{cls.__struct_config__.tag} is refused while a resize runs; retry")
            return
        if self.migration is not None and cls in _MULTI:
            self._split_per_key(peer, env.id, op, cls)
        elif cls is p.GetMany or cls is p.DeleteMany:
            self._split_keys(peer, env.id, op, cls)
        elif cls is p.SetMany:
            self._split_set_many(peer, env.id, op)
        elif cls is p.DebugSleep:
            self._debug_sleep(peer, env.id, op)
        elif cls is p.Maintenance:
            self._set_maintenance(peer, env.id, op)
        elif cls in _CONTROL_ONLY and not privileged:
            self.reply(peer, env.id, p.BAD_REQUEST,
                       f"{cls.__struct_config__.tag} is accepted on the control endpoint only")
        elif cls is p.Configure:
            self._configure(peer, env.id, op)
        elif cls is p.Tune:
            self._tune(peer, env.id, op)
        elif cls is p.Topology:
            self.reply(peer, env.id, p.OK, self.topology())
        elif cls is p.Resize:
            self._request_resize(peer, env.id, op)
        elif cls is p.ResizeStart:
            self._start_resize(peer, env.id, op)
        elif cls is p.Drain:
            if not self.draining:
                self.draining = True
                log.info("draining: refusing new client requests; answering what is in flight")
            self.drain_waiters.append((peer, env.id))
        else:
            self._fan_out(peer, env.id, op)

    def _refusal(self, link: ShardLink) -> tuple[int, str] | None:
        if not link.up:
            return p.UNAVAILABLE, f"shard {link.shard} is down (being restarted); retry shortly"
        if link.inflight >= self.mailbox_limit:
            link.busy += 1
            return p.BUSY, (f"shard {link.shard} has {link.inflight} requests in flight "
                            f"(mailbox_limit {self.mailbox_limit}); back off and retry")
        return None

    def _queue(self, link: ShardLink, op: p.Op, target: Any) -> None:
        link.inflight += 1
        link.out_frames.append(p.encode_request(0, op))
        link.out_targets.append(target)

    def _start_gather(self, peer: Any, request_id: int, groups: dict[int, Any],
                      make_op: Callable[[Any], p.Op], combine: Callable) -> None:
        """Check every shard involved (Rule 1), then queue one sub-op per shard."""
        for shard in groups:
            problem = self._refusal(self.links[shard])
            if problem is not None:
                self.reply(peer, request_id, *problem)
                return
        gather = Gather(peer, request_id, len(groups), combine)
        for shard, context in groups.items():
            self._queue(self.links[shard], make_op(context), (gather, context))

    def _split_keys(self, peer: Any, request_id: int, op: Any, cls: type) -> None:
        groups: dict[int, list[int]] = {}
        keys = op.keys
        n = self.n
        for i, key in enumerate(keys):
            groups.setdefault(shard_for(key, n), []).append(i)
        if not groups:
            self.reply(peer, request_id, p.OK, [] if cls is p.GetMany else 0)
            return
        if cls is p.GetMany:
            size = len(keys)

            def combine(parts: list[tuple[int, Any, Any]]) -> list[Any]:
                out: list[Any] = [None] * size
                for _, positions, values in parts:
                    for pos, value in zip(positions, values, strict=True):
                        out[pos] = value
                return out
        else:
            combine = _sum_parts
        self._start_gather(peer, request_id, groups, lambda pos: cls([keys[i] for i in pos]), combine)

    def _split_set_many(self, peer: Any, request_id: int, op: p.SetMany) -> None:
        groups: dict[int, list[tuple[bytes, bytes]]] = {}
        n = self.n
        for item in op.items:
            groups.setdefault(shard_for(item[0], n), []).append(item)
        if not groups:
            self.reply(peer, request_id, p.OK, 0)
            return
        self._start_gather(peer, request_id, groups, lambda items: p.SetMany(items, op.ttl_ms), _sum_parts)

    def _fan_out(self, peer: Any, request_id: int, op: p.Op) -> None:
        """Admin ops go to every shard; a down shard is an error part, not a refusal."""
        combine, tolerant = self._admin[type(op)]
        gather = Gather(peer, request_id, len(self.links), combine, tolerant)
        if type(op) is p.Health:
            gather.deadline = time.monotonic() + op.deadline_ms / 1000
            self.timed.append(gather)
            op = p.Ping()
        for link in self.links:
            if link.up:
                self._queue(link, op, (gather, None))
            else:
                self._complete_part(gather, link.shard, None,
                                    (p.UNAVAILABLE, f"shard {link.shard} is down"), None)

    def _set_maintenance(self, peer: Any, request_id: int, op: p.Maintenance) -> None:
        if op.on is not None and op.on != self.maintenance:
            self.maintenance = op.on
            log.warning("maintenance mode %s", "ON: writes are refused" if op.on else "off")
        self.reply(peer, request_id, p.OK, self.maintenance)

    def _configure(self, peer: Any, request_id: int, op: p.Configure) -> None:
        """Apply the router's own live settings, then pass the rest to every shard."""
        settings = dict(op.settings)
        if "mailbox_limit" in settings:
            self.mailbox_limit = int(settings["mailbox_limit"])
        if "log_level" in settings:
            logging.getLogger().setLevel(str(settings["log_level"]).upper())
        limits = {k: settings[k] for k in ("max_key_bytes", "max_value_bytes", "max_message_bytes") if k in settings}
        if limits:
            self.limits = msgspec.structs.replace(self.limits, **limits)
        self._fan_out(peer, request_id, p.Configure(settings))

    def _tune(self, peer: Any, request_id: int, op: p.Tune) -> None:
        """Operator tuning: validate like the config file, then apply as a configure."""
        unknown = sorted(set(op.settings) - set(p.TUNABLE))
        if unknown or not op.settings:
            self.reply(peer, request_id, p.BAD_REQUEST,
                       f"tune accepts {', '.join(p.TUNABLE)}; got {', '.join(unknown) or 'nothing'}")
            return
        try:
            tuned = build_config({**msgspec.structs.asdict(self.config), **op.settings})
        except ConfigError as exc:
            self.reply(peer, request_id, p.BAD_REQUEST, f"tune: {exc}")
            return
        settings = {key: getattr(tuned, key) for key in op.settings}
        self.config = msgspec.structs.replace(self.config, **settings)
        log.warning("tuned %s", ", ".join(f"{k}={v!r}" for k, v in sorted(settings.items())))
        self._configure(peer, request_id, p.Configure(settings))

    # --- topology and resizing (see shardd.migration) ------------------------------------

    def topology(self) -> dict[str, Any]:
        mig = self.migration
        return {
            "epoch": self.epoch,
            "shards": self.n,
            "hash": "jump_hash(xxh3_64(key, seed=0), shards)",
            # Every connected worker's own endpoint, new shards of a running resize included
            # (MOVED names them); None until the worker has told us.
            "endpoints": [link.direct for link in self.links],
            "resizing": None if mig is None else {"to": mig.new, "epoch": mig.epoch, "moving": mig.moving},
            "pending_resize": None if self.pending_resize is None else self.pending_resize[0],
        }

    def _request_resize(self, peer: Any, request_id: int, op: p.Resize) -> None:
        """A client asks for M shards: wake the supervisor, which starts workers and calls back."""
        if self.migration is not None or self.pending_resize is not None:
            self.reply(peer, request_id, p.BUSY, "a resize is already running; wait for it to finish")
        elif not 1 <= op.shards <= 1024:
            self.reply(peer, request_id, p.BAD_REQUEST, f"shards must be between 1 and 1024, got {op.shards}")
        elif op.shards == self.n:
            self.reply(peer, request_id, p.OK, {"from": self.n, "to": self.n, "moved": 0, "total": 0, "lost": 0,
                                                "epoch": self.epoch, "seconds": 0.0})
        elif down := [link.shard for link in self.links if not link.up]:
            self.reply(peer, request_id, p.UNAVAILABLE, f"shard(s) {down} are down; resize when all are up")
        else:
            self.pending_resize = (op.shards, peer, request_id)
            log.info("resize %d → %d requested", self.n, op.shards)
            os.kill(os.getppid(), signal.SIGUSR1)

    def _start_resize(self, peer: Any, request_id: int, op: p.ResizeStart) -> None:
        """The supervisor has started the workers: connect to them; moving starts once all are up."""
        if self.pending_resize is None or self.pending_resize[0] != op.shards:
            self.reply(peer, request_id, p.BAD_REQUEST, "no such resize pending")
            return
        _, waiter_peer, waiter_id = self.pending_resize
        self.pending_resize = None
        for shard in range(len(self.links), op.shards):
            sock, monitor = transport.connect_shard_dealer(self.ctx, self.config.worker_endpoint(shard))
            link = ShardLink(shard, sock, monitor)
            self.links.append(link)
            self.on_new_link(link)
        self.migration = Migration(self.n, op.shards, self.epoch + 1, (waiter_peer, waiter_id))
        for link in self.links:
            link.moved_until = _NO_LIMIT
        self.reply(peer, request_id, p.OK, True)
        self.advance_migration()

    def on_new_link(self, link: ShardLink) -> None:
        """Hook for the socket loop to start polling a shard added by a resize."""

    def advance_migration(self) -> None:
        """Start moving once every shard is connected; finish once everything has moved."""
        mig = self.migration
        if mig is None:
            return
        if not mig.moving:
            if not all(link.up for link in self.links):
                return
            mig.moving = True
            mig.scanning = set(range(mig.old))
            for shard in range(mig.old):
                self._queue(self.links[shard], p.Migrate(mig.epoch, mig.new), MigrationStep("migrate", shard))
            self.flush_outboxes()
        elif mig.finished():
            self._finish_migration(mig)

    def _on_migration_step(self, step: MigrationStep, raw: Any) -> None:
        mig = self.migration
        reply = p.decode_reply(raw)
        if step.kind == "describe":
            if reply.status == p.OK and step.shard < len(self.links):
                self.links[step.shard].direct = reply.value.get("direct")
            return
        if mig is None:
            return
        if reply.status != p.OK:
            mig.failed = f"shard {step.shard} answered {step.kind} with status {reply.status}: {reply.value}"
            log.error("resize: %s", mig.failed)
        if step.kind == "migrate":
            mig.total += reply.value if reply.status == p.OK else 0
            self._queue(self.links[step.shard], p.MigrateOut(), MigrationStep("out", step.shard))
        elif step.kind == "out":
            value = reply.value if reply.status == p.OK else {"entries": [], "done": True}
            for owner, entries in mig.group_by_owner(value["entries"]).items():
                mig.imports_in_flight += 1
                mig.moved += len(entries)
                self._queue(self.links[owner], p.MigrateIn(entries), MigrationStep("in", owner, len(entries)))
            if value["done"]:
                mig.scanning.discard(step.shard)
            else:
                self._queue(self.links[step.shard], p.MigrateOut(), MigrationStep("out", step.shard))
        elif step.kind == "in":
            mig.imports_in_flight -= 1
            adopted = reply.value if reply.status == p.OK else 0
            if adopted < step.entries:
                mig.lost += step.entries - adopted
                log.error("resize: shard %d could not adopt %d entries (memory bound)", step.shard,
                          step.entries - adopted)
        if mig.finished():
            self._finish_migration(mig)

    def _finish_migration(self, mig: Migration) -> None:
        self.migration = None
        self.epoch, self.n = mig.epoch, mig.new
        for link in self.links:
            link.moved_until = link.next_seq  # replies to what was sent until now may still say MOVED
        for link in self.links[: mig.new]:
            self._queue(link, p.SetTopology(mig.epoch, mig.new), MigrationStep("topology", link.shard))
        removed, self.links = self.links[mig.new :], self.links[: mig.new]
        self.retiring.extend(removed)
        result = mig.result()
        if mig.failed:
            log.error("resize %d → %d finished with errors: %s", mig.old, mig.new, mig.failed)
        log.info("resize %d → %d done: %d of %d keys moved in %.3f s (epoch %d)", mig.old, mig.new,
                 mig.moved, mig.total, result["seconds"], mig.epoch)
        if mig.waiter is not None:
            if mig.failed:
                self.reply(*mig.waiter, p.INTERNAL_ERROR, f"resize finished with errors: {mig.failed}")
            else:
                self.reply(*mig.waiter, p.OK, result)
        self.flush_outboxes()
        self.retire_links()

    def retire_links(self) -> None:
        """Close removed shards that have nothing in flight; then let the supervisor stop them."""
        done = [link for link in self.retiring if not link.pending and not link.out_frames]
        for link in done:
            self.retiring.remove(link)
            self.on_removed_link(link)
        if not self.retiring and self.migration is None:
            os.kill(os.getppid(), signal.SIGUSR1)  # resize over: the supervisor stops removed workers

    def on_removed_link(self, link: ShardLink) -> None:
        """Hook for the socket loop: a shard removed by a resize (its worker is stopped next)."""

    def _rerouted(self, target: Any, raw: Any, frame: bytes) -> bool:
        """If this reply is MOVED, send the request on to the key's new owner instead; True if so."""
        if type(target) is MigrationStep:
            return False
        try:
            reply = p.decode_reply(raw)
        except Exception:
            return False
        if reply.status != p.MOVED:
            return False
        owner = reply.value.get("shard") if isinstance(reply.value, dict) else None
        if not isinstance(owner, int) or not 0 <= owner < len(self.links):
            return False
        link = self.links[owner]
        link.inflight += 1
        link.out_frames.append(frame)
        link.out_targets.append(target)
        return True

    def _split_per_key(self, peer: Any, request_id: int, op: Any, cls: type) -> None:
        """During a resize a multi-key op becomes one single-key op per key, each routed (and
        re-routed on MOVED) on its own; the gather puts the answers back together."""
        n = self.n
        if cls is p.SetMany:
            subs = [(item[0], p.Set(item[0], item[1], op.ttl_ms)) for item in op.items]
        elif cls is p.GetMany:
            subs = [(key, p.Get(key)) for key in op.keys]
        else:
            subs = [(key, p.Delete(key)) for key in op.keys]
        if not subs:
            self.reply(peer, request_id, p.OK, [] if cls is p.GetMany else 0)
            return
        shards = [shard_for(key, n) for key, _ in subs]
        for shard in set(shards):
            problem = self._refusal(self.links[shard])
            if problem is not None:
                self.reply(peer, request_id, *problem)
                return
        size = len(subs)
        if cls is p.GetMany:
            def combine(parts: list[tuple[int, Any, Any]]) -> list[Any]:
                out: list[Any] = [None] * size
                for _, position, value in parts:
                    out[position] = value
                return out
        else:
            def combine(parts: list[tuple[int, Any, Any]]) -> int:
                return sum(1 for _, _, value in parts if value)
        gather = Gather(peer, request_id, size, combine)
        for position, ((_, sub), shard) in enumerate(zip(subs, shards, strict=True)):
            self._queue(self.links[shard], sub, (gather, position))

    def answer_drained(self) -> None:
        """Answer Drain requests once nothing is in flight to any shard."""
        if self.drain_waiters and self.idle():
            for peer, request_id in self.drain_waiters:
                self.reply(peer, request_id, p.OK, True)
            self.drain_waiters.clear()

    def expire_gathers(self, now: float) -> None:
        """Complete gathers whose deadline passed, naming the shards that did not answer."""
        keep = []
        for gather in self.timed:
            if gather.done:
                continue
            if now < gather.deadline:
                keep.append(gather)
                continue
            answered = {shard for shard, _, _ in gather.parts}
            for shard in range(len(self.links)):
                if shard not in answered:
                    self._complete_part(gather, shard, None, (p.UNAVAILABLE, "timeout"), None)
        self.timed = keep

    def _debug_sleep(self, peer: Any, request_id: int, op: p.DebugSleep) -> None:
        if not 0 <= op.shard < self.n:
            self.reply(peer, request_id, p.BAD_REQUEST, f"no shard {op.shard}; there are {self.n}")
            return
        self._start_gather(peer, request_id, {op.shard: None}, lambda _: op, lambda parts: parts[0][2])

    # --- shard traffic --------------------------------------------------------------

    def flush_outboxes(self) -> None:
        for link in self.links:
            if not link.out_frames:
                continue
            frames, targets = link.out_frames, link.out_targets
            link.out_frames, link.out_targets = [], []
            seq = link.next_seq
            link.next_seq += 1
            try:
                link.sock.send(p.encode_batch(seq, frames), transport.NOBLOCK)
            except transport.ZMQError:  # no live connection (IMMEDIATE): the worker just died
                self._fail(link, targets, frames, "went down")
                continue
            link.pending[seq] = (targets, frames)
            if link.inflight > link.high:
                link.high = link.inflight

    def on_shard(self, link: ShardLink) -> None:
        sock = link.sock
        recv, getsockopt = sock.recv, sock.getsockopt
        EVENTS, POLLIN = transport.EVENTS, transport.POLLIN
        send_to = self.send_to
        while getsockopt(EVENTS) & POLLIN:
            frame = recv()
            try:
                batch = p.decode_batch_reply(frame)
            except Exception:
                log.error("shard %d sent an undecodable reply (%d bytes); dropped", link.shard, len(frame))
                continue
            entry = link.pending.pop(batch.seq, None)
            if entry is None:
                continue  # Rule 3: a reply to something already failed
            targets, frames = entry
            link.inflight -= len(targets)
            # Only an old shard during (or just after) a resize can answer MOVED: peek then.
            check_moved = batch.seq < link.moved_until
            for target, raw, frame in zip(targets, batch.replies, frames, strict=False):
                if check_moved and self._rerouted(target, raw, frame):
                    continue
                if type(target) is tuple:
                    self._on_part(target, link.shard, raw)
                elif type(target) is MigrationStep:
                    self._on_migration_step(target, raw)
                else:
                    send_to(target, raw)
        # Replies can queue work: a re-routed MOVED request, a resize step, nothing otherwise.
        self.flush_outboxes()

    def _on_part(self, target: tuple[Gather, Any], shard: int, raw: Any) -> None:
        gather, context = target
        try:
            reply = p.decode_reply(raw)
        except Exception:
            self._complete_part(gather, shard, context, (p.INTERNAL_ERROR, f"shard {shard} sent garbage"), None)
            return
        error = None if reply.status == p.OK else (reply.status, f"shard {shard}: {reply.value}")
        self._complete_part(gather, shard, context, error, reply.value)

    def _complete_part(self, gather: Gather, shard: int, context: Any,
                       error: tuple[int, str] | None, value: Any) -> None:
        if gather.done:
            return  # completed by its deadline; a late part changes nothing
        if error is not None and gather.error is None:
            gather.error = error
        gather.parts.append((shard, context, value if error is None else error))
        gather.remaining -= 1
        if gather.remaining:
            return
        gather.done = True
        if gather.error is not None and not gather.tolerant:
            self.reply(gather.peer, gather.request_id, *gather.error)
            return
        try:
            value = gather.combine(gather.parts)
        except Exception as exc:
            log.exception("gather failed")
            self.reply(gather.peer, gather.request_id, p.INTERNAL_ERROR, f"internal error: {exc!r}")
            return
        self.reply(gather.peer, gather.request_id, p.OK, value)

    def _fail(self, link: ShardLink, targets: list[Any], frames: list[bytes], why: str) -> None:
        """Answer UNAVAILABLE for ops that were queued to a shard that went down (Rule 2)."""
        message = f"shard {link.shard} {why}; retry shortly"
        link.inflight -= len(targets)
        for target, frame in zip(targets, frames, strict=True):
            if type(target) is tuple:
                self._complete_part(target[0], link.shard, target[1], (p.UNAVAILABLE, message), None)
            elif type(target) is MigrationStep:
                self._on_migration_step(target, p.encode_reply(0, p.UNAVAILABLE, message))
            else:
                env = p.decode_envelope(frame, self.limits)
                request_id = env.id if isinstance(env, p.Envelope) else 0
                self.reply(target, request_id, p.UNAVAILABLE, message)

    def on_shard_event(self, link: ShardLink, event: str | None) -> None:
        if event == "up" and not link.up:
            link.up = True
            log.info("shard %d is up", link.shard)
            # Learn the worker's own endpoint (it changes when a worker restarts).
            self._queue(link, p.Describe(), MigrationStep("describe", link.shard))
            self.flush_outboxes()
        elif event == "down" and link.up:
            link.up = False
            link.direct = None
            log.warning("shard %d is down; answering UNAVAILABLE for it", link.shard)
            pending, link.pending = link.pending, {}
            for targets, frames in pending.values():
                self._fail(link, targets, frames, "went down")

    def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "shards": self.n,
            "mailbox_limit": self.mailbox_limit,
            "requests": self.requests,
            "maintenance": self.maintenance,
        }

    def _combine_stats(self, parts: list[tuple[int, Any, Any]]) -> dict[str, Any]:
        """Router stats plus one row per shard: the worker's own numbers and the router's view."""
        by_shard = {shard: value for shard, _, value in parts}
        rows = []
        for link in self.links:
            value = by_shard.get(link.shard)
            row: dict[str, Any] = dict(value) if isinstance(value, dict) else {"shard": link.shard}
            row.update(status="up" if isinstance(value, dict) else "down",
                       mailbox=link.inflight, mailbox_high=link.high, busy=link.busy)
            rows.append(row)
        return {"router": self.stats(), "shards": rows, **_totals(rows, self.config.imbalance_threshold)}

    def check_balance(self, now: float) -> None:
        """Every imbalance_check_s, gather stats from the shards and warn about a hot one."""
        if now < self.next_balance_check or self.draining:
            return
        self.next_balance_check = now + self.config.imbalance_check_s
        up = [link for link in self.links if link.up]
        if not up:
            return
        gather = Gather(None, 0, len(up), lambda parts: self._warn_imbalance(self._combine_stats(parts)), True)
        for link in up:
            self._queue(link, p.Stats(), (gather, None))
        self.flush_outboxes()

    def _warn_imbalance(self, stats: dict[str, Any]) -> None:
        """Log once when a dimension passes the threshold, again every _BALANCE_REWARN_S, and when it clears."""
        imbalance, total = stats["imbalance"], stats["total"]
        n = max(1, total["shards_up"])
        floors = {"keys": total["keys"] / n >= _BALANCE_MIN_KEYS,
                  "ops": total["ops_per_s"] / n >= _BALANCE_MIN_OPS_PER_S}
        now = time.monotonic()
        threshold = self.config.imbalance_threshold
        for dim, meaningful in floors.items():
            ratio, hot = imbalance[dim], imbalance[f"hot_shard_{dim}"]
            if meaningful and ratio > threshold:
                last = self.imbalanced.get(dim)
                if last is None or now - last >= _BALANCE_REWARN_S:
                    self.imbalanced[dim] = now
                    log.warning("shard %s is hot: %.2fx the mean %s over %d shards (imbalance_threshold %.2f)",
                                hot, ratio, "keys" if dim == "keys" else "ops/s", n, threshold)
            elif dim in self.imbalanced:
                del self.imbalanced[dim]
                log.info("%s are balanced again: max/mean %.2f", dim, ratio)

    def _combine_hotkeys(self, parts: list[tuple[int, Any, Any]]) -> dict[str, Any]:
        """Every shard's top keys, merged: [key, shard, rate/s, count, error], hottest first."""
        rows: list[list[Any]] = []
        top, window, down = 1, 0.0, []
        for shard, _, value in parts:
            if not isinstance(value, dict):
                down.append(shard)
                continue
            top = max(top, value["top"])
            window = max(window, value["window_s"])
            rows.extend([key, shard, rate, count, error] for key, rate, count, error in value["keys"])
        rows.sort(key=lambda row: row[2], reverse=True)
        return {"window_s": window, "keys": rows[:top], "down": sorted(down)}

    def _combine_health(self, parts: list[tuple[int, Any, Any]]) -> dict[str, Any]:
        """Each shard: "ok", "down" (no worker connected) or "timeout" (did not answer in time)."""
        states = {}
        for shard, _, value in parts:
            if value is True:
                states[shard] = "ok"
            elif isinstance(value, tuple) and value[1] == "timeout":
                states[shard] = "timeout"
            else:
                states[shard] = "down"
        shards = [{"shard": i, "status": states.get(i, "timeout")} for i in range(len(self.links))]
        return {"ok": all(row["status"] == "ok" for row in shards), "maintenance": self.maintenance,
                "shards": shards}

    def idle(self) -> bool:
        return all(not link.pending for link in self.links)


_WRITES = frozenset(p.WRITE_OPS)
_MULTI = frozenset(p.MULTI_KEY_OPS)
# Ops that cannot be made consistent with entries in transit between shards.
_REFUSED_WHILE_RESIZING = frozenset({p.Flush, p.Resize, p.Snapshot})
_NO_LIMIT = float("inf")
_CONTROL_ONLY = frozenset(p.CONTROL_ONLY_OPS)


def _by_shard(parts: list[tuple[int, Any, Any]]) -> list[Any]:
    return [value for _, _, value in sorted(parts, key=lambda part: part[0])]


def _totals(rows: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """The "total" row and the "imbalance" ratios (max/mean over the shards that are up)."""
    up = [row for row in rows if row.get("status") == "up"]
    total: dict[str, Any] = {f: sum(row.get(f) or 0 for row in up) for f in _SUMMED}
    total["mailbox"] = sum(row.get("mailbox") or 0 for row in rows)
    total["busy"] = sum(row.get("busy") or 0 for row in rows)
    total["shards_up"] = len(up)
    evictions: dict[str, int] = {}
    for row in up:
        for reason, count in (row.get("evictions") or {}).items():
            evictions[reason] = evictions.get(reason, 0) + count
    total["evictions"] = evictions
    # Quantiles cannot be added up: the total shows the worst shard's.
    for q in ("service_p50_us", "service_p99_us"):
        values = [row[q] for row in up if row.get(q) is not None]
        total[q] = max(values) if values else None
    imbalance: dict[str, Any] = {"threshold": threshold}
    for dim, field in (("keys", "keys"), ("ops", "ops_per_s")):
        values = [(row.get(field) or 0, row["shard"]) for row in up]
        mean = sum(v for v, _ in values) / len(values) if values else 0
        peak, hot = max(values) if values else (0, None)
        imbalance[dim] = round(peak / mean, 3) if mean else 1.0
        imbalance[f"hot_shard_{dim}"] = hot
    return {"total": total, "imbalance": imbalance}


def _sum_parts(parts: list[tuple[int, Any, Any]]) -> int:
    return sum(value for _, _, value in parts)


def _count_parts(parts: list[tuple[int, Any, Any]]) -> int:
    return len(parts)


def run_router(config: Config) -> int:
    """Serve the public endpoint until SIGTERM; the entry point of the router process.

    On SIGTERM the router answers requests that still arrive with UNAVAILABLE, waits until every shard has answered what
    was in flight (bounded by ``stop_timeout``), and exits 0.
    """
    setup_logging(config.log_level, "router")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor orders the stop
    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    wakeup = transport.signal_wakeup_pipe([signal.SIGTERM], on_term)
    ctx = transport.new_context()
    public = [config.bind]
    links: list[ShardLink] = []
    try:
        for shard in range(config.shards):
            sock, monitor = transport.connect_shard_dealer(ctx, config.worker_endpoint(shard))
            links.append(ShardLink(shard, sock, monitor))
        try:
            frontend = transport.bind_public_router(ctx, public, config.max_message_bytes)
            control = transport.bind_public_router(ctx, [config.control_endpoint()], config.max_message_bytes,
                                                   transport.PRIVATE_IPC_MODE)
        except transport.ZMQError as exc:
            log.error("cannot bind %s: %s", config.bind, exc)
            return ExitCode.BOOT_FAILED
        router = Router(config, frontend, links, control)
        router.ctx = ctx
        log.info("listening on %s for %d shards", config.bind, config.shards)
        _serve(router, wakeup, lambda: stopping)
    finally:
        for endpoint in [*public, config.control_endpoint()]:
            transport.remove_ipc_file(endpoint)
        # Closes every socket of the context, including shards added or removed by a resize.
        ctx.destroy(linger=0)
    log.info("stopped")
    return ExitCode.OK


def _serve(router: Router, wakeup: int, should_stop: Callable[[], bool]) -> None:
    poller = transport.Poller()
    frontend = router.frontend
    poller.register(frontend, transport.POLLIN)
    poller.register(router.control, transport.POLLIN)
    poller.register(wakeup, transport.POLLIN)
    by_socket: dict[Any, Callable[[], None]] = {
        frontend: router.on_frontend,
        router.control: router.on_control,
        wakeup: lambda: transport.drain_fd(wakeup),
    }
    def watch(link: ShardLink) -> None:
        poller.register(link.sock, transport.POLLIN)
        poller.register(link.monitor, transport.POLLIN)
        by_socket[link.sock] = lambda: router.on_shard(link)
        by_socket[link.monitor] = lambda: router.on_shard_event(link, transport.read_monitor_event(link.monitor))

    def unwatch(link: ShardLink) -> None:
        for sock in (link.sock, link.monitor):
            poller.unregister(sock)
            del by_socket[sock]
            sock.close(linger=0)

    for link in router.links:
        watch(link)
    router.on_new_link, router.on_removed_link = watch, unwatch
    deadline = None
    while True:
        if deadline is None and should_stop():
            router.draining = True
            deadline = time.monotonic() + router.config.stop_timeout * 0.6
            # Unbinding would also drop the connections accepted on the endpoint, and with them the
            # replies we still owe; so connections stay, and new requests get UNAVAILABLE.
            log.info("stopping: refusing new requests; answering what is in flight")
        if deadline is not None and (router.idle() or time.monotonic() >= deadline):
            if not router.idle():
                log.warning("stop timeout: %d shard(s) still had requests in flight",
                            sum(1 for link in router.links if link.pending))
            return
        timeout = 100 if deadline is not None else 1000
        if router.timed:
            timeout = 20  # a health gather's deadline needs a clock, not only socket events
        for sock, _ in poller.poll(timeout):
            handler = by_socket.get(sock)  # None: a shard removed by a resize earlier in this pass
            if handler is not None:
                handler()
        router.check_balance(time.monotonic())
        if router.timed:
            router.expire_gathers(time.monotonic())
            router.flush_outboxes()
        router.answer_drained()
        if router.migration is not None:
            router.advance_migration()
        if router.retiring:
            router.retire_links()
