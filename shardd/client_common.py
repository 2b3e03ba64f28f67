"""What Client and AsyncClient share besides the commands: ids, replies, pipelines.

The commands themselves are :mod:`shardd.commands`; the direct-mode policy is
:mod:`shardd.placement`; the socket is :mod:`shardd.transport_client`. What is left here is
the bookkeeping both clients do identically around their I/O.

Rules
-----
Rule 1: request ids run 1 .. 2**64-1 and wrap to 1. Id 0 is never used: it is the id a
        server gives an error about a request whose id it could not read.
Rule 2: a reply frame that cannot be decoded raises ProtocolError; an error status raises
        its ServerError (or, in a pipeline, takes the result's place).
Rule 3: a pipeline's results are in call order; a slot with no reply by the deadline holds a
        Timeout; with ``raise_on_error`` the first error in call order is raised, after every
        reply has been collected.

No I/O here.
"""

from __future__ import annotations

import math
from typing import Any, Self

import msgspec

from shardd import protocol
from shardd.commands import Codec, Commands, Convert
from shardd.errors import ProtocolError, ServerError, SharddError, Timeout, error_for_status

DEFAULT_ENDPOINT = "tcp://127.0.0.1:7400"
DEFAULT_TIMEOUT = 1.0  # seconds; a local round trip is ~0.2 ms, so this only trips on trouble

U64 = (1 << 64) - 1
Call = tuple[protocol.Op, Convert]

UNANSWERED: Any = object()
"""Placeholder in a pipeline's result list for a request with no reply yet."""


def next_id(last: int) -> int:
    """The request id after ``last`` (Rule 1)."""
    return last % U64 + 1


def check_timeout(timeout: object) -> float:
    """A client timeout in seconds: a finite number > 0."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    if not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout}")
    return float(timeout)


def check_endpoint(endpoint: object) -> str:
    if not isinstance(endpoint, str):
        raise TypeError(f"endpoint must be a str such as {DEFAULT_ENDPOINT!r}")
    return endpoint


def decode(frame: bytes) -> protocol.Reply:
    """Decode one reply frame; a frame that is not a Reply raises ProtocolError (Rule 2)."""
    try:
        return protocol.decode_reply(frame)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable reply frame ({len(frame)} bytes): {exc}") from None


def server_error(reply: protocol.Reply) -> ServerError:
    value = reply.value
    return error_for_status(reply.status, value if isinstance(value, str) else repr(value))


def result(reply: protocol.Reply, convert: Convert) -> Any:
    """The converted value of ``reply``; an error status raises its ServerError."""
    if reply.status != protocol.OK:
        raise server_error(reply)
    return convert(reply.value)


def outcome(reply: protocol.Reply, convert: Convert) -> Any:
    """Like :func:`result`, but an error is returned instead of raised (for pipelines)."""
    if reply.status != protocol.OK:
        return server_error(reply)
    try:
        return convert(reply.value)
    except ProtocolError as exc:
        return exc


def timeout_error(where: str | int, timeout: float, op: protocol.Op) -> Timeout:
    """The Timeout for ``op`` sent to ``where``: an endpoint, or a shard number (direct mode)."""
    place = f"shard {where}" if type(where) is int else where
    return Timeout(f"no reply from {place} within {timeout:g} s to {op.__struct_config__.tag}")


def finish(results: list[Any], raise_on_error: bool, endpoint: str, timeout: float) -> list[Any]:
    """Pipeline results in call order, a Timeout in each unanswered slot (Rule 3)."""
    missing = results.count(UNANSWERED)
    if missing:
        text = (
            f"{missing} of {len(results)} pipelined requests got no reply"
            f" from {endpoint} within {timeout:g} s"
        )
        results = [Timeout(text) if r is UNANSWERED else r for r in results]
    if raise_on_error:
        for item in results:
            if isinstance(item, SharddError):
                raise item
    return results


class PipelineBase(Commands):
    """Queues commands for one round of sends; subclasses add ``execute``.

    Each command checks its arguments at once, queues the request and returns the pipeline,
    so calls chain. Nothing is sent until ``execute``. A pipeline always goes through the
    router, in direct mode too.
    """

    __slots__ = ("_calls", "_client", "_codec")

    def __init__(self, client: Any) -> None:
        self._client = client
        self._codec: Codec = client._codec
        self._calls: list[Call] = []

    def _call(self, op: protocol.Op, convert: Convert) -> Self:  # type: ignore[override]
        self._calls.append((op, convert))
        return self

    def __len__(self) -> int:
        return len(self._calls)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.reset()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.reset()

    def reset(self) -> None:
        """Drop every queued command without sending it."""
        self._calls = []

    def _take(self) -> list[Call]:
        calls, self._calls = self._calls, []
        return calls
