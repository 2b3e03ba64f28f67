"""Commands on keys: ``get``, ``set``, ``del``, ``incr``, ``decr``, ``ttl``, ``expire``,
``persist`` and ``flush``; each is one client call and a line of output."""

from __future__ import annotations

import math
import sys
from typing import Annotated, Any

import typer

from shardd.cli.common import (
    DEFAULT_ENDPOINT,
    Endpoint,
    TimeoutOpt,
    app,
    ask,
    fail,
    positive_seconds,
    short,
    usage,
)


@app.command()
def get(
    key: str,
    raw: Annotated[bool, typer.Option("--raw", help="Write the value's bytes exactly, without a newline.")] = False,
    endpoint: Endpoint = DEFAULT_ENDPOINT,
    timeout: TimeoutOpt = 1.0,
) -> None:
    """Print the value of KEY (exit 1 if it does not exist)."""
    value = ask(endpoint, timeout, lambda client: client.get(key), keys=True)
    if value is None:
        raise fail(f"{short(key, 40)}: not found")
    sys.stdout.buffer.write(value if raw else value + b"\n")
    sys.stdout.buffer.flush()


def _read_value(path: str) -> bytes:
    """The bytes of file ``path`` ("-": standard input); an unreadable file is a usage error."""
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise usage(f"--file {path}: {exc.strerror or exc}") from None


TtlOpt = Annotated[float | None, typer.Option(help="Time to live in seconds (fractions allowed).",
                                              callback=positive_seconds)]


@app.command("set")
def set_(
    key: str,
    value: Annotated[str | None, typer.Argument(help="The value (UTF-8); or use --file.")] = None,
    file: Annotated[str | None, typer.Option(
        "--file", "-f", help="Read the value's bytes from this file ('-': standard input).")] = None,
    ttl: TtlOpt = None,
    nx: Annotated[bool, typer.Option("--nx", help="Only set if the key does not exist.")] = False,
    xx: Annotated[bool, typer.Option("--xx", help="Only set if the key exists.")] = False,
    endpoint: Endpoint = DEFAULT_ENDPOINT,
    timeout: TimeoutOpt = 1.0,
) -> None:
    """Set KEY to VALUE (UTF-8), or to the bytes of --file PATH (binary or large values; - is stdin)."""
    if (value is None) == (file is None):
        raise usage("give either VALUE or --file PATH (--file - reads standard input)")
    if nx and xx:
        raise usage("--nx and --xx exclude each other")
    data = value.encode("utf-8", "surrogateescape") if value is not None else _read_value(file or "-")
    stored = ask(endpoint, timeout, lambda client: client.set(key, data, ttl=ttl, nx=nx, xx=xx), keys=True)
    if not stored:
        raise fail(f"{short(key, 40)}: not stored ({'exists' if nx else 'does not exist'})")
    typer.echo("OK")


@app.command("del")
def delete(keys: list[str], endpoint: Endpoint = DEFAULT_ENDPOINT, timeout: TimeoutOpt = 1.0) -> None:
    """Delete KEYS; print how many existed."""
    n = ask(endpoint, timeout, lambda client: client.delete_many(keys), keys=True)
    typer.echo(str(n))


AmountArg = Annotated[int, typer.Argument(help="How much to add (a signed 64-bit integer).")]


@app.command()
def incr(key: str, amount: AmountArg = 1, endpoint: Endpoint = DEFAULT_ENDPOINT,
         timeout: TimeoutOpt = 1.0) -> None:
    """Add AMOUNT (default 1) to the integer at KEY (missing counts as 0); print the new value."""
    typer.echo(str(ask(endpoint, timeout, lambda client: client.incr(key, amount), keys=True)))


@app.command()
def decr(key: str, amount: AmountArg = 1, endpoint: Endpoint = DEFAULT_ENDPOINT,
         timeout: TimeoutOpt = 1.0) -> None:
    """Subtract AMOUNT (default 1) from the integer at KEY (missing counts as 0); print the new value."""
    typer.echo(str(ask(endpoint, timeout, lambda client: client.decr(key, amount), keys=True)))


@app.command()
def ttl(key: str, endpoint: Endpoint = DEFAULT_ENDPOINT, timeout: TimeoutOpt = 1.0) -> None:
    """Print the seconds until KEY expires ("inf" if it never does; exit 1 if it does not exist)."""
    left = ask(endpoint, timeout, lambda client: client.ttl(key), keys=True)
    if left is None:
        raise fail(f"{short(key, 40)}: not found")
    typer.echo("inf" if left == math.inf else f"{left:.3f}")


@app.command()
def expire(
    key: str,
    seconds: Annotated[float, typer.Argument(help="Seconds from now (fractions allowed).", callback=positive_seconds)],
    endpoint: Endpoint = DEFAULT_ENDPOINT,
    timeout: TimeoutOpt = 1.0,
) -> None:
    """Make KEY expire SECONDS from now (exit 1 if it does not exist)."""
    if not ask(endpoint, timeout, lambda client: client.expire(key, seconds), keys=True):
        raise fail(f"{short(key, 40)}: not found")
    typer.echo("OK")


@app.command()
def persist(key: str, endpoint: Endpoint = DEFAULT_ENDPOINT, timeout: TimeoutOpt = 1.0) -> None:
    """Remove the TTL of KEY, so it never expires (exit 1 if it does not exist)."""
    if not ask(endpoint, timeout, lambda client: client.persist(key), keys=True):
        raise fail(f"{short(key, 40)}: not found")
    typer.echo("OK")


def _flush_everywhere(client: Any) -> int:
    """Flush the daemon, or every node when it is a cluster node (the shards that flushed)."""
    if "cluster" in client.topology():
        from shardd.cluster_client import ClusterClient

        with ClusterClient(client.endpoint, timeout=client.timeout, curve=client._curve) as cluster:
            return cluster.flush()
    return client.flush()


@app.command()
def flush(
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    endpoint: Endpoint = DEFAULT_ENDPOINT,
    timeout: TimeoutOpt = 2.0,
) -> None:
    """Remove every key on every shard (an admin op); asks first unless --yes."""
    if not yes:
        if not sys.stdin.isatty():
            raise usage("flush removes every key on every shard; pass --yes to confirm")
        if not typer.confirm(f"remove every key of the daemon at {endpoint}?"):
            raise fail("not flushed")
    n = ask(endpoint, timeout, _flush_everywhere)
    typer.echo(f"flushed: {n} keys removed")
