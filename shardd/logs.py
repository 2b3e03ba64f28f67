"""Logging set-up shared by every process role: one line per event, tagged with role and shard.

Each child process re-runs ``setup_logging`` after it starts (spawned children inherit no
logging configuration), so every line says which process wrote it.
"""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s %(levelname)s shardd[%(process)d] %(role)s: %(message)s"


class _RoleFilter(logging.Filter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        return True


def setup_logging(level: str, role: str) -> logging.Logger:
    """Configure the root logger to write to stderr and return the ``shardd`` logger.

    ``role`` is e.g. ``supervisor``, ``router`` or ``worker 3``.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.addFilter(_RoleFilter(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return logging.getLogger("shardd")
