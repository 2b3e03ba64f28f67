"""Commands that run the daemon or prepare for it, without contacting one: ``serve``,
``check-config`` and ``keys generate``."""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Annotated, Any

import typer

from shardd.cli.common import (
    app,
    fail,
    short,
    usage,
)
from shardd.errors import ConfigError, ExitCode


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
    resp_bind: Annotated[str | None, typer.Option(
        "--resp-bind", help="Redis-protocol endpoint, e.g. tcp://127.0.0.1:6380 (off by default).")] = None,
) -> None:
    """Run the daemon in the foreground (supervisor, router, one worker per shard)."""
    from shardd.config import load_config

    overrides: dict[str, Any] = {
        "bind": bind, "shards": shards, "runtime_dir": runtime_dir, "state_dir": state_dir, "auth_dir": auth_dir,
        "mailbox_limit": mailbox_limit,
        "log_level": log_level, "pin_cpus": pin_cpus, "enable_debug_ops": enable_debug_ops,
        "allow_remote_without_auth": allow_remote_without_auth, "resp_bind": resp_bind,
    }
    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        raise fail(str(exc), ExitCode.CONFIG) from None
    # The daemon's main process should not carry the CLI: typer (which loads pydantic to convert
    # options) is ~13 MiB that the supervisor never uses. The flags are parsed and the config
    # checked here, then this process becomes a fresh interpreter running only the supervisor,
    # with the same pid (systemd's MAINPID), fds and environment.
    from shardd import process

    with contextlib.suppress(OSError):  # (if exec fails, serve from here)
        process.replace_with("shardd.supervisor:main", json.dumps({"config": config, "overrides": overrides}))
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
        raise fail(str(exc), ExitCode.CONFIG) from None
    import msgspec

    typer.echo(f"{path}: OK")
    for key, value in msgspec.structs.asdict(cfg).items():
        typer.echo(f"  {key} = {value!r}")


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
        raise usage(f"--name {short(name, 16)!r}: {problem}")
    existing = auth_dir.rstrip("/") or "/"
    while existing and not os.path.exists(existing):  # missing directories are created, like mkdir -p
        existing = os.path.dirname(existing)
    if existing and not os.path.isdir(existing):
        raise usage(f"{existing} is not a directory")
    if os.path.exists(os.path.join(auth_dir, f"{name}.key_secret")):
        raise usage(f"{auth_dir}/{name}.key_secret exists already; choose another --name")
    try:
        _, secret = transport.generate_keys(auth_dir, name, admin)
    except OSError as exc:
        raise fail(f"cannot write keys in {auth_dir}: {exc.strerror or exc}") from None
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
