"""sd_notify(3) without libsystemd: one datagram to ``$NOTIFY_SOCKET``; a no-op outside systemd."""

from __future__ import annotations

import os
import socket
import time


def notify(*states: str) -> bool:
    """Send ``READY=1``-style state lines to systemd. Returns False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(states).encode())
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings systemd expects (half of WatchdogSec), or None.

    sd_watchdog_enabled(3): ``$WATCHDOG_USEC`` is the timeout, and ``$WATCHDOG_PID``, when
    set, must be our pid (a child that inherited the variables must not ping).
    """
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        timeout = int(usec) / 1_000_000
    except ValueError:
        return None
    return timeout / 2 if timeout > 0 else None


def monotonic_usec() -> str:
    """``MONOTONIC_USEC=…``, which systemd wants beside ``RELOADING=1``."""
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
