"""Requests the router answers from several shard replies: gathers, and how multi-key ops are
split into parts and their answers put back together. No I/O: a gather returns the answer,
the router sends it.

A part is (shard, context, value): ``context`` is what the split remembered about the part
(the key positions it carries), ``value`` the shard's answer or, for a failed part,
(status, message).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from shardd import protocol as p
from shardd.hashing import group_positions, shards_for

log = logging.getLogger("shardd.router")

Part = tuple[int, Any, Any]
Combine = Callable[[list[Part]], Any]


class ControlPeer:
    """A client of the control endpoint (the supervisor): replies go out on the control inbox."""

    __slots__ = ("identity",)

    def __init__(self, identity: bytes) -> None:
        self.identity = identity


class Gather:
    """One client request answered from several shard replies (multi-key and admin ops)."""

    __slots__ = ("combine", "data", "deadline", "done", "error", "parts", "peer", "remaining", "request_id",
                 "tolerant")

    def __init__(self, peer: Any, request_id: int, parts: int, combine: Combine, tolerant: bool = False) -> None:
        self.peer = peer
        self.request_id = request_id
        self.remaining = parts
        self.parts: list[Part] = []
        self.error: tuple[int, str] | None = None
        self.combine = combine
        # A tolerant gather (stats) still combines when some shards failed; others answer
        # the first error.
        self.tolerant = tolerant
        # A gather with a deadline (health, stats, hotkeys) is completed by the router's clock
        # if some shard has not answered by then; later parts are ignored.
        self.deadline: float | None = None
        self.done = False
        self.data = False  # a multi-key op's parts (cluster mode: refused if the lease lapses meanwhile)

    def add(self, shard: int, context: Any, error: tuple[int, str] | None, value: Any) -> tuple[int, Any] | None:
        """Record one part; once it was the last, the (status, value) to answer the client with."""
        if self.done:
            return None  # completed by its deadline; a late part changes nothing
        if error is not None and self.error is None:
            self.error = error
        self.parts.append((shard, context, value if error is None else error))
        self.remaining -= 1
        if self.remaining:
            return None
        self.done = True
        if self.error is not None and not self.tolerant:
            return self.error
        try:
            return p.OK, self.combine(self.parts)
        except Exception as exc:
            log.exception("gather failed")
            return p.INTERNAL_ERROR, f"internal error: {exc!r}"

    def add_reply(self, shard: int, context: Any, raw: Any) -> tuple[int, Any] | None:
        """Record a shard's encoded reply as a part (see ``add``)."""
        try:
            reply = p.decode_reply(raw)
        except Exception:
            return self.add(shard, context, (p.INTERNAL_ERROR, f"shard {shard} sent garbage"), None)
        error = None if reply.status == p.OK else (reply.status, f"shard {shard}: {reply.value}")
        return self.add(shard, context, error, reply.value)


def split_multi(op: Any, n: int, per_key: bool) -> tuple[list[tuple[int, p.Op, Any]], Combine, Any]:
    """A get_many / set_many / delete_many as (shard, sub-op, context) parts, how to combine the
    answers, and the answer when there are no keys.

    Normally one sub-op per shard involved, its context the positions of its keys in ``op``.
    ``per_key`` (while a resize runs): one single-key op per key, so each can be re-routed on
    MOVED on its own.

    Every key is placed by one ``shards_for`` call and each shard's keys are picked with list
    comprehensions: no Python call per key (a get_many of 100 keys spent ~3/4 of the router's
    time in per-key placement before).
    """
    cls = type(op)
    pairs = op.items if cls is p.SetMany else op.keys
    empty = [] if cls is p.GetMany else 0
    keys = [item[0] for item in pairs] if cls is p.SetMany else pairs
    shards = shards_for(keys, n)
    if per_key:
        if cls is p.SetMany:
            ttl_ms = op.ttl_ms
            subs: list[Any] = [p.Set(key, value, ttl_ms) for key, value in pairs]
        elif cls is p.GetMany:
            subs = [p.Get(key) for key in pairs]
        else:
            subs = [p.Delete(key) for key in pairs]
        parts = list(zip(shards, subs, range(len(subs)), strict=True))
        return parts, (_scatter_one(len(subs)) if cls is p.GetMany else count_truthy), empty
    if not pairs:
        return [], sum_parts, empty
    first = shards[0]
    if shards.count(first) == len(shards):  # every key on one shard: the op as it came
        parts = [(first, op, None)]
    else:
        pick = pairs.__getitem__
        parts = []
        for shard, positions in group_positions(shards).items():
            picked = list(map(pick, positions))
            parts.append((shard, p.SetMany(picked, op.ttl_ms) if cls is p.SetMany else cls(picked), positions))
    return parts, (_scatter_many(len(pairs)) if cls is p.GetMany else sum_parts), empty


def _scatter_many(size: int) -> Combine:
    def combine(parts: list[Part]) -> list[Any]:
        if len(parts) == 1 and parts[0][1] is None:  # one part holding every key, in order
            values = parts[0][2]
            if type(values) is not list or len(values) != size:
                raise ValueError(f"a shard answered {values!r:.60} for {size} keys")
            return values
        out: list[Any] = [None] * size
        put = out.__setitem__
        for _, positions, values in parts:
            if len(values) != len(positions):
                raise ValueError(f"a shard answered {len(values)} values for {len(positions)} keys")
            deque(map(put, positions, values), 0)  # out[positions[i]] = values[i], in C
        return out
    return combine


def _scatter_one(size: int) -> Combine:
    def combine(parts: list[Part]) -> list[Any]:
        out: list[Any] = [None] * size
        for _, position, value in parts:
            out[position] = value
        return out
    return combine


def by_shard(parts: list[Part]) -> list[Any]:
    return [value for _, _, value in sorted(parts, key=lambda part: part[0])]


def sum_parts(parts: list[Part]) -> int:
    return sum(value for _, _, value in parts)


def count_parts(parts: list[Part]) -> int:
    return len(parts)


def count_truthy(parts: list[Part]) -> int:
    return sum(1 for _, _, value in parts if value)
