"""What every ``shardd`` command shares: the Typer ``app``, the ``--endpoint``/``--timeout``
options, and the one way a command reaches the daemon (``ask``, ``connect``) and fails
(``fail``, ``usage``).

Invariants:
1. A command's error is one ``shardd: ...`` message on stderr that fits WIDTH columns (``fail``),
   and an exit code: 1 the command failed, 2 a usage error found before anything was sent.
2. The CLI imports no zmq: a malformed endpoint comes back from the client library as its own
   error and is reported as a usage error here.
"""

from __future__ import annotations

import math
import os
import re
import textwrap
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from shardd.errors import ExitCode, SharddError

T = TypeVar("T")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="shardd: a shard-per-core cache daemon.")


DEFAULT_ENDPOINT = "tcp://127.0.0.1:7400"
WIDTH = 80  # every message fits this many columns


def positive_seconds(value: float | None) -> float | None:
    """Option callback: a finite number of seconds > 0 (None: the option was not given)."""
    if value is not None and not 0 < value < math.inf:
        raise typer.BadParameter(f"must be a finite number of seconds > 0, got {value:g}")
    return value


Endpoint = Annotated[str, typer.Option("--endpoint", "-e", envvar="SHARDD_ENDPOINT",
                                       help="Daemon endpoint: tcp://HOST:PORT or ipc://PATH.")]


TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds to wait for a reply.", callback=positive_seconds)]


def fit_width(text: str) -> str:
    """``text`` wrapped to fit WIDTH columns (continuation lines indented)."""
    lines = []
    for line in text.splitlines() or [""]:
        lines.extend(textwrap.wrap(line, WIDTH, subsequent_indent="  ", break_on_hyphens=False) or [""])
    return "\n".join(lines)


def fail(message: str, code: int = ExitCode.FAILURE) -> typer.Exit:
    """Print ``shardd: message`` on stderr (wrapped to 80 columns); the Exit to raise."""
    typer.echo(fit_width(f"shardd: {message}"), err=True)
    return typer.Exit(code)


def usage(message: str) -> typer.Exit:
    """A usage error found by the command itself: exit 2, like the ones the parser finds."""
    return fail(message, ExitCode.CONFIG)


def ask(endpoint: str, timeout: float, request: Callable[[Any], T], keys: bool = False) -> T:
    """Run ``request(client)`` against the daemon.

    ``keys``: the request is about keys (the data commands): if the endpoint is a cluster node
    that does not serve the key, a ClusterClient runs it again, following the map.
    A failure is one short message on stderr: exit 1 for the daemon's answer (or its silence),
    exit 2 for an argument the client refused before sending anything.
    """
    from shardd.errors import Moved, TryAgain, Unavailable

    try:
        with connect(endpoint, timeout) as client:
            if not keys:
                return request(client)
            try:
                return request(client)  # (arguments are checked here, before anything is sent)
            except (Moved, TryAgain, Unavailable) as exc:
                # A cluster node that does not serve this key (or none now): nothing was applied.
                if not (exc.message.startswith("cluster:") or "'slot'" in exc.message):
                    raise
            from shardd.cluster_client import ClusterClient

            with ClusterClient(endpoint, timeout=timeout, curve=client._curve) as cluster:
                return request(cluster)
    except SharddError as exc:
        raise fail(str(exc)) from None
    except (ValueError, OverflowError) as exc:
        raise usage(str(exc)) from None


_ENDPOINT = re.compile(r"^(tcp://[^\s:/]+:\d+|tcp://\[[0-9A-Fa-f:.]+\]:\d+|ipc://\S+)$")


def connect(endpoint: str, timeout: float) -> Any:
    """A client for the CLI's commands; with $SHARDD_KEYS (an auth_dir) it presents the key named
    $SHARDD_KEY_NAME (default "admin") to a daemon that has authentication on.

    A malformed endpoint or unusable key directory is a usage error (exit 2).
    """
    from shardd.client import Client
    from shardd.errors import BadEndpoint
    from shardd.transport_client import load_curve

    if not _ENDPOINT.match(endpoint):
        raise usage(f"bad endpoint {short(endpoint, 30)!r}: use tcp://HOST:PORT or ipc://PATH")
    keys = os.environ.get("SHARDD_KEYS")
    name = os.environ.get("SHARDD_KEY_NAME", "admin")
    try:
        curve = load_curve(keys, name) if keys else None
    except (OSError, ValueError) as exc:
        raise usage(f"cannot use key {name!r} of SHARDD_KEYS={keys}: {getattr(exc, 'strerror', None) or exc}"
                     ) from None
    try:
        return Client(endpoint, timeout=timeout, curve=curve)
    except BadEndpoint as exc:
        raise usage(f"bad endpoint {endpoint!r}: {exc.reason}") from None


def short(text: str, width: int = 24) -> str:
    """``text`` cut to ``width`` characters, so an absurd argument cannot make a message long."""
    return text if len(text) <= width else text[: width - 1] + "…"
