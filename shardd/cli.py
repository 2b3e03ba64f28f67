"""The ``shardd`` command: run the daemon and operate it.

Client commands take ``--endpoint`` (or ``$SHARDD_ENDPOINT``). Exit codes: 0 success,
1 the command failed (daemon unreachable, error reply, missing key for ``get``), 2 bad
configuration or usage.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from shardd.errors import ConfigError, ExitCode, SharddError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="shardd: a shard-per-core cache daemon.")

DEFAULT_ENDPOINT = "tcp://127.0.0.1:7400"
Endpoint = Annotated[str, typer.Option("--endpoint", "-e", envvar="SHARDD_ENDPOINT",
                                       help="Daemon endpoint.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds to wait for a reply.")]


def _fail(message: str, code: int = ExitCode.FAILURE) -> typer.Exit:
    typer.echo(f"shardd: {message}", err=True)
    return typer.Exit(code)


def _client(endpoint: str, timeout: float):
    from shardd.client import Client

    return Client(endpoint, timeout=timeout)


@app.command()
def serve(
    config: Annotated[str | None, typer.Option("--config", "-c", envvar="SHARDD_CONFIG",
                                               help="TOML config file (defaults apply without one).")] = None,
    bind: Annotated[str | None, typer.Option(help="Public endpoint, e.g. tcp://127.0.0.1:7400.")] = None,
    shards: Annotated[int | None, typer.Option(help="Number of shards (0 = one per CPU).")] = None,
    runtime_dir: Annotated[str | None, typer.Option("--runtime-dir", help="Directory for ipc sockets.")] = None,
    mailbox_limit: Annotated[int | None, typer.Option("--mailbox-limit", help="In-flight ops per shard.")] = None,
    log_level: Annotated[str | None, typer.Option("--log-level", help="debug, info, warning or error.")] = None,
    pin_cpus: Annotated[bool | None, typer.Option("--pin-cpus/--no-pin-cpus", help="Pin workers to CPUs.")] = None,
    enable_debug_ops: Annotated[bool | None, typer.Option("--enable-debug-ops", hidden=True)] = None,
) -> None:
    """Run the daemon in the foreground (supervisor, router, one worker per shard)."""
    from shardd.config import load_config

    overrides: dict[str, Any] = {
        "bind": bind, "shards": shards, "runtime_dir": runtime_dir, "mailbox_limit": mailbox_limit,
        "log_level": log_level, "pin_cpus": pin_cpus, "enable_debug_ops": enable_debug_ops,
    }
    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        raise _fail(str(exc), ExitCode.CONFIG) from None
    from shardd.supervisor import serve as run_daemon

    # SIGHUP re-reads the same sources: the file as it is now, then the same flags.
    raise typer.Exit(run_daemon(cfg, lambda: load_config(config, overrides)))


@app.command("check-config")
def check_config(path: Annotated[str, typer.Argument(help="TOML config file to validate.")]) -> None:
    """Validate a config file; print the effective settings."""
    from shardd.config import load_config

    try:
        cfg = load_config(path)
    except ConfigError as exc:
        raise _fail(str(exc), ExitCode.CONFIG) from None
    import msgspec

    typer.echo(f"{path}: OK")
    for key, value in msgspec.structs.asdict(cfg).items():
        typer.echo(f"  {key} = {value!r}")


@app.command()
def ping(endpoint: Endpoint = DEFAULT_ENDPOINT, timeout: TimeoutOpt = 1.0) -> None:
    """Check that every shard answers."""
    try:
        with _client(endpoint, timeout) as client:
            n = client.ping()
    except SharddError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"PONG ({n} shards)")


@app.command()
def health(
    deadline: Annotated[float, typer.Option(help="Seconds each shard has to answer.")] = 1.0,
    endpoint: Endpoint = DEFAULT_ENDPOINT,
) -> None:
    """Exit 0 if every shard answers within the deadline; otherwise name the shards that did not."""
    try:
        with _client(endpoint, deadline + 1.0) as client:
            report = client.health(deadline)
    except SharddError as exc:
        raise _fail(str(exc)) from None
    bad = [row for row in report["shards"] if row["status"] != "ok"]
    mode = " (maintenance mode: writes refused)" if report.get("maintenance") else ""
    if bad:
        names = ", ".join(f"shard {row['shard']} {row['status']}" for row in bad)
        raise _fail(f"unhealthy: {names}{mode}")
    typer.echo(f"OK: {len(report['shards'])} shards answered within {deadline:g} s{mode}")


@app.command()
def maintenance(
    mode: Annotated[str, typer.Argument(help="on, off or status.")] = "status",
    endpoint: Endpoint = DEFAULT_ENDPOINT,
    timeout: TimeoutOpt = 1.0,
) -> None:
    """Maintenance mode: writes are refused with MAINTENANCE while reads keep working."""
    wanted = {"on": True, "off": False, "status": None}
    if mode not in wanted:
        raise _fail(f"mode must be on, off or status, got {mode!r}", ExitCode.CONFIG)
    try:
        with _client(endpoint, timeout) as client:
            now = client.maintenance(wanted[mode])
    except SharddError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"maintenance {'on' if now else 'off'}")


@app.command()
def get(key: str, endpoint: Endpoint = DEFAULT_ENDPOINT, timeout: TimeoutOpt = 1.0) -> None:
    """Print the value of KEY (exit 1 if it does not exist)."""
    try:
        with _client(endpoint, timeout) as client:
            value = client.get(key)
    except SharddError as exc:
        raise _fail(str(exc)) from None
    if value is None:
        raise _fail(f"{key}: not found")
    sys.stdout.buffer.write(value + b"\n")


@app.command("set")
def set_(
    key: str,
    value: str,
    ttl: Annotated[float | None, typer.Option(help="Time to live in seconds.")] = None,
    nx: Annotated[bool, typer.Option("--nx", help="Only set if the key does not exist.")] = False,
    xx: Annotated[bool, typer.Option("--xx", help="Only set if the key exists.")] = False,
    endpoint: Endpoint = DEFAULT_ENDPOINT,
    timeout: TimeoutOpt = 1.0,
) -> None:
    """Set KEY to VALUE (UTF-8)."""
    try:
        with _client(endpoint, timeout) as client:
            stored = client.set(key, value.encode(), ttl=ttl, nx=nx, xx=xx)
    except (SharddError, ValueError) as exc:
        raise _fail(str(exc)) from None
    if not stored:
        raise _fail(f"{key}: not stored ({'exists' if nx else 'does not exist'})")
    typer.echo("OK")


@app.command("del")
def delete(keys: list[str], endpoint: Endpoint = DEFAULT_ENDPOINT, timeout: TimeoutOpt = 1.0) -> None:
    """Delete KEYS; print how many existed."""
    try:
        with _client(endpoint, timeout) as client:
            n = client.delete_many(keys)
    except SharddError as exc:
        raise _fail(str(exc)) from None
    typer.echo(str(n))


# (stats field, column title); the table must fit 80 columns.
_STAT_COLUMNS = [("shard", "shard"), ("status", "status"), ("cpu", "cpu"), ("keys", "keys"),
                 ("used_bytes", "memory"), ("rss_bytes", "rss"), ("ops", "ops"), ("hits", "hits"),
                 ("misses", "misses"), ("mailbox", "mailbox")]
_TOTALLED = ("keys", "used_bytes", "rss_bytes", "ops", "hits", "misses", "mailbox")


def _human_bytes(n: Any) -> str:
    if not isinstance(n, int):
        return "-"
    size = float(n)
    for unit in ("B", "K", "M", "G"):
        if size < 1024 or unit == "G":
            return f"{size:.0f}{unit}" if unit == "B" or size >= 100 else f"{size:.1f}{unit}"
        size /= 1024
    return str(n)


def _cell(field: str, value: Any) -> str:
    if value is None:
        return "-"
    return _human_bytes(value) if field.endswith("bytes") else str(value)


@app.command()
def stats(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    endpoint: Endpoint = DEFAULT_ENDPOINT,
    timeout: TimeoutOpt = 2.0,
) -> None:
    """Show one row per shard: keys, memory, ops, hits, misses, mailbox depth."""
    try:
        with _client(endpoint, timeout) as client:
            data = client.stats()
    except SharddError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    router = data["router"]
    table = Table(title=f"shardd: {router['shards']} shards, router pid {router['pid']}, "
                        f"up {router['uptime_s']:.0f} s", box=box.SIMPLE_HEAD, pad_edge=False)
    for _, title in _STAT_COLUMNS:
        table.add_column(title, justify="left" if title == "status" else "right")
    rows = data["shards"]
    for row in rows:
        table.add_row(*(_cell(field, row.get(field)) for field, _ in _STAT_COLUMNS))
    totals = {f: sum(r.get(f) or 0 for r in rows) for f in _TOTALLED}
    table.add_section()
    table.add_row(*("total" if f == "shard" else _cell(f, totals[f]) if f in totals else ""
                    for f, _ in _STAT_COLUMNS))
    Console(width=80 if not sys.stdout.isatty() else None).print(table)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
