"""Observability commands and their rendering: ``stats`` (a table that fits 80 columns),
``hotkeys`` and ``top`` (live, or plain snapshots when stdout is not a terminal). rich is
imported inside the functions, so the other commands do not pay for it at start-up."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
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
)
from shardd.errors import SharddError

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
    resp = data.get("resp")
    if resp:
        top = sorted(resp["by_command"].items(), key=lambda item: -item[1])[:4]
        lines.append(f"RESP {resp['bind']}: {resp['connections']} connections, {resp['commands']} commands "
                     f"({', '.join(f'{name} {count}' for name, count in top) or 'none'}), {resp['errors']} errors")
    near = data.get("near_cache")
    if near:
        lines.append(f"near cache: {near['marked']} hot keys marked, {_human_count(near['invalidation_messages'])} "
                     f"invalidations sent ({_human_count(near['keys_invalidated'])} keys), {near['resets']} resets")
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
    data = ask(endpoint, timeout, lambda client: client.stats())
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
        typer.echo(fit_width(f"shardd: no answer from {names}; {consequence}"), err=True)


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
    """List the most accessed keys over all shards, with their shard and estimated rate.

    With near caches on, "hot" marks the keys their shard has marked for clients' near caches,
    and a last line says how many keys each shard has marked."""
    data = ask(endpoint, timeout, lambda client: client.hotkeys(top))
    hot = set(data.get("hot") or ())
    marked = data.get("marked") or []  # absent from daemons without near caches
    if as_json:
        rows = [{"key": key.decode("utf-8", "backslashreplace"), "shard": shard, "rate_per_s": rate,
                 "count": count, "error": error, **({"hot": key in hot} if marked else {})}
                for key, shard, rate, count, error in data["keys"]]
        out = {"window_s": data["window_s"], "down": data["down"], "missing": _missing(data), "keys": rows}
        if marked:
            out["marked"] = marked
        typer.echo(json.dumps(out, indent=2))
        _warn_missing(_missing(data), "their keys are not listed")
        return
    from rich import box
    from rich.table import Table

    table = Table(title=f"hot keys, last {data['window_s']:.0f} s", box=box.SIMPLE_HEAD, pad_edge=False)
    titles = ("#", "key", "shard", "ops/s", "count", "±error", *(("hot",) if marked else ()))
    for title in titles:
        table.add_column(title, justify="left" if title in ("key", "hot") else "right", no_wrap=True)
    for rank, (key, shard, rate, count, error) in enumerate(data["keys"], 1):
        table.add_row(str(rank), _safe_key(key), str(shard), f"{rate:.1f}", str(count), str(error),
                      *(("hot" if key in hot else "",) if marked else ()))
    console = _console()
    console.print(table)
    console.print("estimates: count - error <= true accesses <= count")
    if marked:
        per_shard = ", ".join(f"shard {row['shard']} {row['marked']}" for row in marked)
        console.print(fit_width(f"near cache: keys marked hot: {per_shard} "
                                f"(total {sum(row['marked'] for row in marked)})"))
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
            client = stack.enter_context(connect(endpoint, timeout))
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
                        raise fail(str(exc)) from None  # never reached the daemon: say so and stop
                    if plain:
                        typer.echo(fit_width(f"shardd: {exc} (retrying)"), err=True)
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
