"""The ``shardd`` command: run the daemon and operate it.

Client commands take ``--endpoint`` (or ``$SHARDD_ENDPOINT``). Exit codes: 0 success,
1 the command failed (daemon unreachable, error reply, missing key for ``get``), 2 bad
configuration or usage.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from shardd.errors import ConfigError, ExitCode, SharddError

T = TypeVar("T")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="shardd: a shard-per-core cache daemon.")

DEFAULT_ENDPOINT = "tcp://127.0.0.1:7400"
Endpoint = Annotated[str, typer.Option("--endpoint", "-e", envvar="SHARDD_ENDPOINT",
                                       help="Daemon endpoint.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds to wait for a reply.")]


def _fail(message: str, code: int = ExitCode.FAILURE) -> typer.Exit:
    typer.echo(f"shardd: {message}", err=True)
    return typer.Exit(code)


def _ask(endpoint: str, timeout: float, request: Callable[[Any], T]) -> T:
    """Run ``request(client)`` against the daemon; any failure is one line on stderr and exit 1."""
    try:
        with _client(endpoint, timeout) as client:
            return request(client)
    except (SharddError, ValueError) as exc:
        raise _fail(str(exc)) from None


def _client(endpoint: str, timeout: float):
    """A client for the CLI's commands; with $SHARDD_KEYS (an auth_dir) it presents the key named
    $SHARDD_KEY_NAME (default "admin") to a daemon that has authentication on."""
    import os

    from shardd import _ops
    from shardd.client import Client

    keys = os.environ.get("SHARDD_KEYS")
    curve = _ops.load_curve(keys, os.environ.get("SHARDD_KEY_NAME", "admin")) if keys else None
    return Client(endpoint, timeout=timeout, curve=curve)


@app.command()
def serve(
    config: Annotated[str | None, typer.Option("--config", "-c", envvar="SHARDD_CONFIG",
                                               help="TOML config file (defaults apply without one).")] = None,
    bind: Annotated[str | None, typer.Option(help="Public endpoint, e.g. tcp://127.0.0.1:7400.")] = None,
    shards: Annotated[int | None, typer.Option(help="Number of shards (0 = one per CPU).")] = None,
    runtime_dir: Annotated[str | None, typer.Option("--runtime-dir", help="Directory for ipc sockets.")] = None,
    state_dir: Annotated[str | None, typer.Option("--state-dir", help="Directory for warm-restart snapshots.")] = None,
    auth_dir: Annotated[str | None, typer.Option("--auth-dir", help="CURVE keys (shardd keys generate).")] = None,
    mailbox_limit: Annotated[int | None, typer.Option("--mailbox-limit", help="In-flight ops per shard.")] = None,
    log_level: Annotated[str | None, typer.Option("--log-level", help="debug, info, warning or error.")] = None,
    pin_cpus: Annotated[bool | None, typer.Option("--pin-cpus/--no-pin-cpus", help="Pin workers to CPUs.")] = None,
    enable_debug_ops: Annotated[bool | None, typer.Option("--enable-debug-ops", hidden=True)] = None,
    allow_remote_without_auth: Annotated[bool | None, typer.Option(
        "--allow-remote-without-auth", help="Serve a non-loopback TCP address with no authentication.")] = None,
) -> None:
    """Run the daemon in the foreground (supervisor, router, one worker per shard)."""
    from shardd.config import load_config

    overrides: dict[str, Any] = {
        "bind": bind, "shards": shards, "runtime_dir": runtime_dir, "state_dir": state_dir, "auth_dir": auth_dir,
        "mailbox_limit": mailbox_limit,
        "log_level": log_level, "pin_cpus": pin_cpus, "enable_debug_ops": enable_debug_ops,
        "allow_remote_without_auth": allow_remote_without_auth,
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
    n = _ask(endpoint, timeout, lambda client: client.ping())
    typer.echo(f"PONG ({n} shards)")


@app.command()
def health(
    deadline: Annotated[float, typer.Option(help="Seconds each shard has to answer.")] = 1.0,
    endpoint: Endpoint = DEFAULT_ENDPOINT,
) -> None:
    """Exit 0 if every shard answers within the deadline; otherwise name the shards that did not."""
    report = _ask(endpoint, deadline + 1.0, lambda client: client.health(deadline))
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
    now = _ask(endpoint, timeout, lambda client: client.maintenance(wanted[mode]))
    typer.echo(f"maintenance {'on' if now else 'off'}")


keys_app = typer.Typer(help="CURVE keys for authentication (auth_dir).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("generate")
def keys_generate(
    auth_dir: Annotated[str, typer.Argument(help="Directory to create or add to (use it as auth_dir).")],
    name: Annotated[str, typer.Option(help="Name of the client key pair to create.")] = "admin",
    admin: Annotated[bool, typer.Option("--admin/--client", help="May the key send admin ops?")] = True,
) -> None:
    """Create the daemon's key pair (once) and a client key pair that may connect."""
    import os

    from shardd import transport

    if os.path.exists(os.path.join(auth_dir, f"{name}.key_secret")):
        raise _fail(f"{auth_dir}/{name}.key_secret exists already; choose another --name", ExitCode.CONFIG)
    _, secret = transport.generate_keys(auth_dir, name, admin)
    typer.echo(f"server keys: {auth_dir}/server.key (public), {auth_dir}/server.key_secret (keep private)")
    typer.echo(f"{'admin' if admin else 'client'} key {name!r}: {secret} — give it, with server.key, to that client")
    typer.echo(f"serve with: shardd serve --auth-dir {auth_dir}; clients: SHARDD_KEYS={auth_dir} "
               f"SHARDD_KEY_NAME={name}")


shards_app = typer.Typer(help="Show the shard topology, or resize it while serving.", no_args_is_help=False)
app.add_typer(shards_app, name="shards")


@shards_app.callback(invoke_without_command=True)
def shards_show(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    endpoint: Endpoint = DEFAULT_ENDPOINT,
    timeout: TimeoutOpt = 2.0,
) -> None:
    """Show the topology: epoch, shard count, hash, worker endpoints, resize in progress."""
    if ctx.invoked_subcommand is not None:
        return
    topology = _ask(endpoint, timeout, lambda client: client.topology())
    if as_json:
        typer.echo(json.dumps(topology, indent=2, sort_keys=True))
        return
    typer.echo(f"epoch {topology['epoch']}: {topology['shards']} shards, placement {topology['hash']}")
    for shard, worker in enumerate(topology["endpoints"]):
        typer.echo(f"  shard {shard}: {worker}")
    if topology["resizing"]:
        typer.echo(f"  resizing to {topology['resizing']['to']} shards (epoch {topology['resizing']['epoch']})")


@shards_app.command("resize")
def shards_resize(
    shards: Annotated[int, typer.Argument(help="The new number of shards.")],
    endpoint: Endpoint = DEFAULT_ENDPOINT,
    timeout: TimeoutOpt = 600.0,
) -> None:
    """Grow or shrink the number of shards while serving; only keys whose shard changes move."""
    result = _ask(endpoint, timeout, lambda client: client.resize(shards))
    share = result["moved"] / result["total"] if result["total"] else 0.0
    typer.echo(f"resized {result['from']} → {result['to']} shards in {result['seconds']:.2f} s: "
               f"moved {result['moved']}/{result['total']} keys ({share:.1%}), epoch {result['epoch']}")


_TUNE_KEYS = {"mailbox-limit": "mailbox_limit", "max-memory": "max_memory", "eviction-policy": "eviction_policy"}


@app.command()
def tune(
    setting: Annotated[str, typer.Argument(help="mailbox-limit, max-memory or eviction-policy.")],
    value: Annotated[str, typer.Argument(help="New value, e.g. 2048, 512MiB, allkeys-lfu.")],
    endpoint: Endpoint = DEFAULT_ENDPOINT,
    timeout: TimeoutOpt = 2.0,
) -> None:
    """Change a setting on every shard of the running daemon, at once (until restart or reload)."""
    key = _TUNE_KEYS.get(setting)
    if key is None:
        raise _fail(f"unknown setting {setting!r}; choose one of {', '.join(_TUNE_KEYS)}", ExitCode.CONFIG)
    parsed: Any = int(value) if key == "mailbox_limit" and value.lstrip("-").isdigit() else value
    shards = _ask(endpoint, timeout, lambda client: client.tune(**{key: parsed}))
    typer.echo(f"{key} = {value} on {shards} shards")


@app.command()
def get(key: str, endpoint: Endpoint = DEFAULT_ENDPOINT, timeout: TimeoutOpt = 1.0) -> None:
    """Print the value of KEY (exit 1 if it does not exist)."""
    value = _ask(endpoint, timeout, lambda client: client.get(key))
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
    stored = _ask(endpoint, timeout, lambda client: client.set(key, value.encode(), ttl=ttl, nx=nx, xx=xx))
    if not stored:
        raise _fail(f"{key}: not stored ({'exists' if nx else 'does not exist'})")
    typer.echo("OK")


@app.command("del")
def delete(keys: list[str], endpoint: Endpoint = DEFAULT_ENDPOINT, timeout: TimeoutOpt = 1.0) -> None:
    """Delete KEYS; print how many existed."""
    n = _ask(endpoint, timeout, lambda client: client.delete_many(keys))
    typer.echo(str(n))


# (stats field, column title); the table must fit 80 columns.
_STAT_COLUMNS = [("shard", "shard"), ("status", "st"), ("cpu", "cpu"), ("keys", "keys"),
                 ("used_bytes", "memory"), ("rss_bytes", "rss"), ("ops_per_s", "ops/s"), ("hit_pct", "hit%"),
                 ("evicted", "evict"), ("service_p50_us", "p50µs"), ("service_p99_us", "p99µs"),
                 ("mailbox", "mbox")]


def _human_bytes(n: Any) -> str:
    if not isinstance(n, int):
        return "-"
    size = float(n)
    for unit in ("B", "K", "M", "G"):
        if size < 1024 or unit == "G":
            return f"{size:.0f}{unit}" if unit == "B" or size >= 100 else f"{size:.1f}{unit}"
        size /= 1024
    return str(n)


def _human_count(n: Any) -> str:
    if not isinstance(n, int | float):
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale * 10:
            return f"{n / scale:.0f}{unit}"
    return f"{n:.0f}"


def _cell(field: str, value: Any) -> str:
    if value is None:
        return "-"
    if field.endswith("bytes"):
        return _human_bytes(value)
    if field.endswith("_us"):
        return f"{value:.0f}" if value >= 10 else f"{value:.1f}"
    if field == "hit_pct":
        return f"{value:.0f}"
    return _human_count(value) if isinstance(value, int | float) and not isinstance(value, bool) else str(value)


def _hit_pct(row: dict[str, Any]) -> float | None:
    lookups = (row.get("hits") or 0) + (row.get("misses") or 0)
    return 100.0 * (row.get("hits") or 0) / lookups if lookups else None


def _stats_view(data: dict[str, Any], rates: dict[int, float] | None = None) -> Any:
    """The stats table (one row per shard, a total row) and a summary; fits 80 columns.

    ``rates`` (shard → ops/s measured by the caller, e.g. ``top``) replaces the workers'
    own 10-20 s ops/s when given.
    """
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    router = data["router"]
    table = Table(title=f"shardd: {router['shards']} shards, router pid {router['pid']}, "
                        f"up {router['uptime_s']:.0f} s", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    for _, title in _STAT_COLUMNS:
        table.add_column(title, justify="left" if title == "st" else "right", no_wrap=True)
    for row in data["shards"]:
        row = {**row, "hit_pct": _hit_pct(row)}
        if rates is not None and row.get("status") == "up":
            row["ops_per_s"] = rates.get(row["shard"])
        table.add_row(*(_cell(field, row.get(field)) for field, _ in _STAT_COLUMNS))
    total = data.get("total")
    if total is not None:
        total = {**total, "hit_pct": _hit_pct(total), "shard": "total", "status": "", "cpu": ""}
        if rates is not None:
            total["ops_per_s"] = sum(rates.values())
        table.add_section()
        table.add_row(*(_cell(field, total.get(field)) if field not in ("shard", "status", "cpu")
                        else str(total[field]) for field, _ in _STAT_COLUMNS))
    lines = []
    if total is not None:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(total["evictions"].items())) or "none"
        pct = 100 * total["used_bytes"] / total["max_bytes"] if total.get("max_bytes") else 0
        lines.append(f"memory {_human_bytes(total['used_bytes'])} of {_human_bytes(total['max_bytes'])} "
                     f"({pct:.0f}%); evicted: {reasons}; refused (OOM): {total['oom_rejected']}")
    imbalance = data.get("imbalance")
    if imbalance is not None:
        hot = [f"{dim} {imbalance[dim]:.2f} (shard {imbalance[f'hot_shard_{dim}']})" for dim in ("keys", "ops")]
        warn = any(imbalance[d] > imbalance["threshold"] for d in ("keys", "ops"))
        lines.append(f"imbalance max/mean: {', '.join(hot)}; threshold {imbalance['threshold']:g}"
                     + (" (over)" if warn else ""))
    return Group(table, *(Text(line) for line in lines))


def _console() -> Any:
    from rich.console import Console

    return Console(width=80 if not sys.stdout.isatty() else None)


@app.command()
def stats(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    endpoint: Endpoint = DEFAULT_ENDPOINT,
    timeout: TimeoutOpt = 2.0,
) -> None:
    """Show one row per shard and a total: keys, memory, ops/s, hit rate, evictions, service time, mailbox."""
    data = _ask(endpoint, timeout, lambda client: client.stats())
    if as_json:
        typer.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    _console().print(_stats_view(data))


def _safe_key(key: bytes, width: int = 40) -> str:
    text = key.decode("utf-8", "backslashreplace")
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
    return text if len(text) <= width else text[: width - 1] + "…"


@app.command()
def hotkeys(
    top: Annotated[int, typer.Option("--top", "-n", help="How many keys to list.", min=1, max=10_000)] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    endpoint: Endpoint = DEFAULT_ENDPOINT,
    timeout: TimeoutOpt = 2.0,
) -> None:
    """List the most accessed keys over all shards, with their shard and estimated rate."""
    data = _ask(endpoint, timeout, lambda client: client.hotkeys(top))
    if as_json:
        rows = [{"key": key.decode("utf-8", "backslashreplace"), "shard": shard, "rate_per_s": rate,
                 "count": count, "error": error} for key, shard, rate, count, error in data["keys"]]
        typer.echo(json.dumps({"window_s": data["window_s"], "down": data["down"], "keys": rows}, indent=2))
        return
    from rich import box
    from rich.table import Table

    table = Table(title=f"hot keys, last {data['window_s']:.0f} s", box=box.SIMPLE_HEAD, pad_edge=False)
    for title in ("#", "key", "shard", "ops/s", "count", "±error"):
        table.add_column(title, justify="left" if title == "key" else "right", no_wrap=True)
    for rank, (key, shard, rate, count, error) in enumerate(data["keys"], 1):
        table.add_row(str(rank), _safe_key(key), str(shard), f"{rate:.1f}", str(count), str(error))
    console = _console()
    console.print(table)
    console.print("estimates: count - error <= true accesses <= count")
    if data["down"]:
        console.print(f"shards down (not listed): {', '.join(map(str, data['down']))}")


@app.command()
def top(
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.", min=0.1)] = 1.0,
    iterations: Annotated[int, typer.Option(help="Stop after this many refreshes (0: until q or Ctrl-C).",
                                            min=0)] = 0,
    endpoint: Endpoint = DEFAULT_ENDPOINT,
    timeout: TimeoutOpt = 2.0,
) -> None:
    """A live per-shard view, refreshed every second; q or Ctrl-C quits."""
    import contextlib
    import select
    import time

    from rich.live import Live
    from rich.text import Text

    console = _console()
    interactive = sys.stdin.isatty()
    keys = _cbreak() if interactive else contextlib.nullcontext()
    previous: tuple[float, dict[int, int]] | None = None
    count = 0
    try:
        with _client(endpoint, timeout) as client, keys, Live(console=console, auto_refresh=False) as live:
            while True:
                try:
                    data = client.stats()
                except SharddError as exc:
                    live.update(Text(f"shardd: {exc} (retrying)"), refresh=True)
                    data = None
                if data is not None:
                    now = time.monotonic()
                    ops = {row["shard"]: row["ops"] for row in data["shards"] if row.get("status") == "up"}
                    rates = None
                    if previous is not None:
                        dt = max(now - previous[0], 1e-3)
                        rates = {s: max(0, n - previous[1].get(s, 0)) / dt for s, n in ops.items()}
                    previous = (now, ops)
                    live.update(_stats_view(data, rates), refresh=True)
                count += 1
                if iterations and count >= iterations:
                    return
                deadline = time.monotonic() + interval
                while (left := deadline - time.monotonic()) > 0:
                    if not interactive:
                        time.sleep(left)
                        break
                    ready, _, _ = select.select([sys.stdin], [], [], left)
                    if ready and sys.stdin.read(1) in ("q", "Q"):
                        return
    except KeyboardInterrupt:
        return


def _cbreak() -> Any:
    """Context manager: the terminal hands us keys one at a time (no Enter), restored on exit."""
    import contextlib
    import termios
    import tty

    @contextlib.contextmanager
    def manager() -> Any:
        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
        try:
            tty.setcbreak(fd)
            yield
        finally:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)

    return manager()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
