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
Batch per shard: per-message overhead dominates on this machine (docs/design.md), so batching is
the main lever on throughput.

Two duties live in their own modules as mixins of Router: ``router_resize`` (topology and
online resizing, see ``migration``) and ``router_stats`` (stats, imbalance, hot keys, health);
``router_types`` holds the plain state (peers, shard links, gathers).

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
Rule 5: one flooding client cannot turn everyone else's requests into BUSY. The socket reads
        peers round-robin (libzmq fair-queues a ROUTER's input), and a peer with more than
        mailbox_limit/8 requests in flight (received, not yet answered) may fill only 7/8 of a
        shard's mailbox: the last eighth stays for clients with a few requests in flight.
        Every request gets exactly one reply, through ``send_to``, which is where a peer's
        count goes down; a peer with nothing in flight has no entry.
"""

from __future__ import annotations

import logging
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
from shardd.router_resize import ResizeDuty
from shardd.router_stats import StatsDuty
from shardd.router_types import ControlPeer, Gather, ReqPeer, ShardLink

log = logging.getLogger("shardd.router")

# Messages taken from the client socket per pass before outboxes are flushed: bounds the
# latency batching adds, while a burst still becomes one Batch per shard.
_DRAIN_LIMIT = 512



class Router(ResizeDuty, StatsDuty):
    """The routing state machine; ``run_router`` drives it with sockets."""

    def __init__(self, config: Config, frontend: transport.Socket, links: list[ShardLink],
                 control: transport.Socket | None = None) -> None:
        # Authentication (auth_dir): the z85 public keys allowed admin ops, or None when off.
        self.admin_ids: frozenset[str] | None = None
        self.caller_is_admin = False
        self.authenticator: Any = None
        self.config = config
        self.frontend = frontend
        self.control = control
        self.links = links
        self.n = len(links)
        self.limits = config.limits
        self.mailbox_limit = config.mailbox_limit
        # Rule 5: requests in flight per client connection, and whether the one being routed
        # comes from a client past its share.
        self.peer_inflight: dict[bytes, int] = {}
        self.heavy = False
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
        identity = peer if type(peer) is bytes else peer.identity if type(peer) is ReqPeer else None
        if identity is not None:  # Rule 5: one reply per request
            n = self.peer_inflight.get(identity, 0)
            if n > 1:
                self.peer_inflight[identity] = n - 1
            elif n:
                del self.peer_inflight[identity]
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
        fair_share = self.mailbox_limit >> 3
        peer_inflight = self.peer_inflight
        for _ in range(_DRAIN_LIMIT):
            if not getsockopt(EVENTS) & POLLIN:
                break
            peer: Any = recv()
            if self.admin_ids is not None and not privileged:
                # Authenticated: the body frame carries the client's key as its User-Id.
                message = recv(copy=False)
                frame = message.bytes
                self.caller_is_admin = message.get("User-Id") in self.admin_ids
            else:
                frame = recv()
            if not privileged:  # Rule 5
                n = peer_inflight[peer] = peer_inflight.get(peer, 0) + 1
                self.heavy = n > fair_share
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
        self.heavy = False
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
        if (self.admin_ids is not None and not privileged and not self.caller_is_admin and cls in _ADMIN_ONLY
                and not (cls is p.Maintenance and op.on is None)):
            self.reply(peer, env.id, p.FORBIDDEN,
                       f"{cls.__struct_config__.tag} needs an admin key (auth_dir/admins); this key is a client key")
            return
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
        limit = self.mailbox_limit
        if link.inflight >= limit or (self.heavy and link.inflight >= limit - (limit >> 3)):
            link.busy += 1
            share = "" if link.inflight >= limit else ", 7/8 of it for a connection sending this much"
            return p.BUSY, (f"shard {link.shard} has {link.inflight} requests in flight "
                            f"(mailbox_limit {limit}{share}); back off and retry")
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
        deadline_s = self.gather_deadline(op)  # router_stats: health, stats and hotkeys never wait on a stuck shard
        if deadline_s is not None:
            gather.deadline = time.monotonic() + deadline_s
            self.timed.append(gather)
        if type(op) is p.Health:
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
        """Apply live settings (SIGHUP, tune): validated like the config file, kept in ``self.config``
        (what stats and the balance check read), the router's own taken from it, then sent to every shard."""
        settings = dict(op.settings)
        try:
            checked = build_config({**msgspec.structs.asdict(self.config),
                                    **{k: v for k, v in settings.items() if k in Config.__struct_fields__}})
        except ConfigError as exc:
            self.reply(peer, request_id, p.BAD_REQUEST, f"configure: {exc}")
            return
        self.config = checked
        self.mailbox_limit = checked.mailbox_limit
        self.limits = checked.limits
        if "log_level" in settings:
            logging.getLogger().setLevel(checked.log_level.upper())
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

    def idle(self) -> bool:
        return all(not link.pending for link in self.links)


_WRITES = frozenset(p.WRITE_OPS)
_ADMIN_ONLY = frozenset(p.ADMIN_ONLY_OPS)
_MULTI = frozenset(p.MULTI_KEY_OPS)
# Ops that cannot be made consistent with entries in transit between shards.
_REFUSED_WHILE_RESIZING = frozenset({p.Flush, p.Resize, p.Snapshot})
_CONTROL_ONLY = frozenset(p.CONTROL_ONLY_OPS)


def _by_shard(parts: list[tuple[int, Any, Any]]) -> list[Any]:
    return [value for _, _, value in sorted(parts, key=lambda part: part[0])]


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
    router: Router | None = None
    try:
        for shard in range(config.shards):
            sock, monitor = transport.connect_shard_dealer(ctx, config.worker_endpoint(shard))
            links.append(ShardLink(shard, sock, monitor))
        auth = transport.ServerAuth(config.auth_dir) if config.auth_dir else None
        authenticator = transport.start_authenticator(ctx, auth) if auth else None
        try:
            frontend = transport.bind_public_router(ctx, public, config.max_message_bytes, auth=auth)
            control = transport.bind_public_router(ctx, [config.control_endpoint()], config.max_message_bytes,
                                                   transport.PRIVATE_IPC_MODE)
        except transport.ZMQError as exc:
            log.error("cannot bind %s: %s", config.bind, exc)
            return ExitCode.BOOT_FAILED
        router = Router(config, frontend, links, control)
        router.ctx = ctx
        if auth is not None:
            router.admin_ids = auth.admin_ids
            router.authenticator = authenticator
        log.info("listening on %s for %d shards", config.bind, config.shards)
        _serve(router, wakeup, lambda: stopping)
    finally:
        for endpoint in [*public, config.control_endpoint()]:
            transport.remove_ipc_file(endpoint)
        # Monitored sockets first, monitoring off (see transport.close_shard_dealer); then the rest.
        if router is not None:
            links = [*links, *router.links, *router.retiring]
        for link in {id(link): link for link in links}.values():
            if not link.sock.closed:
                transport.close_shard_dealer(link.sock, link.monitor)
        ctx.destroy(linger=0)
    log.info("stopped")
    return ExitCode.OK


def _serve(router: Router, wakeup: int, should_stop: Callable[[], bool]) -> None:
    poller = transport.Poller()
    frontend = router.frontend
    poller.register(frontend, transport.POLLIN)
    poller.register(router.control, transport.POLLIN)
    poller.register(wakeup, transport.POLLIN)
    authenticator = router.authenticator
    if authenticator is not None:  # CURVE handshakes ask it over inproc; answered in this loop
        poller.register(authenticator.zap_socket, transport.POLLIN)
    by_socket: dict[Any, Callable[[], None]] = {
        frontend: router.on_frontend,
        router.control: router.on_control,
        **({authenticator.zap_socket: lambda: transport.answer_zap(authenticator)} if authenticator else {}),
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
        transport.close_shard_dealer(link.sock, link.monitor)

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
