"""The router's part in an online resize: topology, resize requests, driving the migration.

A mixin of :class:`shardd.router.Router`, kept apart so the router's request path reads on
its own; the theory of operation and the guarantees are in :mod:`shardd.migration`.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from shardd import protocol as p
from shardd import transport
from shardd.hashing import shard_for
from shardd.migration import Migration, MigrationStep
from shardd.router_types import Gather, ShardLink

log = logging.getLogger("shardd.router")

# moved_until of every link while a resize runs: any reply may say MOVED.
NO_LIMIT = float("inf")


class ResizeDuty:
    """Resize methods of the Router (they use its links, outboxes and reply helpers)."""

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
            link.moved_until = NO_LIMIT
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
            # Every shard learns of the resize, new ones too: each answers its own endpoint's
            # clients by it (MOVED, TRYAGAIN) until set_topology. Only old shards are scanned.
            for link in self.links:
                self._queue(link, p.Migrate(mig.epoch, mig.new, mig.old), MigrationStep("migrate", link.shard))
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
            if step.shard in mig.scanning:
                self._queue(self.links[step.shard], p.MigrateOut(), MigrationStep("out", step.shard))
        elif step.kind == "out":
            value = reply.value if reply.status == p.OK else {"entries": [], "done": True}
            for owner, entries in mig.group_by_owner(value["entries"]).items():
                mig.imports_in_flight += 1
                mig.moved += len(entries)
                self._queue(self.links[owner], p.MigrateIn(entries), MigrationStep("in", owner, len(entries)))
            if value["done"]:
                mig.scanning.discard(step.shard)
                # Queued behind the last of this shard's entries on each link: once a shard has
                # applied it, every key it will get from step.shard is in its store.
                for link in self.links[: mig.new]:
                    if link.shard != step.shard:
                        mig.imports_in_flight += 1
                        self._queue(link, p.MigrateDone(step.shard), MigrationStep("done", link.shard))
            else:
                self._queue(self.links[step.shard], p.MigrateOut(), MigrationStep("out", step.shard))
        elif step.kind == "done":
            mig.imports_in_flight -= 1
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
