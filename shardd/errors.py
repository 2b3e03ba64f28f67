"""One exception tree for everything shardd raises.

Two kinds of failure are kept apart, as h11 does: the caller misused the API or the
configuration (``ConfigError``, ``TypeError``/``ValueError`` from argument checks), and the
other side answered with an error or broke the protocol (``ServerError`` and subclasses,
``ProtocolError``). Each server error carries the wire status code it was raised for, so a
client in another language and this library agree on meaning (see docs/protocol.md).

This module is a leaf: it imports nothing from shardd.
"""

from __future__ import annotations


class SharddError(Exception):
    """Raised for every shardd failure; catch this to catch them all."""


class ConfigError(SharddError):
    """Raised when a configuration file or flag is invalid; the message names the key."""


class Timeout(SharddError, TimeoutError):
    """Raised when no reply arrived within the client's timeout (the daemon may be down or overloaded)."""


class NotSent(Timeout):
    """Raised when a request could not even be queued (no connection) before its deadline: nothing was applied.

    A Timeout, so code that catches Timeout still does; a direct-mode client uses it to go
    through the router at once instead (a worker it knew has restarted on another port).
    """


class ConnectionClosed(SharddError):
    """Raised when a client is used after ``close()``."""


class BadEndpoint(SharddError, ValueError):
    """Raised when a client is given an endpoint the transport cannot use (malformed, unknown scheme).

    ``reason`` is the transport's own explanation, without the endpoint.
    """

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class ProtocolError(SharddError):
    """Raised when the peer sent bytes that are not a valid shardd message."""


class ServerError(SharddError):
    """Raised when the daemon answered a request with an error status.

    ``status`` is the wire status code, ``message`` the daemon's explanation.
    """

    status = -1

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class BadRequest(ServerError):
    """Raised when the daemon rejected a request as malformed (wrong types, unknown op, bad argument)."""

    status = 1


class UnsupportedVersion(BadRequest):
    """Raised when the daemon does not speak the protocol version the request used."""

    status = 2


class TooLarge(BadRequest):
    """Raised when a key, value or message is over the daemon's configured size limit."""

    status = 3


class Busy(ServerError):
    """Raised when the key's shard has its mailbox full; back off and retry."""

    status = 4


class Unavailable(ServerError):
    """Raised when the key's shard is down (it is being restarted); retry shortly."""

    status = 5


class NotInteger(ServerError):
    """Raised when INCR/DECR meets a value that is not a 64-bit decimal integer, or would overflow."""

    status = 6


class InternalError(ServerError):
    """Raised when the daemon hit a bug while applying the request; the daemon logged it."""

    status = 7


class OutOfMemory(ServerError):
    """Raised when a write would pass the shard's share of max_memory and nothing can be evicted.

    That is: the eviction policy is noeviction, or volatile-ttl with no key that has a TTL,
    or the entry alone is larger than the shard's share. Nothing was written.
    """

    status = 8


class Maintenance(ServerError):
    """Raised when a write reaches a daemon in maintenance mode; reads still work. Retry after it ends."""

    status = 9


class Moved(ServerError):
    """Raised when a shard no longer owns the key (the shard count changed); refresh the topology and retry.

    The router retries for its clients; only direct-mode clients see it, and they retry themselves.
    """

    status = 10


class Forbidden(ServerError):
    """Raised when an admin op (flush, resize, tune, maintenance, …) comes from a key that is not an admin key."""

    status = 11


class TryAgain(ServerError):
    """Raised when a shard will own the key once a resize ends but its entry may still be on the way.

    Only a shard's own endpoint (direct mode) answers it, during a resize; nothing was applied.
    Send the request through the router, which orders it after the entry, or retry shortly.
    The clients in this package do the former themselves.
    """

    status = 12


SERVER_ERRORS: dict[int, type[ServerError]] = {
    cls.status: cls
    for cls in (BadRequest, UnsupportedVersion, TooLarge, Busy, Unavailable, NotInteger, InternalError,
                OutOfMemory, Maintenance, Moved, Forbidden, TryAgain)
}


def error_for_status(status: int, message: str) -> ServerError:
    """Build the exception for a wire error status; unknown codes still raise a ServerError."""
    cls = SERVER_ERRORS.get(status)
    if cls is None:
        return ServerError(f"status {status}: {message}", status)
    return cls(message)


class ExitCode:
    """Exit statuses of ``shardd`` commands and daemon processes."""

    OK = 0
    FAILURE = 1          # a client command failed (daemon down, error reply, …)
    CONFIG = 2           # bad configuration file or flag
    BOOT_FAILED = 3      # a child did not start (port in use, runtime dir unusable, …)
    CHILD_FAILED = 4     # the router died, or a worker crash-looped, while serving
