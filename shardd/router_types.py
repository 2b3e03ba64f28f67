"""Plain state the router keeps: who asked (peers), what is in flight per shard (links), and
requests answered from several shards (gathers). No sockets are created here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shardd import transport


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
