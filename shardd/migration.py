"""State of one online resize (N → M shards), kept by the router. No I/O.

How a resize runs (router.py drives it; workers implement the ops in worker.py):

1. A client asks ``resize(M)``. The router records it and wakes the supervisor (SIGUSR1),
   which starts the workers M > N needs and answers with ``resize_start(M)``.
2. Once every new worker is connected, the router sends ``migrate(epoch, M, N)`` to every
   shard. From then on a shard answers MOVED for a key it does not hold and will not own
   under M (the key has moved, or it never existed and its new owner must create it).
3. The router keeps routing by the *old* placement. Each old shard is asked repeatedly for a
   batch of entries that move (``migrate_out``: bounded scan, entries removed as they are
   returned); the router sends each batch on to the new owners (``migrate_in``) before it
   reads anything else from that shard, so when a request for a moved key comes back MOVED and
   is re-sent to the new owner, the entry is already queued ahead of it there.
   When an old shard has been scanned to the end, the router queues ``migrate_done(source)``
   to every other shard of the new layout, behind that shard's last batch.
4. When every old shard has scanned all its keys and every batch is adopted, the epoch goes up,
   placement switches to M, every shard learns it (``set_topology``), removed shards are
   stopped, and the client gets ``{from, to, moved, total, seconds, epoch}``.

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

import time
from typing import Any

from shardd.hashing import shard_for


class MigrationStep:
    """A router → worker request that belongs to the resize, not to a client."""

    __slots__ = ("entries", "kind", "shard")

    def __init__(self, kind: str, shard: int, entries: int = 0) -> None:
        self.kind = kind      # "migrate", "out", "in", "done", "topology", "describe"
        self.shard = shard
        self.entries = entries


class Migration:
    """Counters and progress of one resize."""

    def __init__(self, old: int, new: int, epoch: int, waiter: tuple[Any, int] | None) -> None:
        self.old = old
        self.new = new
        self.epoch = epoch            # the epoch the daemon will have when this resize ends
        self.waiter = waiter          # (peer, request id) of the client that asked
        self.started = time.monotonic()
        self.moving = False           # False until every new worker is connected
        self.total = 0                # keys the old shards had when the resize began
        self.moved = 0
        self.lost = 0                 # entries a new owner could not adopt (memory bound)
        self.scanning: set[int] = set()   # old shards still being scanned
        self.imports_in_flight = 0
        self.failed: str | None = None

    def group_by_owner(self, entries: list[list[Any]]) -> dict[int, list[tuple[bytes, bytes, int, int]]]:
        groups: dict[int, list[tuple[bytes, bytes, int, int]]] = {}
        new = self.new
        for key, value, expires, version in entries:
            groups.setdefault(shard_for(key, new), []).append((key, value, expires, version))
        return groups

    def finished(self) -> bool:
        return self.moving and not self.scanning and not self.imports_in_flight

    def result(self) -> dict[str, Any]:
        return {"from": self.old, "to": self.new, "moved": self.moved, "total": self.total,
                "lost": self.lost, "epoch": self.epoch, "seconds": round(time.monotonic() - self.started, 3)}
