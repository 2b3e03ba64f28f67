"""The router's ops that go whole to one shard: ``set_many_nx`` and ``scan``.

A multi-key op is split per shard and is not atomic across shards (docs/protocol.md); these two
must not be split. ``set_many_nx`` is all or nothing, which one worker guarantees by checking and
writing in one step: so every key must be on one shard, computed here, and a request whose keys
are on several is refused before anything is sent. ``scan`` names its shard (a caller iterates
shards 0 to N-1, folding the shard into its own cursor); the worker keeps the cursor state. A
scan is served during a resize, but sees each shard as it is: a key that moves between shards
meanwhile may be missed or returned twice (the keyscan guarantees hold per shard).

Both are queued like any part of a gather (router Rule 1: a busy shard is BUSY, nothing sent).
In cluster mode both are data ops: refused when the lease has lapsed, and a scan answers only
keys of slots the node serves (a node's shards may also hold replicated entries).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from shardd import protocol as p
from shardd.hashing import shards_for
from shardd.router_types import Part

if TYPE_CHECKING:
    from shardd.router import Router

__all__ = ["HANDLERS"]


def _the_value(parts: list[Part]) -> Any:
    return parts[0][2]


def _set_many_nx(router: Router, peer: Any, request_id: int, op: p.SetManyNx) -> None:
    keys = [key for key, _ in op.items]
    cluster = router.cluster
    if cluster is not None:  # all served here, or none applied (as a multi-key op)
        problem = cluster.refusal_many(keys, time.monotonic())
        if problem is not None:
            router.reply(peer, request_id, *problem)
            return
    shards = sorted(set(shards_for(keys, router.n)))
    if len(shards) > 1:
        router.reply(peer, request_id, p.BAD_REQUEST,
                     f"set_many_nx: the keys are on more than one shard (shards {', '.join(map(str, shards))}); "
                     f"all-or-nothing needs them on one shard")
        return
    if cluster is not None and cluster.replicated:
        for key in keys:
            cluster.note_write(key)
    router._start_gather(peer, request_id, [(shards[0], op, None)], _the_value, None, data=True)


def _scan(router: Router, peer: Any, request_id: int, op: p.Scan) -> None:
    if not 0 <= op.shard < router.n:
        router.reply(peer, request_id, p.BAD_REQUEST, f"scan: no shard {op.shard}; there are {router.n}")
        return
    cluster = router.cluster
    combine = _the_value
    if cluster is not None:
        problem = cluster.refusal_many([], time.monotonic())  # no keys: only a lapsed lease refuses
        if problem is not None:
            router.reply(peer, request_id, *problem)
            return

        def combine(parts: list[Part]) -> Any:
            cursor, keys = parts[0][2]
            now = time.monotonic()
            return [cursor, [key for key in keys if cluster.refusal(key, now) is None]]

    router._start_gather(peer, request_id, [(op.shard, op, None)], combine, None, data=True)


HANDLERS: dict[type, Any] = {
    p.SetManyNx: _set_many_nx,
    p.Scan: _scan,
}
