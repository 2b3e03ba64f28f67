"""Every `shardd` command, invoked wrongly: a short message, the right exit code, no traceback.

Exit codes: 2 for a usage error (bad or missing argument, option, endpoint, file), found before
anything is sent; 1 for a runtime failure (the daemon does not answer, a file cannot be written).
Each message fits 80 columns, in at most 3 lines (one, for nearly all).

The table runs in-process through ``shardd.cli.main`` (what the console script and
``python -m shardd`` call), so it stays fast on a busy machine; the cases named in the issue also
run as real subprocesses.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest

from shardd import cli
from shardd.cli import common
from tests.conftest import free_port
from tests.helpers import assert_one_message, run_cli

USAGE, FAILURE = 2, 1

# (argv, exit code, a phrase the message must contain). "{down}" is an endpoint nobody listens
# on, "{tmp}" a scratch directory holding "bad.toml" (not UTF-8), "file" (a plain file) and
# "keys" (an auth_dir being created).
CASES: list[tuple[list[str], int, str]] = [
    # the program itself
    ([], USAGE, "Usage"),
    (["nosuch"], USAGE, "No such command"),
    (["--bogus"], USAGE, "No such option"),
    # serve (only failures found before any process starts)
    (["serve", "--config", "{tmp}/bad.toml"], USAGE, "not UTF-8"),
    (["serve", "--config", "{tmp}/missing.toml"], USAGE, "does not exist"),
    (["serve", "--shards", "-1"], USAGE, "shards"),
    (["serve", "--shards", "many"], USAGE, "--shards"),
    (["serve", "--bind", "foo"], USAGE, "bind"),
    # check-config
    (["check-config"], USAGE, "Missing argument"),
    (["check-config", "{tmp}/bad.toml"], USAGE, "not UTF-8"),
    (["check-config", "{tmp}/missing.toml"], USAGE, "does not exist"),
    (["check-config", "{tmp}"], USAGE, "config file"),
    # ping
    (["ping", "-e", "foo"], USAGE, "bad endpoint 'foo'"),
    (["ping", "-e", "tcp://localhost"], USAGE, "bad endpoint"),
    (["ping", "--timeout", "0"], USAGE, "--timeout"),
    (["ping", "--timeout", "nan"], USAGE, "--timeout"),
    (["ping", "-e", "{down}", "--timeout", "0.2"], FAILURE, "no reply"),
    # health
    (["health", "--deadline", "-1"], USAGE, "'--deadline': must be a finite number of seconds > 0, got -1"),
    (["health", "--deadline", "soon"], USAGE, "--deadline"),
    (["health", "-e", "{down}", "--deadline", "0.2"], FAILURE, "no reply"),
    # maintenance
    (["maintenance", "sideways"], USAGE, "on, off or status"),
    (["maintenance", "on", "-e", "{down}", "--timeout", "0.2"], FAILURE, "no reply"),
    # keys generate
    (["keys"], USAGE, "Usage"),
    (["keys", "generate"], USAGE, "Missing argument"),
    (["keys", "generate", "{tmp}/file"], USAGE, "{tmp}/file is not a directory"),
    (["keys", "generate", "{tmp}/keys", "--name", "a..b"], USAGE, "'..'"),
    (["keys", "generate", "{tmp}/keys", "--name", "x" * 65], USAGE, "1-64"),
    (["keys", "generate", "{tmp}/file/keys"], USAGE, "{tmp}/file is not a directory"),
    (["keys", "generate", "{tmp}/keys", "--name", "a/b"], USAGE, "--name 'a/b'"),
    (["keys", "generate", "{tmp}/keys", "--name", "../evil"], USAGE, "--name '../evil'"),
    (["keys", "generate", "{tmp}/keys", "--name", ""], USAGE, "--name ''"),
    (["keys", "generate", "{tmp}/keys", "--name", "server"], USAGE, "daemon's own"),
    # shards, shards resize
    (["shards", "--bogus"], USAGE, "No such option"),
    (["shards", "-e", "{down}", "--timeout", "0.2"], FAILURE, "no reply"),
    (["cluster"], USAGE, "Usage"),
    (["cluster", "frobnicate"], USAGE, "No such command"),
    (["cluster", "status", "-e", "{down}"], FAILURE, "no reply from {down} within 2 s to topology"),
    (["cluster", "status", "--timeout", "0"], USAGE, "timeout"),
    (["cluster", "leave", "-e", "{down}"], FAILURE, "no reply from {down} within 2 s to leave"),
    (["shards", "resize"], USAGE, "Missing argument"),
    (["shards", "resize", "three"], USAGE, "'shards'"),
    (["shards", "resize", "0"], USAGE, "between 1 and 1024"),
    (["shards", "resize", "3", "-e", "{down}"], FAILURE, "no reply from {down} within 2 s to topology"),
    # tune
    (["tune", "mailbox-limit"], USAGE, "Missing argument"),
    (["tune", "speed", "11"], USAGE, "unknown setting"),
    (["tune", "mailbox-limit", "99999999999999999999999"], USAGE, "out of range"),
    (["tune", "mailbox-limit", "lots"], USAGE, "whole number"),
    (["tune", "mailbox-limit", "2048", "-e", "{down}", "--timeout", "0.2"], FAILURE, "no reply"),
    # get, set, del
    (["get"], USAGE, "Missing argument"),
    (["get", "k", "-e", "{down}", "--timeout", "0.2"], FAILURE, "no reply"),
    (["set", "k"], USAGE, "either VALUE or --file"),
    (["set", "k", "v", "--file", "{tmp}/file"], USAGE, "either VALUE or --file"),
    (["set", "k", "--file", "{tmp}/missing"], USAGE, "No such file"),
    (["set", "k", "v", "--ttl", "0"], USAGE, "--ttl"),
    (["set", "k", "v", "--nx", "--xx"], USAGE, "exclude each other"),
    (["set", "k", "v", "-e", "{down}", "--timeout", "0.2"], FAILURE, "no reply"),
    (["del"], USAGE, "Missing argument"),
    (["del", "k", "-e", "{down}", "--timeout", "0.2"], FAILURE, "no reply"),
    # incr, decr
    (["incr"], USAGE, "Missing argument"),
    (["incr", "n", "lots"], USAGE, "'amount'"),
    (["incr", "n", "99999999999999999999999"], USAGE, "64-bit"),
    (["incr", "n", "-e", "{down}", "--timeout", "0.2"], FAILURE, "no reply"),
    (["decr"], USAGE, "Missing argument"),
    (["decr", "n", "99999999999999999999999"], USAGE, "64-bit"),
    (["decr", "n", "-e", "{down}", "--timeout", "0.2"], FAILURE, "no reply"),
    # ttl, expire, persist
    (["ttl"], USAGE, "Missing argument"),
    (["ttl", "k", "-e", "{down}", "--timeout", "0.2"], FAILURE, "no reply"),
    (["expire", "k"], USAGE, "Missing argument"),
    (["expire", "k", "-5"], USAGE, "No such option"),
    (["expire", "k", "0"], USAGE, "'seconds'"),
    (["expire", "k", "inf"], USAGE, "'seconds'"),
    (["expire", "k", "5", "-e", "{down}", "--timeout", "0.2"], FAILURE, "no reply"),
    (["persist"], USAGE, "Missing argument"),
    (["persist", "k", "-e", "{down}", "--timeout", "0.2"], FAILURE, "no reply"),
    # flush
    (["flush"], USAGE, "pass --yes"),
    (["flush", "--yes", "-e", "{down}", "--timeout", "0.2"], FAILURE, "no reply"),
    # stats, hotkeys, top
    (["stats", "--bogus"], USAGE, "No such option"),
    (["stats", "-e", "tcp://localhost"], USAGE, "bad endpoint"),
    (["stats", "-e", "{down}", "--timeout", "0.2"], FAILURE, "no reply"),
    (["hotkeys", "--top", "0"], USAGE, "--top"),
    (["hotkeys", "-e", "{down}", "--timeout", "0.2"], FAILURE, "no reply"),
    (["top", "--interval", "0"], USAGE, "--interval"),
    (["top", "-e", "{down}", "--timeout", "0.2"], FAILURE, "no reply"),
]


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    (tmp_path / "bad.toml").write_bytes(b"\xff\xfe bind = 1\n")
    (tmp_path / "file").write_text("a plain file\n")
    return tmp_path


def _fill(arg: str, tmp: Path, down: str) -> str:
    return arg.replace("{tmp}", str(tmp)).replace("{down}", down)


def _check_message(err: str, out: str, code: int, expected_code: int, phrase: str) -> None:
    assert code == expected_code, (code, err, out)
    assert "Traceback" not in err + out
    if phrase == "Usage":  # the help a bare group prints
        assert "Usage" in err + out
        return
    assert out == "", out
    assert_one_message(err, phrase)


@pytest.mark.parametrize(("argv", "expected_code", "phrase"), CASES,
                         ids=[" ".join(argv)[:60] or "(no arguments)" for argv, _, _ in CASES])
def test_bad_invocation_is_one_short_message_and_an_exit_code(argv, expected_code, phrase, scratch, capfd,
                                                             monkeypatch):
    down = f"tcp://127.0.0.1:{free_port()}"
    monkeypatch.delenv("SHARDD_ENDPOINT", raising=False)
    monkeypatch.delenv("SHARDD_KEYS", raising=False)
    monkeypatch.delenv("SHARDD_CONFIG", raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO())  # not a terminal: nothing may prompt
    with pytest.raises(SystemExit) as exit_info:
        cli.main([_fill(arg, scratch, down) for arg in argv])
    captured = capfd.readouterr()
    _check_message(captured.err, captured.out, exit_info.value.code, expected_code, _fill(phrase, scratch, down))


def _commands(group, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every command path of the CLI, e.g. ("keys", "generate"); groups included."""
    import typer

    out = set()
    ctx = typer.Context(group)
    for name in group.list_commands(ctx):
        sub = group.get_command(ctx, name)
        out.add((*prefix, name))
        if hasattr(sub, "list_commands"):
            out |= _commands(sub, (*prefix, name))
    return out


def test_the_table_covers_every_command():
    import typer

    commands = _commands(typer.main.get_command(cli.app))
    covered = {tuple(argv[:2]) if tuple(argv[:2]) in commands else tuple(argv[:1]) for argv, _, _ in CASES}
    assert commands - covered == set()
    # and every command that talks to a daemon has a runtime-failure row (exit 1) too
    failing = {tuple(a for a in argv if not a.startswith("-") and a != "{down}")[:2] for argv, code, _ in CASES
               if code == FAILURE and "{down}" in argv}
    offline = {("serve",), ("check-config",), ("keys",), ("keys", "generate")}
    talking = {c for c in commands if c not in offline}
    assert {c for c in talking if not any(f[: len(c)] == c for f in failing)} == set()


@pytest.mark.parametrize(("argv", "env", "expected_code", "phrase"), [
    (["tune", "mailbox-limit", "99999999999999999999999"], {}, USAGE, "mailbox-limit"),
    (["check-config", "{tmp}/bad.toml"], {}, USAGE, "not UTF-8"),
    (["serve", "--config", "{tmp}/bad.toml"], {}, USAGE, "not UTF-8"),
    (["ping", "-e", "foo"], {}, USAGE, "bad endpoint 'foo'"),
    (["stats"], {"SHARDD_ENDPOINT": "tcp://localhost"}, USAGE, "bad endpoint 'tcp://localhost'"),
    (["keys", "generate", "{tmp}/file"], {}, USAGE, "not a directory"),
    (["keys", "generate", "{tmp}/file/keys"], {}, USAGE, "is not a directory"),
    (["keys", "generate", "{tmp}/keys", "--name", "a/b"], {}, USAGE, "--name"),
], ids=["tune-overflow", "check-config-latin1", "serve-latin1", "ping-e-foo", "stats-env-no-port",
        "keys-on-a-file", "keys-under-a-file", "keys-name-slash"])
def test_the_reported_tracebacks_are_one_line_from_the_real_command(argv, env, expected_code, phrase, scratch):
    """The issue's reproductions, exactly as a user runs them (a new interpreter, the real entry point)."""
    r = run_cli(None, *(a.replace("{tmp}/", "") for a in argv), cwd=scratch,
                env={**{k: v for k, v in os.environ.items() if not k.startswith("SHARDD_")}, **env})
    _check_message(r.stderr, r.stdout, r.returncode, expected_code, phrase)
    assert len(r.stderr.splitlines()) == 1, r.stderr


def test_a_bug_is_one_line_unless_debugging(capfd, monkeypatch):
    """The last resort: an unexpected exception is one line naming it (SHARDD_DEBUG=1 re-raises)."""
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(common, "connect", broken)  # what every command reaches the daemon through
    monkeypatch.delenv("SHARDD_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["ping"])
    _check_message(capfd.readouterr().err, "", exit_info.value.code, FAILURE, "unexpected error: RuntimeError: boom")
    monkeypatch.setenv("SHARDD_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["ping"])
