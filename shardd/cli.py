"""The ``shardd`` command: run the daemon and operate it.

Client commands take ``--endpoint`` (or ``$SHARDD_ENDPOINT``). Exit codes: 0 success,
1 the command failed (daemon unreachable, error reply, missing key for ``get``), 2 bad
configuration or usage (caught before anything is sent). Every error is a short message on
stderr that fits 80 columns, never a traceback (``SHARDD_DEBUG=1`` shows one for a bug).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import textwrap
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from shardd.errors import ConfigError, ExitCode, SharddError

T = TypeVar("T")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="shardd: a shard-per-core cache daemon.")

DEFAULT_ENDPOINT = "tcp://127.0.0.1:7400"
WIDTH = 80  # every message fits this many columns


def _seconds(value: float | None) -> float | None:
    """Option callback: a finite number of seconds > 0 (None: the option was not given)."""
    if value is not None and not 0 < value < math.inf:
        raise typer.BadParameter(f"must be a finite number of seconds > 0, got {value:g}")
    return value


Endpoint = Annotated[str, typer.Option("--endpoint", "-e", envvar="SHARDD_ENDPOINT",
                                       help="Daemon endpoint: tcp://HOST:PORT or ipc://PATH.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds to wait for a reply.", callback=_seconds)]


def _message(text: str) -> str:
    """``text`` wrapped to fit WIDTH columns (continuation lines indented)."""
    lines = []
    for line in text.splitlines() or [""]:
        lines.extend(textwrap.wrap(line, WIDTH, subsequent_indent="  ", break_on_hyphens=False) or [""])
    return "\n".join(lines)


def _fail(message: str, code: int = ExitCode.FAILURE) -> typer.Exit:
    """Print ``shardd: message`` on stderr (wrapped to 80 columns); the Exit to raise."""
    typer.echo(_message(f"shardd: {message}"), err=True)
    return typer.Exit(code)


def _usage(message: str) -> typer.Exit:
    """A usage error found by the command itself: exit 2, like the ones the parser finds."""
    return _fail(message, ExitCode.CONFIG)


def _ask(endpoint: str, timeout: float, request: Callable[[Any], T]) -> T:
    """Run ``request(client)`` against the daemon.

    A failure is one short message on stderr: exit 1 for the daemon's answer (or its silence),
    exit 2 for an argument the client refused before sending anything.
    """
    try:
        with _client(endpoint, timeout) as client:
            return request(client)
    except SharddError as exc:
        raise _fail(str(exc)) from None
    except (ValueError, OverflowError) as exc:
        raise _usage(str(exc)) from None


_ENDPOINT = re.compile(r"^(tcp://[^\s:/]+:\d+|tcp://\[[0-9A-Fa-f:.]+\]:\d+|ipc://\S+)$")


def _client(endpoint: str, timeout: float) -> Any:
    """A client for the CLI's commands; with $SHARDD_KEYS (an auth_dir) it presents the key named
    $SHARDD_KEY_NAME (default "admin") to a daemon that has authentication on.

    A malformed endpoint or unusable key directory is a usage error (exit 2).
    """
    from shardd.client import Client
    from shardd.errors import BadEndpoint
    from shardd.transport_client import load_curve

    if not _ENDPOINT.match(endpoint):
        raise _usage(f"bad endpoint {_short(endpoint, 30)!r}: use tcp://HOST:PORT or ipc://PATH")
    keys = os.environ.get("SHARDD_KEYS")
    name = os.environ.get("SHARDD_KEY_NAME", "admin")
    try:
        curve = load_curve(keys, name) if keys else None
    except (OSError, ValueError) as exc:
        raise _usage(f"cannot use key {name!r} of SHARDD_KEYS={keys}: {getattr(exc, 'strerror', None) or exc}"
                     ) from None
    try:
        return Client(endpoint, timeout=timeout, curve=curve)
    except BadEndpoint as exc:
        raise _usage(f"bad endpoint {endpoint!r}: {exc.reason}") from None


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
    deadline: Annotated[float, typer.Option(help="Seconds each shard has to answer.", callback=_seconds)] = 1.0,
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
        raise _usage(f"mode must be on, off or status, got {mode!r}")
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
    from shardd import transport

    problem = key_name_problem(name)
    if problem:
        raise _usage(f"--name {_short(name, 16)!r}: {problem}")
    existing = auth_dir.rstrip("/") or "/"
    while existing and not os.path.exists(existing):  # missing directories are created, like mkdir -p
        existing = os.path.dirname(existing)
    if existing and not os.path.isdir(existing):
        raise _usage(f"{existing} is not a directory")
    if os.path.exists(os.path.join(auth_dir, f"{name}.key_secret")):
        raise _usage(f"{auth_dir}/{name}.key_secret exists already; choose another --name")
    try:
        _, secret = transport.generate_keys(auth_dir, name, admin)
    except OSError as exc:
        raise _fail(f"cannot write keys in {auth_dir}: {exc.strerror or exc}") from None
    typer.echo(f"server keys: {auth_dir}/server.key (public)")
    typer.echo(f"             {auth_dir}/server.key_secret (keep private)")
    typer.echo(f"{'admin' if admin else 'client'} key {name!r}: {secret}")
    typer.echo("  give it, with server.key, to that client")
    typer.echo(f"serve with: shardd serve --auth-dir {auth_dir}")
    typer.echo(f"clients:    SHARDD_KEYS={auth_dir} SHARDD_KEY_NAME={name}")


_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def key_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a key pair (it becomes a file name in the auth_dir), or None.

    1-64 characters: letters, digits, '_', '.', '-', starting with a letter or digit; no '..'
    (no path separators, no hidden files) and not "server", which is the daemon's own pair.
    """
    if not _KEY_NAME.match(name):
        return "use 1-64 of A-Za-z0-9_.-, starting with a letter or digit"
    if ".." in name:
        return "must not contain '..'"
    if name == "server":
        return "'server' is the daemon's own key pair; choose another name"
    return None


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
    """Grow or shrink the number of shards while serving; only keys whose shard changes move.

    The daemon is reached first with a short timeout (an unreachable one fails at once); then
    progress lines go to stderr while the resize runs, and the result to stdout.
    """
    if not 1 <= shards <= 1024:
        raise _usage(f"shards must be between 1 and 1024, got {shards}")
    before = _ask(endpoint, min(timeout, _REACH_TIMEOUT), lambda client: client.topology())
    if before["resizing"] or before.get("pending_resize"):
        raise _fail("a resize is already running; wait for it to finish (see: shardd shards)")
    typer.echo(f"resizing {before['shards']} → {shards} shards (epoch {before['epoch']})...", err=True)
    result = _resize_with_progress(endpoint, timeout, shards)
    share = result["moved"] / result["total"] if result["total"] else 0.0
    typer.echo(f"resized {result['from']} → {result['to']} shards in {result['seconds']:.2f} s: "
               f"moved {result['moved']}/{result['total']} keys ({share:.1%}), epoch {result['epoch']}")


_REACH_TIMEOUT = 2.0  # seconds: how long a long-running command waits to reach the daemon at all
_PROGRESS_EVERY = 1.0  # seconds between progress polls of a running resize


def _resize_with_progress(endpoint: str, timeout: float, shards: int) -> dict[str, Any]:
    """Run the (long) resize call in a thread; meanwhile poll the topology on a second client
    and print a progress line to stderr whenever the state changes (and every 10 polls)."""
    import threading

    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = _ask(endpoint, timeout, lambda client: client.resize(shards))
        except typer.Exit as exc:  # _ask printed the message already
            outcome["exit"] = exc

    thread = threading.Thread(target=run, name="resize", daemon=True)
    thread.start()
    last, polls = None, 0
    with _client(endpoint, _REACH_TIMEOUT) as watcher:
        while True:
            thread.join(_PROGRESS_EVERY)
            if not thread.is_alive():
                break
            polls += 1
            try:
                topology = watcher.topology()
            except SharddError as exc:
                state = f"no progress report ({exc})"
            else:
                resizing = topology["resizing"]
                if resizing is None:
                    state = "starting workers" if topology.get("pending_resize") else "finishing"
                elif not resizing.get("moving"):
                    state = f"starting workers for {resizing['to']} shards (epoch {resizing['epoch']})"
                else:
                    state = f"moving keys to {resizing['to']} shards (epoch {resizing['epoch']})"
            if state != last or polls % 10 == 0:
                typer.echo(_message(f"  {state}... {polls * _PROGRESS_EVERY:.0f} s"), err=True)
                last = state
    if "exit" in outcome:
        raise outcome["exit"]
    return outcome["result"]


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
        raise _usage(f"unknown setting {setting!r}; choose one of {', '.join(_TUNE_KEYS)}")
    parsed: Any = value
    if key == "mailbox_limit":
        try:
            parsed = int(value)
        except ValueError:
            raise _usage(f"mailbox-limit must be a whole number, got {value!r}") from None
        if not -_INT64 <= parsed < _INT64:  # cannot be sent at all; the daemon checks the real range
            raise _usage(f"mailbox-limit {_short(value, 16)} is out of range (1 to 10000000)")
    shards = _ask(endpoint, timeout, lambda client: client.tune(**{key: parsed}))
    typer.echo(f"{key} = {value} on {shards} shards")


_INT64 = 1 << 63


def _short(text: str, width: int = 24) -> str:
    """``text`` cut to ``width`` characters, so an absurd argument cannot make a message long."""
    return text if len(text) <= width else text[: width - 1] + "…"


@app.command()
def get(
    key: str,
    raw: Annotated[bool, typer.Option("--raw", help="Write the value's bytes exactly, without a newline.")] = False,
    endpoint: Endpoint = DEFAULT_ENDPOINT,
    timeout: TimeoutOpt = 1.0,
) -> None:
    """Print the value of KEY (exit 1 if it does not exist)."""
    value = _ask(endpoint, timeout, lambda client: client.get(key))
    if value is None:
        raise _fail(f"{_short(key, 40)}: not found")
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
        raise _usage(f"--file {path}: {exc.strerror or exc}") from None


TtlOpt = Annotated[float | None, typer.Option(help="Time to live in seconds (fractions allowed).", callback=_seconds)]


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
        raise _usage("give either VALUE or --file PATH (--file - reads standard input)")
    if nx and xx:
        raise _usage("--nx and --xx exclude each other")
    data = value.encode("utf-8", "surrogateescape") if value is not None else _read_value(file or "-")
    stored = _ask(endpoint, timeout, lambda client: client.set(key, data, ttl=ttl, nx=nx, xx=xx))
    if not stored:
        raise _fail(f"{_short(key, 40)}: not stored ({'exists' if nx else 'does not exist'})")
    typer.echo("OK")


@app.command("del")
def delete(keys: list[str], endpoint: Endpoint = DEFAULT_ENDPOINT, timeout: TimeoutOpt = 1.0) -> None:
    """Delete KEYS; print how many existed."""
    n = _ask(endpoint, timeout, lambda client: client.delete_many(keys))
    typer.echo(str(n))


AmountArg = Annotated[int, typer.Argument(help="How much to add (a signed 64-bit integer).")]


@app.command()
def incr(key: str, amount: AmountArg = 1, endpoint: Endpoint = DEFAULT_ENDPOINT,
         timeout: TimeoutOpt = 1.0) -> None:
    """Add AMOUNT (default 1) to the integer at KEY (missing counts as 0); print the new value."""
    typer.echo(str(_ask(endpoint, timeout, lambda client: client.incr(key, amount))))


@app.command()
def decr(key: str, amount: AmountArg = 1, endpoint: Endpoint = DEFAULT_ENDPOINT,
         timeout: TimeoutOpt = 1.0) -> None:
    """Subtract AMOUNT (default 1) from the integer at KEY (missing counts as 0); print the new value."""
    typer.echo(str(_ask(endpoint, timeout, lambda client: client.decr(key, amount))))


@app.command()
def ttl(key: str, endpoint: Endpoint = DEFAULT_ENDPOINT, timeout: TimeoutOpt = 1.0) -> None:
    """Print the seconds until KEY expires ("inf" if it never does; exit 1 if it does not exist)."""
    left = _ask(endpoint, timeout, lambda client: client.ttl(key))
    if left is None:
        raise _fail(f"{_short(key, 40)}: not found")
    typer.echo("inf" if left == math.inf else f"{left:.3f}")


@app.command()
def expire(
    key: str,
    seconds: Annotated[float, typer.Argument(help="Seconds from now (fractions allowed).", callback=_seconds)],
    endpoint: Endpoint = DEFAULT_ENDPOINT,
    timeout: TimeoutOpt = 1.0,
) -> None:
    """Make KEY expire SECONDS from now (exit 1 if it does not exist)."""
    if not _ask(endpoint, timeout, lambda client: client.expire(key, seconds)):
        raise _fail(f"{_short(key, 40)}: not found")
    typer.echo("OK")


@app.command()
def persist(key: str, endpoint: Endpoint = DEFAULT_ENDPOINT, timeout: TimeoutOpt = 1.0) -> None:
    """Remove the TTL of KEY, so it never expires (exit 1 if it does not exist)."""
    if not _ask(endpoint, timeout, lambda client: client.persist(key)):
        raise _fail(f"{_short(key, 40)}: not found")
    typer.echo("OK")


@app.command()
def flush(
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    endpoint: Endpoint = DEFAULT_ENDPOINT,
    timeout: TimeoutOpt = 2.0,
) -> None:
    """Remove every key on every shard (an admin op); asks first unless --yes."""
    if not yes:
        if not sys.stdin.isatty():
            raise _usage("flush removes every key on every shard; pass --yes to confirm")
        if not typer.confirm(f"remove every key of the daemon at {endpoint}?"):
            raise _fail("not flushed")
    n = _ask(endpoint, timeout, lambda client: client.flush())
    typer.echo(f"flushed: {n} keys removed")


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
    else:
        _console().print(_stats_view(data))
    _warn_missing(data.get("missing"), "the totals cover the other shards")


def _warn_missing(missing: list[dict[str, Any]] | None, consequence: str) -> None:
    """Name the shards that did not answer (a stuck or restarting worker), on stderr.

    The command still succeeds with what the other shards said; ``shardd health`` is the check
    that fails (exit 1) on such a shard.
    """
    if missing:
        names = ", ".join(f"shard {row['shard']} {row['status']}" for row in missing)
        typer.echo(_message(f"shardd: no answer from {names}; {consequence}"), err=True)


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
        typer.echo(json.dumps({"window_s": data["window_s"], "down": data["down"], "missing": _missing(data),
                               "keys": rows}, indent=2))
        _warn_missing(_missing(data), "their keys are not listed")
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
    _warn_missing(_missing(data), "their keys are not listed")


def _missing(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The shards a hotkeys reply left out, with their state (older daemons only list "down")."""
    return data.get("missing") or [{"shard": shard, "status": "down"} for shard in data.get("down", [])]


@app.command()
def top(
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.", min=0.1)] = 1.0,
    iterations: Annotated[int, typer.Option(help="Stop after this many refreshes (0: until q or Ctrl-C).",
                                            min=0)] = 0,
    endpoint: Endpoint = DEFAULT_ENDPOINT,
    timeout: TimeoutOpt = 2.0,
) -> None:
    """A live per-shard view, refreshed every second; q or Ctrl-C quits.

    With standard output not a terminal (a pipe, a file) it prints a plain snapshot per refresh,
    separated by a blank line, like ``top -b``; --iterations 1 prints one and exits. A daemon
    that does not answer the first refresh is an error (exit 1); later failures are shown and
    retried.
    """
    import contextlib
    import signal
    import time

    console = _console()
    plain = not sys.stdout.isatty()
    interactive = not plain and sys.stdin.isatty()

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through Live and _cbreak: cursor and terminal restored

    previous_handler = signal.signal(signal.SIGTERM, terminated)
    previous: tuple[float, dict[int, int]] | None = None
    count = 0
    try:
        with contextlib.ExitStack() as stack:
            client = stack.enter_context(_client(endpoint, timeout))
            show: Callable[[Any], None]
            if plain:
                def show(view: Any) -> None:
                    if count:
                        console.print()
                    console.print(view)
                    console.file.flush()
            else:
                from rich.live import Live

                if interactive:
                    stack.enter_context(_cbreak())
                live = stack.enter_context(Live(console=console, auto_refresh=False))

                def show(view: Any) -> None:
                    live.update(view, refresh=True)
            while True:
                try:
                    data = client.stats()
                except SharddError as exc:
                    if previous is None and count == 0:
                        raise _fail(str(exc)) from None  # never reached the daemon: say so and stop
                    if plain:
                        typer.echo(_message(f"shardd: {exc} (retrying)"), err=True)
                    else:
                        from rich.text import Text

                        show(Text(f"shardd: {exc} (retrying)"))
                    data = None
                if data is not None:
                    now = time.monotonic()
                    ops = {row["shard"]: row["ops"] for row in data["shards"] if row.get("status") == "up"}
                    rates = None
                    if previous is not None:
                        dt = max(now - previous[0], 1e-3)
                        rates = {s: max(0, n - previous[1].get(s, 0)) / dt for s, n in ops.items()}
                    previous = (now, ops)
                    show(_stats_view(data, rates))
                count += 1
                if iterations and count >= iterations:
                    return
                if _wait_for_quit(interval, interactive):
                    return
    except KeyboardInterrupt:
        return
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def _wait_for_quit(seconds: float, interactive: bool) -> bool:
    """Wait ``seconds`` (the refresh interval); True if the user typed q meanwhile."""
    import select
    import time

    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if not interactive:
            time.sleep(left)
            return False
        ready, _, _ = select.select([sys.stdin], [], [], left)
        if ready and sys.stdin.read(1) in ("q", "Q"):
            return True
    return False


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


def _base(cls: type, name: str) -> type:
    """The class called ``name`` among ``cls`` and its bases."""
    return next(base for base in cls.__mro__ if base.__name__ == name)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: every error is a short message and an exit code, never a traceback.

    Usage errors (unknown option, bad value, missing argument) exit 2 with one line naming the
    command; a failure exits 1. An unexpected exception (a bug) is one line too, unless
    SHARDD_DEBUG=1 asks for the traceback.
    """
    # typer >= 0.16 vendors click (typer._click), older ones use click itself: take the classes
    # from typer's own BadParameter rather than importing either.
    usage_error = _base(typer.BadParameter, "UsageError")
    click_exception = _base(typer.BadParameter, "ClickException")
    command = typer.main.get_command(app)
    code: Any
    try:
        code = command.main(args=argv, prog_name="shardd", standalone_mode=False)
    except usage_error as exc:
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help())  # (typer's rich help prints itself and returns "")
            code = ExitCode.CONFIG
        else:
            where = ctx.command_path if ctx is not None else "shardd"
            hint = f"; see '{where} --help'" if ctx is not None else ""
            typer.echo(_message(f"{where}: {exc.format_message().rstrip('.')}{hint}"), err=True)
            code = ExitCode.CONFIG
    except click_exception as exc:
        typer.echo(_message(f"shardd: {exc.format_message()}"), err=True)
        code = getattr(exc, "exit_code", ExitCode.FAILURE)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("shardd: aborted", err=True)
        code = 130
    except BrokenPipeError:
        # The reader went away (shardd stats | head): nothing left to say, and nobody to say it to.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the interpreter's final flush is quiet
        code = ExitCode.FAILURE
    except Exception as exc:  # a bug: still one line, with the way to see more
        if os.environ.get("SHARDD_DEBUG"):
            raise
        typer.echo(_message(f"shardd: unexpected error: {type(exc).__name__}: {exc} "
                            "(SHARDD_DEBUG=1 shows the traceback)"), err=True)
        code = ExitCode.FAILURE
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
