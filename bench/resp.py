"""Micro-benchmarks of the RESP endpoint's per-command CPU: request parsing and reply encoding.

    PYTHONPATH=. python bench/resp.py              # ~20 s
    PYTHONPATH=. python bench/resp.py --quick      # ~3 s, rougher
    PYTHONPATH=. python bench/resp.py --json /tmp/resp-micro.json

What it measures, in µs per command (best of ``--repeat`` timings of ``--number`` loops each,
so a noisy machine inflates the figures less than a mean would):

- **parse**, for three read shapes: (a) one ``GET`` per read (a client waiting for each reply),
  (b) 16 pipelined ``SET key <100 B value>`` per read, (c) 100 pipelined ``GET`` per read.
  Each shape through:
  ``RequestParser.feed`` (what the endpoint runs: a C-speed regex screen, then hiredis),
  ``hiredis.Reader`` alone (the floor of the fast path: feed + ``gets`` until False),
  ``shardd.resp.parse`` (the exact pure-Python parser, used for anything unusual), and
  ``RequestParser.feed`` with the fast path off (the Python parser behind the same front door).
- **reply encoding** of a GET hit (100 B value): ``resp_commands._bulk_or_nil`` (what the
  endpoint calls per GET reply), ``resp.encode`` (the generic encoder), and the native
  ``protocol.decode_reply`` that comes before it when a shard's reply frame is turned into RESP.

This is the evidence behind "parse with hiredis" (issue 14): the ratio column is each parser's
cost over ``RequestParser.feed``'s.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import hiredis  # noqa: E402

from shardd import protocol as p  # noqa: E402
from shardd import resp  # noqa: E402
from shardd.resp_commands import _bulk_or_nil  # noqa: E402

MAX_BULK = 512 * 1024 * 1024  # Redis's proto-max-bulk-len
MAX_ARGS = 1024 * 1024
VALUE = b"v" * 100
X = "\N{MULTIPLICATION SIGN}"


def command(*args: bytes) -> bytes:
    """One command as a client sends it: an array of bulk strings."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def shapes() -> dict[str, tuple[bytes, int]]:
    """name -> (the bytes of one read, commands in it)."""
    return {
        "(a) 1 GET per read": (command(b"GET", b"key:000000012345"), 1),
        "(b) 16 pipelined SETs (100 B) per read": (
            b"".join(command(b"SET", b"key:%012d" % i, VALUE) for i in range(16)), 16),
        "(c) 100 pipelined GETs per read": (b"".join(command(b"GET", b"key:%012d" % i) for i in range(100)), 100),
    }


def _feed(data: bytes) -> Callable[[], Any]:
    parser = resp.RequestParser(MAX_BULK)
    return lambda: parser.feed(data)


class _NoFastPath(resp.RequestParser):
    """RequestParser whose hiredis step always declines: every buffer goes to the Python parser."""

    __slots__ = ()

    def _fast(self, buf: bytes) -> None:
        return None


def _feed_python(data: bytes) -> Callable[[], Any]:
    """The same front door with the fast path off."""
    parser = _NoFastPath(MAX_BULK)
    return lambda: parser.feed(data)


def _hiredis(data: bytes) -> Callable[[], Any]:
    reader = hiredis.Reader()

    def run() -> list[Any]:
        reader.feed(data)
        out = []
        while (cmd := reader.gets()) is not False:
            out.append(cmd)
        return out
    return run


def _python(data: bytes) -> Callable[[], Any]:
    return lambda: resp.parse(data, MAX_BULK, MAX_ARGS)


PARSERS: dict[str, Callable[[bytes], Callable[[], Any]]] = {
    "RequestParser.feed (screen + hiredis)": _feed,
    "hiredis.Reader alone": _hiredis,
    "shardd.resp.parse (pure Python)": _python,
    "RequestParser.feed, fast path off": _feed_python,
}


def best_us(fn: Callable[[], Any], number: int, repeat: int) -> float:
    """Best per-call time of ``fn`` in µs."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def run(number: int, repeat: int) -> dict[str, Any]:
    parse_rows = []
    for shape, (data, n) in shapes().items():
        expected = resp.parse(data, MAX_BULK, MAX_ARGS)[0]
        base = None
        for name, make in PARSERS.items():
            fn = make(data)
            got = fn()
            commands = got[0] if isinstance(got, tuple) else got
            assert commands == expected, (shape, name)  # every parser reads the same commands
            per_read = best_us(fn, max(1, number // n), repeat)
            per_command = per_read / n
            base = base or per_command
            parse_rows.append({"shape": shape, "parser": name, "us_per_read": per_read,
                               "us_per_command": per_command, "x_feed": per_command / base})
    frame = p.encode_reply(12345, p.OK, VALUE)
    reply = p.decode_reply(frame)
    encode_rows = []
    for name, fn in (
        ("resp_commands._bulk_or_nil (the endpoint's GET reply)", lambda: _bulk_or_nil(0, VALUE, False)),
        ("resp.encode(value, resp3=False) (generic)", lambda: resp.encode(VALUE, False)),
        ("protocol.decode_reply (the shard's frame, before it)", lambda: p.decode_reply(frame)),
        ("decode_reply + _bulk_or_nil (frame → RESP)",
         lambda: _bulk_or_nil(reply.status, p.decode_reply(frame).value, False)),
    ):
        encode_rows.append({"what": name, "us": best_us(fn, number, repeat)})
    return {"python": platform.python_version(), "hiredis": hiredis.__version__, "number": number,
            "repeat": repeat, "parse": parse_rows, "encode": encode_rows}


def format_report(report: dict[str, Any]) -> str:
    out = [f"CPython {report['python']}, hiredis {report['hiredis']}; best of {report['repeat']} timings "
           f"of ~{report['number']:,} commands each", "",
           f"| read | parser | µs per read | µs per command | {X} RequestParser.feed |", "|---|---|---|---|---|"]
    for r in report["parse"]:
        out.append(f"| {r['shape']} | {r['parser']} | {r['us_per_read']:.2f} | {r['us_per_command']:.3f} "
                   f"| {r['x_feed']:.2f}{X} |")
    out += ["", "| reply for a GET hit (100 B) | µs |", "|---|---|"]
    out += [f"| {r['what']} | {r['us']:.3f} |" for r in report["encode"]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="RESP parser and reply encoding micro-benchmarks (bench/README.md).")
    ap.add_argument("--number", type=int, default=200_000, help="commands per timing (default 200000)")
    ap.add_argument("--repeat", type=int, default=5, help="timings per row; the best is shown (default 5)")
    ap.add_argument("--quick", action="store_true", help="--number 20000 --repeat 3")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    args = ap.parse_args(argv)
    if args.quick:
        args.number, args.repeat = 20_000, 3
    report = run(args.number, args.repeat)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
