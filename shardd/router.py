"""The router: owns the public endpoint and places every request on its shard.

Theory of operation
-------------------
Clients talk to one inbox (transport.ClientInbox). Each request frame is decoded once (to
validate it and find its op's entry in the op table, protocol.OPS), then:

* a keyed op goes to the shard ``shard_for(key, N)``: its raw bytes are queued on that
  shard's link, untouched, and the worker's reply bytes go back to the client untouched;
* a multi-key op (get_many, set_many, delete_many) is split into one sub-op per shard
  involved and gathered into one reply (router_types);
* a fan-out op (ping, stats, flush, …) goes to every shard and is gathered;
* the router's own ops (maintenance, configure, topology, resize, drain, …) are answered here.

All requests read in one pass over the inbox are grouped per shard and sent as one Batch per
shard: per-message overhead dominates on this machine (docs/design.md, "Where the time goes"),
so batching is the main lever on throughput.

The router is made of parts, each owning its state: ``ShardLink`` (shard_link: one shard's
channel, mailbox and sequence accounting), ``Migration`` (migration: the whole resize state
machine, sans-IO), ``router_stats`` (pure functions combining stats, health and hot keys) and
``router_types`` (gathers and multi-key splitting). The transport (transport.Hub and its
channels) is the only thing that knows about sockets; the process wiring is router_main.

Size: ~660 lines, over the ~500 aim: route() and its op-table gate/dispatch (~100 lines) and
the resize glue (links added, moved_until, retiring: ~140) both need the router's links. The
next cut is a ``Topology`` part owning links, n, epoch and retiring, with the resize glue.

Rules
-----
Rule 1: the mailbox of a shard is its link's ``inflight``, kept exact by ShardLink (its Rule 1).
        Past ``mailbox_limit`` an op is answered BUSY at once and never queued. A multi-key op
        is checked against every shard it touches before any part is queued, so BUSY never
        half-applies a write.
Rule 2: a shard is "up" only between a completed handshake and a disconnect of its worker
        (the channel's events). When it goes down, everything in flight to it is answered
        UNAVAILABLE; other shards are untouched.
Rule 3: replies are matched to batches by seq (ShardLink, Rule 2), so a reply from before a
        restart, or one for a request already failed, is dropped.
Rule 4: nothing a client sends raises out of the loop, and a client that vanished or stopped
        reading costs us a dropped reply, never a blocked send (transport, Rule 1).
Rule 5: one flooding client cannot turn everyone else's requests into BUSY. The inbox reads
        peers round-robin (libzmq fair-queues a ROUTER's input), and a peer with more than
        mailbox_limit/8 requests in flight (received, not yet answered) may fill only 7/8 of a
        shard's mailbox: the last eighth stays for clients with a few requests in flight.
        Every request gets exactly one reply, through ``send_to``, which is where a peer's
        count goes down; a peer with nothing in flight has no entry.
Rule 6: during a resize the old placement routes; a reply MOVED to a batch sent before
        ``moved_until`` is not passed on but re-queued to the key's new owner (``_rerouted``).
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
from shardd import router_cluster, router_keyspace
from shardd.cluster_view import ClusterView
from shardd.config import RESTART_KEYS, Config, build_config
from shardd.errors import ConfigError
from shardd.hashing import shard_for
from shardd.migration import Migration, MigrationStep, Phase, Send, StepKind
from shardd.resp_server import RESP_TARGETS
from shardd.router_stats import (
    GATHER_DEADLINE_S,
    combine_health,
    combine_hotkeys,
    combine_stats,
    gather_deadline,
    imbalance_news,
)
from shardd.router_types import ControlPeer, Gather, by_shard, count_parts, split_multi, sum_parts
from shardd.shard_link import ShardLink

log = logging.getLogger("shardd.router")
_monotonic = time.monotonic

# Messages taken from the inbox per pass before outboxes are flushed: bounds the latency
# batching adds, while a burst still becomes one Batch per shard.
_DRAIN_LIMIT = 512

# moved_until of every link while a resize runs: any reply may say MOVED.
NO_LIMIT = float("inf")


class Router:
    """The routing state machine over its parts; ``run_router`` drives it with the transport.

    ``frontend`` and ``control`` are inboxes (``receive(limit)``, ``send(peer, frame)``), each
    link's channel has ``send(frame) -> bool`` and ``receive()``; ``connect(shard)`` opens the
    channel of a shard added by a resize. Unit tests pass fakes (tests/unit/test_router.py).
    """

    def __init__(self, config: Config, frontend: Any, links: list[ShardLink], control: Any = None,
                 connect: Callable[[int], Any] | None = None) -> None:
        # Authentication (auth_dir): the z85 public keys allowed admin ops, or None when off.
        self.admin_ids: frozenset[str] | None = None
        self.caller_is_admin = False
        self.config = config
        self.frontend = frontend
        self.control = control
        self.connect = connect
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
            p.Ping: (count_parts, False),
            p.Flush: (sum_parts, False),
            p.Stats: (self._combine_stats, True),
            p.Health: (lambda parts: combine_health(parts, len(self.links), self.maintenance), True),
            p.Configure: (count_parts, False),
            p.Hotkeys: (combine_hotkeys, True),
            p.Snapshot: (by_shard, False),
            p.SlotTake: (router_cluster.combine_take, False),
            p.SlotCopy: (router_cluster.combine_take, False),
        }
        self.drain_waiters: list[tuple[Any, int]] = []
        # Placement: ``n`` shards at ``epoch``. During a resize ``n`` stays the old count (requests
        # go to the old owner first; see shardd.migration) until the resize ends.
        self.epoch = 1
        self.resize: Migration | None = None  # from the request until set_topology is sent
        # Shards removed by a shrink, still answering what was sent to them (MOVED, mostly);
        # closed, and their workers stopped, once nothing is in flight to them.
        self.retiring: list[ShardLink] = []
        # Cluster mode (docs/cluster.md): which slots this node serves; None on a single node.
        self.cluster: ClusterView | None = (ClusterView(config.cluster_name, config.node_id())
                                            if config.clustered else None)
        self.resp: Any = None  # the RESP endpoint (resp_server.RespServer) when resp_bind is set

    # Hooks for the transport loop: start / stop watching a shard added / removed by a resize.
    def on_new_link(self, link: ShardLink) -> None:
        pass

    def on_removed_link(self, link: ShardLink) -> None:
        pass

    def notify_supervisor(self) -> None:
        """A resize needs workers started, or has ended: the supervisor reads the topology."""
        os.kill(os.getppid(), signal.SIGUSR1)

    # --- replies to clients -------------------------------------------------------

    def send_to(self, peer: Any, frame: bytes) -> None:
        """Send one reply frame; a peer that left or stopped reading loses it (Rule 4)."""
        if type(peer) is ControlPeer:
            self.control.send(peer.identity, frame)
            return
        if type(peer) in RESP_TARGETS:  # an op of a Redis command (resp_server): it spells the reply
            peer.answer_raw(frame)
            return
        n = self.peer_inflight.get(peer, 0)  # Rule 5: one reply per request
        if n > 1:
            self.peer_inflight[peer] = n - 1
        elif n:
            del self.peer_inflight[peer]
        self.frontend.send(peer, frame)

    def reply(self, peer: Any, request_id: int, status: int, value: Any = None) -> None:
        if peer is None:  # the router's own request (balance check): nobody to answer
            return
        if type(peer) in RESP_TARGETS:
            peer.answer(status, value)
            return
        self.send_to(peer, p.encode_reply(request_id, status, value))

    # --- client requests ----------------------------------------------------------

    def on_frontend(self) -> None:
        """Read what the inbox has ready (bounded), route it, flush the outboxes."""
        self._read_clients(self.frontend, privileged=False)

    def on_control(self) -> None:
        """The control endpoint: same protocol, plus ops only the supervisor may send."""
        self._read_clients(self.control, privileged=True)

    def _read_clients(self, inbox: Any, privileged: bool) -> None:
        fair_share = self.mailbox_limit >> 3
        peer_inflight = self.peer_inflight
        route = self.route
        for peer, frame, extra, admin in inbox.receive(_DRAIN_LIMIT):
            if privileged:
                peer = ControlPeer(peer)
            else:  # Rule 5
                n = peer_inflight[peer] = peer_inflight.get(peer, 0) + 1
                self.heavy = n > fair_share
                self.caller_is_admin = admin
            self.requests += 1
            if extra:
                self.reply(peer, p.salvage_id(frame), p.BAD_REQUEST,
                           f"a request must be exactly one frame; got {extra} extra frame(s)")
            elif self.draining and not privileged:
                self.reply(peer, p.salvage_id(frame), p.UNAVAILABLE, "the daemon is shutting down; retry shortly")
            else:
                try:
                    route(peer, frame, privileged)
                except Exception as exc:  # Rule 4: a bug in one request must not stop the router
                    log.exception("internal error routing a request")
                    self.reply(peer, 0, p.INTERNAL_ERROR, f"internal error: {exc!r}")
        self.heavy = False
        self.flush_outboxes()

    def route(self, peer: Any, frame: bytes, privileged: bool = False) -> None:
        """Check one request against its op's entry in the op table (protocol.OPS), then dispatch it by kind.

        Every check is made in one order for every op (``_gate``), so whether an op is allowed never
        depends on where its handler sits; a keyed op whose spec has no check (reads, and writes
        while maintenance is off) goes straight to its shard's outbox.
        """
        env = p.decode_envelope(frame, self.limits)
        if type(env) is bytes:
            self.send_to(peer, env)
            return
        op = env.op
        spec = _OPS[type(op)]
        if spec.guarded or (spec.write and self.maintenance):
            problem = _gate(self, spec, op, privileged)
            if problem is not None:
                self.reply(peer, env.id, *problem)
                return
        if spec.kind == _KEYED:
            self._keyed(peer, env.id, op, spec, frame)
            return
        _DISPATCH[type(op)](self, peer, env.id, op)

    def _keyed(self, peer: Any, request_id: int, op: Any, spec: p.OpSpec, frame: bytes | None) -> None:
        """Queue a keyed op on its shard's outbox (``frame``: its request, encoded here if None)."""
        cluster = self.cluster
        if cluster is not None:
            problem = cluster.refusal(op.key, _monotonic())
            if problem is not None:
                self.reply(peer, request_id, *problem)
                return
            if cluster.replicated and spec.write:
                cluster.note_write(op.key)
        link = self.links[shard_for(op.key, self.n)]
        problem = self._refusal(link)
        if problem is not None:
            self.reply(peer, request_id, *problem)
            return
        link.inflight += 1
        link.out_frames.append(frame if frame is not None else p.encode_request(0, op))
        link.out_targets.append(peer)

    def submit(self, target: Any, op: p.Op) -> None:
        """Route an op made in this process (a Redis command's, resp_server) as ``route`` routes a
        client's: the same checks and placement, without a frame to decode. ``target`` answers."""
        if self.draining:
            target.answer(p.UNAVAILABLE, "the daemon is shutting down; retry shortly")
            return
        spec = _OPS[type(op)]
        if spec.guarded or (spec.write and self.maintenance):
            problem = _gate(self, spec, op, False)
            if problem is not None:
                target.answer(*problem)
                return
        if spec.kind == _KEYED:  # the worker checks it, as it checks every request it decodes
            self._keyed(target, 0, op, spec, None)
            return
        problem = p.check_op(op, self.limits)
        if problem is not None:
            target.answer(*problem)
            return
        _DISPATCH[type(op)](self, target, 0, op)

    def _refusal(self, link: ShardLink) -> tuple[int, str] | None:
        return link.refusal(self.mailbox_limit, self.heavy)

    def _queue(self, link: ShardLink, op: p.Op, target: Any) -> None:
        link.queue(p.encode_request(0, op), target)

    def _start_gather(self, peer: Any, request_id: int, parts: list[tuple[int, p.Op, Any]],
                      combine: Callable, empty: Any, data: bool = False) -> None:
        """Check every shard involved (Rule 1), then queue every part."""
        if not parts:
            self.reply(peer, request_id, p.OK, empty)
            return
        for shard in {shard for shard, _, _ in parts}:
            problem = self._refusal(self.links[shard])
            if problem is not None:
                self.reply(peer, request_id, *problem)
                return
        gather = Gather(peer, request_id, len(parts), combine)
        gather.data = data
        links = self.links
        for shard, op, context in parts:
            self._queue(links[shard], op, (gather, context))

    def _split_keys(self, peer: Any, request_id: int, op: Any, cls: type) -> None:
        self._start_gather(peer, request_id, *split_multi(op, self.n, per_key=False), data=True)

    def _split_set_many(self, peer: Any, request_id: int, op: p.SetMany) -> None:
        self._start_gather(peer, request_id, *split_multi(op, self.n, per_key=False), data=True)

    def _split_per_key(self, peer: Any, request_id: int, op: Any, cls: type) -> None:
        """During a resize a multi-key op becomes one single-key op per key, each routed (and
        re-routed on MOVED, Rule 6) on its own; the gather puts the answers back together."""
        self._start_gather(peer, request_id, *split_multi(op, self.n, per_key=True), data=True)

    def _fan_out(self, peer: Any, request_id: int, op: p.Op) -> None:
        """Admin ops go to every shard; a down shard is an error part, not a refusal."""
        combine, tolerant = self._admin[type(op)]
        gather = Gather(peer, request_id, len(self.links), combine, tolerant)
        deadline_s = gather_deadline(op)  # health, stats and hotkeys never wait on a stuck shard
        if deadline_s is not None:
            gather.deadline = time.monotonic() + deadline_s
            self.timed.append(gather)
        if type(op) is p.Health:
            op = p.Ping()
        for link in self.links:
            if link.up:
                self._queue(link, op, (gather, None))
            else:
                self._complete_part(gather, link.shard, None, (p.UNAVAILABLE, f"shard {link.shard} is down"), None)

    def _set_maintenance(self, peer: Any, request_id: int, op: p.Maintenance) -> None:
        """The router refuses writes itself, and tells every worker, so that their own endpoints
        (direct mode) refuse them too; the answer waits until the workers have it (a stuck one at
        most GATHER_DEADLINE_S). A worker that is down learns it when it comes back (on_shard_event)."""
        up = [link for link in self.links if link.up]
        if op.on is None or op.on == self.maintenance or not up:
            if op.on is not None:
                self.maintenance = op.on
            self.reply(peer, request_id, p.OK, self.maintenance)
            return
        self.maintenance = op.on
        log.warning("maintenance mode %s", "ON: writes are refused" if op.on else "off")
        gather = Gather(peer, request_id, len(up), lambda parts: self.maintenance, tolerant=True)
        gather.deadline = time.monotonic() + GATHER_DEADLINE_S
        self.timed.append(gather)
        for link in up:
            self._queue(link, p.SetMaintenance(op.on), (gather, None))

    def _configure(self, peer: Any, request_id: int, op: p.Configure) -> None:
        """Apply live settings (SIGHUP, tune): validated like the config file, kept in ``self.config``
        (what stats and the balance check read), the router's own taken from it, then sent to every shard."""
        settings = dict(op.settings)
        restart = sorted(k for k in settings if k in RESTART_KEYS)  # config.SETTINGS says which
        if restart:
            self.reply(peer, request_id, p.BAD_REQUEST,
                       f"configure: {', '.join(restart)} only take effect after a restart")
            return
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

    def _debug_sleep(self, peer: Any, request_id: int, op: p.DebugSleep) -> None:
        if not 0 <= op.shard < self.n:
            self.reply(peer, request_id, p.BAD_REQUEST, f"no shard {op.shard}; there are {self.n}")
            return
        self._start_gather(peer, request_id, [(op.shard, op, None)], lambda parts: parts[0][2], None)

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

    # --- stats (router_stats combines) ---------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "shards": self.n,
            "mailbox_limit": self.mailbox_limit,
            "requests": self.requests,
            "maintenance": self.maintenance,
            "clients_in_flight": len(self.peer_inflight),  # connections with requests unanswered (Rule 5)
            **({"resp": self.resp.stats()} if self.resp is not None else {}),
            **({"cluster": self.cluster.stats(_monotonic())} if self.cluster is not None else {}),
        }

    def _combine_stats(self, parts: list[tuple[int, Any, Any]]) -> dict[str, Any]:
        return combine_stats(parts, self.links, self.stats(), self.config.imbalance_threshold)

    def check_balance(self, now: float) -> None:
        """Every imbalance_check_s, gather stats from the shards and warn about a hot one."""
        if now < self.next_balance_check or self.draining:
            return
        self.next_balance_check = now + self.config.imbalance_check_s
        up = [link for link in self.links if link.up]
        if not up:
            return
        gather = Gather(None, 0, len(up), self._warn_imbalance, True)
        gather.deadline = now + GATHER_DEADLINE_S  # a stuck shard must not keep this gather forever
        self.timed.append(gather)
        for link in up:
            self._queue(link, p.Stats(), (gather, None))
        self.flush_outboxes()

    def _warn_imbalance(self, parts: list[tuple[int, Any, Any]]) -> None:
        news = imbalance_news(self._combine_stats(parts), self.imbalanced, time.monotonic(),
                              self.config.imbalance_threshold)
        for warning, message in news:
            log.log(logging.WARNING if warning else logging.INFO, "%s", message)

    # --- shard traffic --------------------------------------------------------------

    def flush_outboxes(self) -> None:
        for link in self.links:
            if link.out_frames:
                failed = link.flush()
                if failed is not None:  # no live connection: the worker just died
                    self._fail(link, *failed, "went down")

    def on_shard(self, link: ShardLink) -> None:
        send_to = self.send_to
        for frame in link.channel.receive():
            try:
                batch = p.decode_batch_reply(frame)
            except Exception:
                log.error("shard %d sent an undecodable reply (%d bytes); dropped", link.shard, len(frame))
                continue
            entry = link.take(batch.seq)
            if entry is None:
                continue  # Rule 3: a reply to something already failed
            targets, frames = entry
            # Only an old shard during (or just after) a resize can answer MOVED: peek then.
            check_moved = batch.seq < link.moved_until
            # A cluster node whose lease lapsed while these were in flight passes on no answer.
            lapsed = self.cluster is not None and self.cluster.lapsed(_monotonic())
            for target, raw, frame in zip(targets, batch.replies, frames, strict=False):
                if check_moved and self._rerouted(target, raw, frame):
                    continue
                if lapsed and (type(target) is not MigrationStep
                               and (type(target) is not tuple or target[0].data)):
                    raw = router_cluster.lapsed_reply(raw, self.cluster.node_id)  # type: ignore[union-attr]
                if type(target) is tuple:
                    self._on_part(target, link.shard, raw)
                elif type(target) is MigrationStep:
                    try:
                        reply = p.decode_reply(raw)
                    except Exception:
                        self._on_step(target, p.INTERNAL_ERROR, f"shard {link.shard} sent garbage")
                    else:
                        self._on_step(target, reply.status, reply.value)
                else:
                    send_to(target, raw)
        # Replies can queue work: a re-routed MOVED request, a resize step, nothing otherwise.
        self.flush_outboxes()

    def _on_part(self, target: tuple[Gather, Any], shard: int, raw: Any) -> None:
        gather = target[0]
        answer = gather.add_reply(shard, target[1], raw)
        if answer is not None:
            self.reply(gather.peer, gather.request_id, *answer)

    def _complete_part(self, gather: Gather, shard: int, context: Any,
                       error: tuple[int, str] | None, value: Any) -> None:
        answer = gather.add(shard, context, error, value)
        if answer is not None:
            self.reply(gather.peer, gather.request_id, *answer)

    def _fail(self, link: ShardLink, targets: list[Any], frames: list[bytes], why: str) -> None:
        """Answer UNAVAILABLE for ops the link handed back: their shard went down (Rule 2)."""
        message = f"shard {link.shard} {why}; retry shortly"
        for target, frame in zip(targets, frames, strict=True):
            if type(target) is tuple:
                self._complete_part(target[0], link.shard, target[1], (p.UNAVAILABLE, message), None)
            elif type(target) is MigrationStep:
                self._on_step(target, p.UNAVAILABLE, message)
            else:
                env = p.decode_envelope(frame, self.limits)
                request_id = env.id if isinstance(env, p.Envelope) else 0
                self.reply(target, request_id, p.UNAVAILABLE, message)

    def on_shard_event(self, link: ShardLink, event: str | None) -> None:
        if event == "up" and not link.up:
            link.up = True
            log.info("shard %d is up", link.shard)
            # Learn the worker's own endpoint (it changes when a worker restarts).
            self._queue(link, p.Describe(), MigrationStep(StepKind.DESCRIBE, link.shard))
            if self.maintenance:  # a restarted worker starts with maintenance off
                self._queue(link, p.SetMaintenance(True), MigrationStep(StepKind.NOTICE, link.shard))
            if self.cluster is not None:  # and with no slot states: it serves nothing directly until now
                router_cluster.push_states(self, links=[link])
            self.flush_outboxes()
        elif event == "down" and link.up:
            log.warning("shard %d is down; answering UNAVAILABLE for it", link.shard)
            for targets, frames in link.go_down():
                self._fail(link, targets, frames, "went down")

    def idle(self) -> bool:
        return all(not link.pending for link in self.links)

    # --- topology and resizing (the state machine is shardd.migration) ---------------

    @property
    def migration(self) -> Migration | None:
        """The resize once its workers are started: multi-key ops are split per key, some ops refused."""
        mig = self.resize
        return mig if mig is not None and mig.phase is not Phase.REQUESTED else None

    def topology(self) -> dict[str, Any]:
        mig = self.resize
        return {
            "epoch": self.epoch,
            "shards": self.n,
            "hash": "jump_hash(xxh3_64(key, seed=0), shards)",
            # Every connected worker's own endpoint, new shards of a running resize included
            # (MOVED names them); None until the worker has told us.
            # Cluster mode with replicas: writes on a worker's own endpoint would not reach the
            # replication stream (the router notes written keys), so no direct mode then.
            "endpoints": [None if self.cluster is not None and self.cluster.replicated else link.direct
                          for link in self.links],
            **self._feeds(),
            **(mig.topology_fields() if mig is not None else {"resizing": None, "pending_resize": None}),
            **({"cluster": self.cluster.describe()} if self.cluster is not None else {}),
        }

    def _feeds(self) -> dict[str, Any]:
        """Each worker's invalidation feed (docs/near-cache.md), None where it has none yet; left out
        when the daemon has no near caches, so that clients turn theirs off."""
        if not self.config.near_cache or self.cluster is not None:
            return {}
        return {"invalidations": [link.invalidations for link in self.links]}

    def _request_resize(self, peer: Any, request_id: int, op: p.Resize) -> None:
        """A client asks for M shards (protocol checked the bound): wake the supervisor, which starts
        workers and calls back with resize_start."""
        if self.resize is not None:
            self.reply(peer, request_id, p.BUSY, "a resize is already running; wait for it to finish")
        elif op.shards == self.n:
            self.reply(peer, request_id, p.OK, {"from": self.n, "to": self.n, "moved": 0, "total": 0, "lost": 0,
                                                "epoch": self.epoch, "seconds": 0.0})
        elif down := [link.shard for link in self.links if not link.up]:
            self.reply(peer, request_id, p.UNAVAILABLE, f"shard(s) {down} are down; resize when all are up")
        else:
            self.resize = Migration(self.n, op.shards, self.epoch + 1, (peer, request_id))
            log.info("resize %d → %d requested", self.n, op.shards)
            self.notify_supervisor()

    def _start_resize(self, peer: Any, request_id: int, op: p.ResizeStart) -> None:
        """The supervisor has started the workers: connect to them; moving starts once all are up."""
        mig = self.resize
        if mig is None or mig.phase is not Phase.REQUESTED or mig.new != op.shards:
            self.reply(peer, request_id, p.BAD_REQUEST, "no such resize pending")
            return
        for shard in mig.start():
            link = ShardLink(shard, self.connect(shard))
            self.links.append(link)
            self.on_new_link(link)
        for link in self.links:
            link.moved_until = NO_LIMIT
        self.reply(peer, request_id, p.OK, True)
        self.advance_resize()

    def advance_resize(self) -> None:
        """Start moving once every shard is connected; finish once everything has moved."""
        mig = self.resize
        if mig is None:
            return
        if mig.phase is Phase.CONNECTING:
            if all(link.up for link in self.links):
                self._drive(mig, mig.links_up())
                self.flush_outboxes()
        elif mig.finished():
            self._finish_resize(mig)

    def _on_step(self, step: MigrationStep, status: int, value: Any) -> None:
        if step.kind is StepKind.DESCRIBE:
            if status == p.OK and step.shard < len(self.links):
                link = self.links[step.shard]
                link.direct, link.invalidations = value.get("direct"), value.get("invalidations")
        elif step.kind is StepKind.NOTICE:
            if status != p.OK:
                log.error("shard %d did not take a notice: status %d: %s", step.shard, status, value)
        elif self.resize is not None:
            self._drive(self.resize, self.resize.on_reply(step, status, value))

    def _drive(self, mig: Migration, sends: list[Send]) -> None:
        links = self.links
        for shard, op, step in sends:
            self._queue(links[shard], op, step)
        if mig.finished():
            self._finish_resize(mig)

    def _finish_resize(self, mig: Migration) -> None:
        for link in self.links:
            link.moved_until = link.next_seq  # replies to what was sent until now may still say MOVED
        self._drive(mig, mig.finish())  # set_topology
        self.resize = None
        self.epoch, self.n = mig.epoch, mig.new
        removed, self.links = self.links[mig.new:], self.links[: mig.new]
        self.retiring.extend(removed)
        result = mig.result()
        if mig.failed:
            log.error("resize %d → %d finished with errors: %s", mig.old, mig.new, mig.failed)
        log.info("resize %d → %d done: %d of %d keys moved in %.3f s (epoch %d)", mig.old, mig.new,
                 mig.moved, mig.total, result["seconds"], mig.epoch)
        if mig.waiter is not None:
            self.reply(*mig.waiter, *mig.outcome())
        self.flush_outboxes()
        for link in removed:  # flush_outboxes sees only self.links; a removed shard may still have queued ops
            failed = link.flush()
            if failed is not None:
                self._fail(link, *failed, "went down")
        self.retire_links()

    def retire_links(self) -> None:
        """Close removed shards that have nothing in flight; then let the supervisor stop them."""
        for link in [link for link in self.retiring if link.idle()]:
            self.retiring.remove(link)
            self.on_removed_link(link)
        if not self.retiring and self.resize is None:
            self.notify_supervisor()  # resize over: the supervisor stops removed workers

    def _rerouted(self, target: Any, raw: Any, frame: bytes) -> bool:
        """If this reply is MOVED, queue the request to the key's new owner instead; True if so (Rule 6)."""
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
        self.links[owner].queue(frame, target)
        return True


# --- route()'s checks and dispatch, read from the op table ------------------------------------

_OPS = p.OPS
_KEYED = p.KEYED


def _gate(router: Router, spec: p.OpSpec, op: p.Op, privileged: bool) -> tuple[int, str] | None:
    """The refusal the op table asks for, if any: the same checks in the same order for every op."""
    tag = type(op).__struct_config__.tag
    if spec.kind == p.INTERNAL:
        return p.BAD_REQUEST, f"{tag} is sent by the router to its workers, never by a client"
    if spec.control and not privileged:
        return p.BAD_REQUEST, f"{tag} is accepted on the control endpoint only"
    asks = spec.query is not None and spec.query(op)  # this instance only reads
    if (spec.admin and not asks and not privileged and router.admin_ids is not None
            and not router.caller_is_admin):
        return p.FORBIDDEN, f"{tag} needs an admin key (auth_dir/admins); this key is a client key"
    if router.maintenance and p.is_write(spec, op):
        return p.MAINTENANCE, "the daemon is in maintenance mode: writes are refused, reads work; retry later"
    if spec.resize == p.REFUSE and router.migration is not None:
        return p.BUSY, f"{tag} is refused while a resize runs; retry"
    return None


def _multi(router: Router, peer: Any, request_id: int, op: Any) -> None:
    cls = type(op)
    if router.cluster is not None:  # a part of a cluster client's split: all served here, or none applied
        keys = [key for key, _ in op.items] if cls is p.SetMany else op.keys
        problem = router.cluster.refusal_many(keys, _monotonic())
        if problem is not None:
            router.reply(peer, request_id, *problem)
            return
        if router.cluster.replicated and cls is not p.GetMany:
            for key in keys:
                router.cluster.note_write(key)
    if router.migration is not None:  # resize = SPLIT: one sub-op per key, each may move
        router._split_per_key(peer, request_id, op, cls)
    elif cls is p.SetMany:
        router._split_set_many(peer, request_id, op)
    else:
        router._split_keys(peer, request_id, op, cls)


def _topology(router: Router, peer: Any, request_id: int, op: p.Topology) -> None:
    router.reply(peer, request_id, p.OK, router.topology())


def _drain(router: Router, peer: Any, request_id: int, op: p.Drain) -> None:
    if not router.draining:
        router.draining = True
        log.info("draining: refusing new client requests; answering what is in flight")
    router.drain_waiters.append((peer, request_id))


def _internal(router: Router, peer: Any, request_id: int, op: p.Op) -> None:
    raise AssertionError("_gate refuses internal ops")  # pragma: no cover


# The router's own handler of each ROUTER op; the other kinds are handled by kind. A ROUTER op missing
# here fails at import.
_ROUTER_LOCAL: dict[type, Callable[[Router, Any, int, Any], None]] = {
    p.Maintenance: Router._set_maintenance,
    p.Configure: Router._configure,
    p.Tune: Router._tune,
    p.Topology: _topology,
    p.Resize: Router._request_resize,
    p.ResizeStart: Router._start_resize,
    p.Drain: _drain,
    p.DebugSleep: Router._debug_sleep,
    **router_cluster.HANDLERS,
    **router_keyspace.HANDLERS,  # set_many_nx, scan: sent whole to one shard
}
_BY_KIND: dict[str, Callable[[Router, Any, int, Any], None]] = {
    p.MULTI: _multi, p.FANOUT: Router._fan_out, p.INTERNAL: _internal,
}
# type(op) → handler, for every op but the keyed ones (route() forwards those itself).
_DISPATCH = {cls: _ROUTER_LOCAL[cls] if spec.kind == p.ROUTER else _BY_KIND[spec.kind]
             for cls, spec in _OPS.items() if spec.kind != _KEYED}


def run_router(config: Config) -> int:
    """Serve until SIGTERM: the router process's entry point (its wiring is shardd.router_main)."""
    from shardd.router_main import serve

    return serve(config)
