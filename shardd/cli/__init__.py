"""The ``shardd`` command: run the daemon and operate it.

Client commands take ``--endpoint`` (or ``$SHARDD_ENDPOINT``). Exit codes: 0 success,
1 the command failed (daemon unreachable, error reply, missing key for ``get``), 2 bad
configuration or usage (caught before anything is sent). Every error is a short message on
stderr that fits 80 columns, never a traceback (``SHARDD_DEBUG=1`` shows one for a bug).

The commands live in modules by concern: ``daemon`` (serve, check-config, keys), ``admin``
(operating a running daemon), ``data`` (commands on keys), ``views`` (stats, hotkeys, top);
``common`` holds what they share. ``main`` is the console script ``shardd``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from typing import Any

import typer

from shardd.cli.common import app, fit_width
from shardd.errors import ExitCode

__all__ = ["app", "main"]

# Importing a module registers its commands on ``app``; ``shardd --help`` lists them in this order.
for _module in ("daemon", "admin", "data", "views", "cluster"):
    importlib.import_module(f"shardd.cli.{_module}")


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
            typer.echo(fit_width(f"{where}: {exc.format_message().rstrip('.')}{hint}"), err=True)
            code = ExitCode.CONFIG
    except click_exception as exc:
        typer.echo(fit_width(f"shardd: {exc.format_message()}"), err=True)
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
        typer.echo(fit_width(f"shardd: unexpected error: {type(exc).__name__}: {exc} "
                            "(SHARDD_DEBUG=1 shows the traceback)"), err=True)
        code = ExitCode.FAILURE
    raise SystemExit(code if isinstance(code, int) else 0)
