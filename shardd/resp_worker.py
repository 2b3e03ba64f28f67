"""The RESP endpoint inside a worker: the keys this shard owns are served here, the rest via the router.

Theory of operation
-------------------
With ``resp_front = "workers"`` every worker listens on ``resp_bind`` with
SO_REUSEPORT, so the kernel spreads Redis connections over the workers, one per core. A
connection's commands are parsed and answered by the worker that accepted it
(shardd.resp_server, the same code the router runs with ``resp_front = "router"``):

* a keyed op for a key this shard owns is applied at once, in this process, with exactly the
  checks a direct-mode client's request gets (``Shard.run``: maintenance, resize, ownership) —
  no hop at all, which is where the speed comes from (docs/resp.md, bench/RESULTS.md);
* a keyed op for another shard's key goes to that worker's inbox in a batch (one per peer per
  pass), which it applies with the same direct-client checks (it tells our batches from the
  router's by the DEALER identity, ``worker.PEER_IDENTITY``);
* a multi-key op (MGET, MSET, DEL of several keys) is split per shard here, each part taking the
  path of a keyed op for that shard, and gathered (router_types.Gather, as the router does);
* everything else — fan-out ops (DBSIZE, INFO, FLUSHALL, SCAN), MSETNX, an op answered MOVED or
  TRYAGAIN (a resize is moving the key), an op for a peer that is down — goes to the router over
  its control endpoint (``RouterLink``), which places it as it places any request.

Rules
-----
Rule 1: per connection, commands run in the order sent. Every op for a shard takes one path
        while no resize runs: applied here at once, or on that peer's link (FIFO). An op that
        goes through the router raises its connection's ``barrier``, and the connection runs no
        further command until the router has answered (resp_server holds them in its backlog):
        so FLUSHALL then SET, or an op re-sent after MOVED then the next op on that key, keep
        their order. Mid-resize every worker still places keys by the old layout (a worker started
        for the resize too: it starts with the current shard count), so an op goes to the key's
        old owner, which applies it while it holds the key and answers MOVED once it left; ops on
        one key thus reach the router in the order sent, and it orders them after the entry.
Rule 2: every op sent to the router is answered exactly once: by the router's reply, or with
        UNAVAILABLE when the link goes down with it pending (the router restarted).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from shardd import protocol as p
from shardd.hashing import shard_for
from shardd.router_types import Gather, split_multi
from shardd.shard_link import ShardLink

log = logging.getLogger("shardd.worker")

_LOCAL = p.ops_where(kind=p.KEYED, direct=True)  # what a worker may answer for its own keys
_SPLIT = frozenset((p.GetMany, p.SetMany, p.DeleteMany))  # split per shard here, as the router splits them


class GatherPart:
    """One shard's part of a multi-key op split here; the gather answers the command's target."""

    __slots__ = ("conn", "context", "gather", "shard")

    def __init__(self, gather: Gather, conn: Any, shard: int, context: Any) -> None:
        self.gather = gather
        self.conn = conn
        self.shard = shard
        self.context = context

    def answer(self, status: int, value: Any) -> None:
        gather = self.gather
        result = gather.add(self.shard, self.context, None if status == p.OK else (status, value), value)
        if result is not None:
            gather.peer.answer(*result)


class RouterLink:
    """A DEALER to the router's control endpoint; ops out, replies matched by request id."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel  # transport.ShardChannel: send(frame) -> bool, receive(), up/down events
        self.pending: dict[int, Any] = {}
        self.next_id = 1
        self.up = False

    def send(self, target: Any, op: p.Op) -> None:
        if not self.up:
            target.answer(p.UNAVAILABLE, "this worker is not connected to the router yet; retry shortly")
            return
        request_id = self.next_id
        self.next_id = request_id + 1
        if not self.channel.send(p.encode_request(request_id, op)):
            target.answer(p.UNAVAILABLE, "the router is not connected; retry shortly")
            return
        self.pending[request_id] = target
        target.conn.barrier += 1  # Rule 1: the connection's next command waits for this answer

    def on_readable(self) -> None:
        pending = self.pending
        for frame in self.channel.receive():
            try:
                reply = p.decode_reply(frame)
            except Exception:
                log.error("resp: the router sent an undecodable reply (%d bytes); dropped", len(frame))
                continue
            target = pending.pop(reply.id, None)
            if target is not None:
                target.conn.barrier -= 1
                target.answer(reply.status, reply.value)

    def on_event(self, event: str | None) -> None:
        if event == "up":
            self.up = True
        elif event == "down":
            self.up = False
            pending, self.pending = self.pending, {}
            for target in pending.values():  # Rule 2
                target.conn.barrier -= 1
                target.answer(p.UNAVAILABLE, "the router restarted; retry")


class WorkerFront:
    """What resp_server.RespServer submits to, in a worker: this shard's keys here, other shards'
    keys to their workers (PEER links, one batch per pass), and the rest to the router."""

    def __init__(self, shard: Any, link: RouterLink, connect_peer: Callable[[int], Any],
                 watch: Callable[..., None]) -> None:
        self.shard = shard  # worker.Shard
        self.link = link
        self.connect_peer = connect_peer  # shard → a channel to its worker's inbox (peer identity)
        self.watch = watch                # hub.watch(channel, on_readable, on_event)
        self.peers: dict[int, ShardLink] = {}
        self.caller_is_admin = True  # (the router's attribute; the RESP endpoint checks its own users)

    @property
    def n(self) -> int:
        return int(self.shard.shards)

    @property
    def config(self) -> Any:
        return self.shard.config

    def submit(self, target: Any, op: p.Op) -> None:
        shard = self.shard
        cls = type(op)
        if shard.cluster is None:
            if cls in _LOCAL:
                self._to(shard_for(op.key, shard.shards), target, op)
                return
            if cls in _SPLIT and shard.new_shards is None:  # (mid-resize: the router splits it per key)
                parts, combine, empty = split_multi(op, shard.shards, per_key=False)
                if not parts:
                    target.answer(p.OK, empty)
                    return
                gather = Gather(target, 0, len(parts), combine)
                for owner, sub_op, context in parts:
                    self._to(owner, GatherPart(gather, target.conn, owner, context), sub_op)
                return
        self._via_router(target, op)

    def _to(self, owner: int, target: Any, op: p.Op) -> None:
        """An op whose keys are all ``owner``'s: applied here, queued for that peer, or (the peer is
        away, full, or the op is answered MOVED/TRYAGAIN here) sent to the router."""
        shard = self.shard
        if owner == shard.shard_id:
            problem = p.check_op(op, shard.limits)  # what decoding a request checks (sizes, TTL bounds)
            if problem is not None:
                target.answer(*problem)
                return
            shard.store.touch_clock()
            status, value = shard.run(op)
            if status != p.MOVED and status != p.TRYAGAIN:  # those: a resize is moving the key
                target.answer(status, value)
                return
        else:
            peer = self.peers.get(owner)
            if peer is None:
                peer = self._connect(owner)
            if peer.up and peer.inflight < shard.mailbox_limit:
                peer.queue(p.encode_request(0, op), target)  # the peer checks it as a direct request
                target.conn.peer_flight += 1
                return
        self._via_router(target, op)

    def _via_router(self, target: Any, op: p.Op) -> None:
        """Send an op through the router once none of its connection's ops is on a peer link (Rule 1:
        an earlier op on the direct path must not be overtaken, e.g. MSET's part by a FLUSHALL)."""
        conn = target.conn
        if conn.peer_flight:
            conn.deferred.append((target, op))
            conn.barrier += 1  # its next commands wait, as behind any op through the router
            return
        self.link.send(target, op)

    def _peer_answered(self, conn: Any) -> None:
        conn.peer_flight -= 1
        if not conn.peer_flight and conn.deferred:
            deferred, conn.deferred = conn.deferred, []
            for target, op in deferred:
                conn.barrier -= 1  # (link.send counts it again, until the router answers)
                self.link.send(target, op)

    def _connect(self, owner: int) -> ShardLink:
        peer = self.peers[owner] = ShardLink(owner, self.connect_peer(owner))
        self.watch(peer.channel, lambda: self._on_replies(peer), lambda event: self._on_event(peer, event))
        return peer

    def flush_outboxes(self) -> None:
        """Send what this pass queued for each peer as one batch (a peer that went away: the router)."""
        for peer in self.peers.values():
            if peer.out_frames:
                failed = peer.flush()
                if failed is not None:
                    self._reroute(*failed, peer_answered=True)

    def _on_replies(self, peer: ShardLink) -> None:
        for frame in peer.channel.receive():
            try:
                batch = p.decode_batch_reply(frame)
            except Exception:
                log.error("resp: shard %d sent an undecodable reply; dropped", peer.shard)
                continue
            entry = peer.take(batch.seq)
            if entry is None:
                continue
            for target, request, raw in zip(*entry, batch.replies, strict=False):
                reply = p.decode_reply(raw)
                if reply.status == p.MOVED or reply.status == p.TRYAGAIN:  # a resize: the router places it
                    self._reroute([target], [request])
                else:
                    target.answer(reply.status, reply.value)
                self._peer_answered(target.conn)

    def _on_event(self, peer: ShardLink, event: str | None) -> None:
        if event == "up":
            peer.up = True
        elif event == "down" and peer.up:
            for targets, frames in peer.go_down():  # Rule 2: each one answered, through the router
                self._reroute(targets, frames, peer_answered=True)

    def _reroute(self, targets: list[Any], frames: list[bytes], peer_answered: bool = False) -> None:
        """Ops a peer did not apply (MOVED, TRYAGAIN, or it went away), through the router, in order."""
        for target, frame in zip(targets, frames, strict=True):
            env = p.decode_envelope(frame, self.shard.limits)
            if type(env) is bytes:
                reply = p.decode_reply(env)
                target.answer(reply.status, reply.value)
            else:
                self.link.send(target, env.op)
            if peer_answered:  # (a MOVED reply counts as answered in _on_replies)
                self._peer_answered(target.conn)
