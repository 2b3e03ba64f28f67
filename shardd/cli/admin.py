"""Commands that operate a running daemon: ``ping``, ``health``, ``maintenance``, ``shards``
(the topology, and ``shards resize`` with its progress lines) and ``tune``."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from shardd.cli.common import (
    DEFAULT_ENDPOINT,
    Endpoint,
    TimeoutOpt,
    app,
    ask,
    connect,
    fail,
    fit_width,
    positive_seconds,
    short,
    usage,
)
from shardd.errors import SharddError
from shardd.hashing import MAX_SHARDS


@app.command()
def ping(endpoint: Endpoint = DEFAULT_ENDPOINT, timeout: TimeoutOpt = 1.0) -> None:
    """Check that every shard answers."""
    n = ask(endpoint, timeout, lambda client: client.ping())
    typer.echo(f"PONG ({n} shards)")


@app.command()
def health(
    deadline: Annotated[float, typer.Option(help="Seconds each shard has to answer.", callback=positive_seconds)] = 1.0,
    endpoint: Endpoint = DEFAULT_ENDPOINT,
) -> None:
    """Exit 0 if every shard answers within the deadline; otherwise name the shards that did not."""
    report = ask(endpoint, deadline + 1.0, lambda client: client.health(deadline))
    bad = [row for row in report["shards"] if row["status"] != "ok"]
    mode = " (maintenance mode: writes refused)" if report.get("maintenance") else ""
    if bad:
        names = ", ".join(f"shard {row['shard']} {row['status']}" for row in bad)
        raise fail(f"unhealthy: {names}{mode}")
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
        raise usage(f"mode must be on, off or status, got {mode!r}")
    now = ask(endpoint, timeout, lambda client: client.maintenance(wanted[mode]))
    typer.echo(f"maintenance {'on' if now else 'off'}")


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
    topology = ask(endpoint, timeout, lambda client: client.topology())
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
    if not 1 <= shards <= MAX_SHARDS:
        raise usage(f"shards must be between 1 and {MAX_SHARDS}, got {shards}")
    before = ask(endpoint, min(timeout, _REACH_TIMEOUT), lambda client: client.topology())
    if before["resizing"] or before.get("pending_resize"):
        raise fail("a resize is already running; wait for it to finish (see: shardd shards)")
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
            outcome["result"] = ask(endpoint, timeout, lambda client: client.resize(shards))
        except typer.Exit as exc:  # ask printed the message already
            outcome["exit"] = exc

    thread = threading.Thread(target=run, name="resize", daemon=True)
    thread.start()
    last, polls = None, 0
    with connect(endpoint, _REACH_TIMEOUT) as watcher:
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
                typer.echo(fit_width(f"  {state}... {polls * _PROGRESS_EVERY:.0f} s"), err=True)
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
        raise usage(f"unknown setting {setting!r}; choose one of {', '.join(_TUNE_KEYS)}")
    parsed: Any = value
    if key == "mailbox_limit":
        try:
            parsed = int(value)
        except ValueError:
            raise usage(f"mailbox-limit must be a whole number, got {value!r}") from None
        if not -_INT64 <= parsed < _INT64:  # cannot be sent at all; the daemon checks the real range
            raise usage(f"mailbox-limit {short(value, 16)} is out of range (1 to 10000000)")
    shards = ask(endpoint, timeout, lambda client: client.tune(**{key: parsed}))
    typer.echo(f"{key} = {value} on {shards} shards")


_INT64 = 1 << 63
