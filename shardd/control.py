"""The supervisor's client for the router's control endpoint: the public commands plus control ops.

Control ops (``resize_start``, ``drain``, ``snapshot``, ``configure``) are accepted only on
the control endpoint, an ipc socket in the daemon's private runtime directory, and only the
supervisor sends them; the public :class:`shardd.Client` does not offer them. Sent anywhere
else they are answered BAD_REQUEST.

Invariant: a ControlClient is a blocking Client in every other respect (same rules, same
commands); it only adds the four methods below, each written as the public commands are.
"""

from __future__ import annotations

from typing import Any

from shardd import protocol
from shardd.client import Client
from shardd.commands import to_bool, to_int, to_list

__all__ = ["ControlClient"]


class ControlClient(Client):
    """A Client for the control endpoint (the supervisor's); one per thread, like any Client."""

    def resize_start(self, shards: int) -> bool:
        """The workers for ``shards`` are running: the router may start migrating keys."""
        return self._call(protocol.ResizeStart(shards), to_bool)

    def drain(self) -> bool:
        """Refuse new client requests; returns once nothing is in flight."""
        return self._call(protocol.Drain(), to_bool)

    def snapshot(self, directory: str) -> list[dict[str, Any]]:
        """Every shard writes its keys into ``directory``; the per-shard results."""
        if not isinstance(directory, str) or not directory:
            raise TypeError("directory must be a non-empty str")
        return self._call(protocol.Snapshot(directory), to_list)

    def configure(self, settings: dict[str, Any]) -> int:
        """Apply live settings; the number of shards that applied them."""
        if not isinstance(settings, dict) or not all(isinstance(k, str) for k in settings):
            raise TypeError("settings must be a dict of config keys to values")
        return self._call(protocol.Configure(dict(settings)), to_int)
