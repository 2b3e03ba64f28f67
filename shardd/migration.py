"""One online resize (N → M shards) as a sans-IO state machine: replies in, messages to send out.

Everything that changes the resize's state is in this file (h11's rule). The router feeds it
events (``start``, ``links_up``, ``on_reply``) and queues the ``Send`` tuples it returns; the
machine never touches a socket, a link or the clock's consumers, so it is unit-tested step by
step (tests/unit/test_migration.py). Workers implement the ops in worker.py; the supervisor
starts and stops their processes.

How a resize runs
-----------------
1. REQUESTED. A client asks ``resize(M)``. The router creates the Migration and wakes the
   supervisor (SIGUSR1), which starts the workers M > N needs and calls ``resize_start(M)``.
2. CONNECTING (``start``). The router connects to the new workers and waits until every link
   is up; while it waits, and until the end, any reply may say MOVED.
3. MOVING (``links_up``). ``migrate(epoch, M, N)`` goes to every shard. From then on a shard
   answers MOVED for a key it does not hold and will not own under M (the key has moved, or it
   never existed and its new owner must create it). The router keeps routing by the *old*
   placement. Each old shard is asked repeatedly for a batch of entries that move
   (``migrate_out``: bounded scan, entries removed as they are returned); each batch is sent on
   to the new owners (``migrate_in``) before anything else is read from that shard, so when a
   request for a moved key comes back MOVED and is re-sent to the new owner, the entry is
   already queued ahead of it there. When an old shard has been scanned to the end,
   ``migrate_done(source)`` is queued to every other shard of the new layout, behind that
   shard's last batch, and counted with the imports in flight.
4. DONE (``finish``), once every old shard is scanned and every import and migrate_done is
   answered: the epoch goes up, placement switches to M, every shard of the new layout gets
   ``set_topology``, the router retires removed links once nothing is in flight to them (the
   supervisor then stops their workers), and the client gets
   ``{from, to, moved, total, lost, seconds, epoch}``.

Invariants
----------
Rule 1: ``imports_in_flight`` counts every migrate_in and migrate_done sent and not answered;
        ``finished()`` is true only in MOVING with no shard left to scan and that count at 0.
Rule 2: for each old shard, at most one migrate_out is outstanding, and the next one is
        asked only after the previous batch's migrate_in messages were returned to be queued,
        so they precede it (and that shard's migrate_done) on every link.
Rule 3: a failed step (status not OK, UNAVAILABLE for a shard that went down) never stalls the
        machine: it is recorded in ``failed`` and treated as an empty, final answer.

Why this keeps the guarantees: a key is in exactly one store at any moment (``take`` removes
it in the same step that exports it); every op on a key is applied by the shard that holds it,
in the order the router forwarded it; a write to a key that exists nowhere goes to its new
owner (MOVED from the old one). So no acknowledged write is lost, nothing deleted comes back,
reads see the latest write, and TTLs and CAS versions travel with the entry.

Direct mode. A direct client's request reaches a worker on the worker's own socket, which
nothing orders against the router's ``migrate_in``: an entry can be taken from its old owner
(which then answers MOVED) and still be in the router, or queued, when the client arrives at
the new owner. So on its own endpoint a shard answers for a key it does not hold only when
no old shard may still be sending it: if the key's old owner has not yet sent
``migrate_done``, the answer is TRYAGAIN (nothing applied), and the client library sends the
request through the router instead, where the ordering above holds. A shard started by the
resize begins with the old shard count, so until ``migrate`` arrives it owns nothing (MOVED).
"""

from __future__ import annotations

import enum
import logging
import time
from typing import Any

from shardd import protocol as p
from shardd.hashing import shard_for

log = logging.getLogger("shardd.router")


class Phase(enum.Enum):
    REQUESTED = "requested"    # waiting for the supervisor's resize_start
    CONNECTING = "connecting"  # waiting for every worker of the new layout to be up
    MOVING = "moving"          # migrate sent; scanning old shards, importing into new owners
    DONE = "done"              # set_topology sent; the router drops the Migration


class StepKind(enum.Enum):
    """What a router → worker request that belongs to no client was for."""

    MIGRATE = "migrate"
    OUT = "out"
    IN = "in"
    DONE = "done"
    TOPOLOGY = "topology"
    DESCRIBE = "describe"  # not a resize step: the router learning a worker's own endpoint
    NOTICE = "notice"  # not a resize step: news for a worker (maintenance mode); a failure is logged


class MigrationStep:
    """The target of a router → worker request that is the router's own, not a client's."""

    __slots__ = ("entries", "kind", "shard")

    def __init__(self, kind: StepKind, shard: int, entries: int = 0) -> None:
        self.kind = kind
        self.shard = shard
        self.entries = entries  # IN: how many entries the migrate_in carries


# (shard, op, step): what the router queues to that shard's link.
Send = tuple[int, p.Op, MigrationStep]


class Migration:
    """The state, counters and transitions of one resize (see the module docstring)."""

    def __init__(self, old: int, new: int, epoch: int, waiter: tuple[Any, int] | None) -> None:
        self.old = old
        self.new = new
        self.epoch = epoch            # the epoch the daemon will have when this resize ends
        self.waiter = waiter          # (peer, request id) of the client that asked
        self.phase = Phase.REQUESTED
        self.started = time.monotonic()
        self.total = 0                # keys the old shards had when the resize began
        self.moved = 0
        self.lost = 0                 # entries a new owner could not adopt (memory bound)
        self.scanning: set[int] = set()   # old shards still being scanned
        self.imports_in_flight = 0        # Rule 1
        self.failed: str | None = None

    @property
    def shards(self) -> int:
        """Links the router keeps while the resize runs: old and new layout together."""
        return max(self.old, self.new)

    def start(self) -> range:
        """resize_start arrived (the workers are started): the shards the router must connect."""
        if self.phase is not Phase.REQUESTED:
            raise RuntimeError(f"start in phase {self.phase.name}")
        self.phase = Phase.CONNECTING
        return range(self.old, self.new)

    def links_up(self) -> list[Send]:
        """Every link is up: begin moving. Every shard learns of the resize, new ones too (each
        answers its own endpoint's clients by it, MOVED or TRYAGAIN, until set_topology); only
        old shards are scanned."""
        if self.phase is not Phase.CONNECTING:
            return []
        self.phase = Phase.MOVING
        self.scanning = set(range(self.old))
        migrate = p.Migrate(self.epoch, self.new, self.old)
        return [(shard, migrate, MigrationStep(StepKind.MIGRATE, shard)) for shard in range(self.shards)]

    def on_reply(self, step: MigrationStep, status: int, value: Any) -> list[Send]:
        """A worker answered ``step``; returns what to send next (Rules 1-3)."""
        if self.phase is not Phase.MOVING or step.kind is StepKind.TOPOLOGY:
            return []
        ok = status == p.OK
        if not ok:
            self.failed = f"shard {step.shard} answered {step.kind.value} with status {status}: {value}"
            log.error("resize: %s", self.failed)
        kind = step.kind
        if kind is StepKind.MIGRATE:
            self.total += value if ok else 0
            if step.shard in self.scanning:
                return [_out(step.shard)]
        elif kind is StepKind.OUT:
            return self._on_batch(step.shard, value if ok else {"entries": [], "done": True})
        elif kind is StepKind.DONE:
            self.imports_in_flight -= 1
        elif kind is StepKind.IN:
            self.imports_in_flight -= 1
            adopted = value if ok else 0
            if adopted < step.entries:
                self.lost += step.entries - adopted
                log.error("resize: shard %d could not adopt %d entries (memory bound)", step.shard,
                          step.entries - adopted)
        return []

    def _on_batch(self, source: int, batch: dict[str, Any]) -> list[Send]:
        sends: list[Send] = []
        for owner, entries in self.group_by_owner(batch["entries"]).items():
            self.imports_in_flight += 1
            self.moved += len(entries)
            sends.append((owner, p.MigrateIn(entries), MigrationStep(StepKind.IN, owner, len(entries))))
        if not batch["done"]:
            sends.append(_out(source))  # Rule 2: behind this batch's imports
            return sends
        self.scanning.discard(source)
        # Queued behind the last of this shard's entries on each link: once a shard has applied
        # it, every key it will get from ``source`` is in its store.
        done = p.MigrateDone(source)
        for shard in range(self.new):
            if shard != source:
                self.imports_in_flight += 1
                sends.append((shard, done, MigrationStep(StepKind.DONE, shard)))
        return sends

    def group_by_owner(self, entries: list[list[Any]]) -> dict[int, list[tuple[bytes, bytes, int, int]]]:
        groups: dict[int, list[tuple[bytes, bytes, int, int]]] = {}
        new = self.new
        for key, value, expires, version in entries:
            groups.setdefault(shard_for(key, new), []).append((key, value, expires, version))
        return groups

    def finished(self) -> bool:
        return self.phase is Phase.MOVING and not self.scanning and not self.imports_in_flight

    def finish(self) -> list[Send]:
        """Everything has moved: the new layout's ``set_topology`` for every shard that stays."""
        if not self.finished():
            raise RuntimeError(f"finish in phase {self.phase.name} with {len(self.scanning)} shard(s) scanning "
                               f"and {self.imports_in_flight} import(s) in flight")
        self.phase = Phase.DONE
        topology = p.SetTopology(self.epoch, self.new)
        return [(shard, topology, MigrationStep(StepKind.TOPOLOGY, shard)) for shard in range(self.new)]

    def outcome(self) -> tuple[int, Any]:
        """(status, value) for the client that asked."""
        if self.failed:
            return p.INTERNAL_ERROR, f"resize finished with errors: {self.failed}"
        return p.OK, self.result()

    def result(self) -> dict[str, Any]:
        return {"from": self.old, "to": self.new, "moved": self.moved, "total": self.total,
                "lost": self.lost, "epoch": self.epoch, "seconds": round(time.monotonic() - self.started, 3)}

    def topology_fields(self) -> dict[str, Any]:
        """This resize as the topology reply shows it ("resizing" and "pending_resize")."""
        if self.phase is Phase.REQUESTED:
            return {"resizing": None, "pending_resize": self.new}
        return {"resizing": {"to": self.new, "epoch": self.epoch, "moving": self.phase is Phase.MOVING},
                "pending_resize": None}


def _out(shard: int) -> Send:
    return shard, p.MigrateOut(), MigrationStep(StepKind.OUT, shard)
