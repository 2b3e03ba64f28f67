"""Fuzz the RESP endpoint of a live daemon with random and mutated Redis-protocol streams.

    python bench/fuzz_resp.py --seconds 300              # starts its own daemon (2 shards)
    python bench/fuzz_resp.py --port 6380 --seconds 60   # a daemon already serving RESP there

Each batch opens many connections at once and writes to them in random partial writes,
interleaved: valid commands with bytes flipped, inserted, deleted or cut; random garbage; giant
multibulk counts; negative and huge lengths; inline junk with quotes and escapes; NUL bytes;
lines longer than 64 KiB. The exact parser (shardd.resp.parse, checked against redis-server in
tests/integration/test_resp_protocol_errors.py) predicts, per connection, how many commands the
server reads and whether a protocol error ends the stream. Checked per connection: exactly one
reply per command, in RESP2; after a protocol error, that error is the last reply and the server
closes. Checked per batch: every daemon process alive, the values written before the fuzz still
intact on every shard, a fresh client served, the router's RSS. Any failure stops the run with
the seed and the stream that broke it. tests/integration/test_resp_fuzz.py runs a short version.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shardd.resp import parse

MAX_BULK = 16 * 1024 * 1024  # the daemon's max_message_bytes (default)
MAX_ARGS = 1024 * 1024       # RequestParser's default
PREFIX = b"fz:"              # fuzz keys; the known keys (see known_keys) never start with it

_NAMES = [b"GET", b"SET", b"ECHO", b"PING", b"MGET", b"DEL", b"EXISTS", b"INCR", b"APPEND", b"STRLEN",
          b"TTL", b"TYPE", b"EXPIRE", b"GETDEL", b"SETNX", b"DBSIZE", b"TIME", b"SELECT", b"COMMAND",
          b"CLIENT", b"NOSUCH", b"get", b"sEt"]
_JUNK = [b"*2147483648\r\n", b"*99999999999\r\n", b"*-1\r\n", b"*0\r\n", b"$-5\r\n", b"*1\r\n$-1\r\n",
         b"*3\r\n$3\r\nSET\r\n$99999999999\r\n", b"*1\r\n$2147483648\r\n", b"\x00\x00\x00", b"\r\n\r\n",
         b'SET "a b\r\n', b"ECHO 'x\\'y'\r\n", b'ECHO "\\x41\\xZZ\\n"\r\n', b"*1\r\n:1\r\n", b"*1\r\n+PING\r\n",
         b"PING\r\n", b"\n", b"*1\r\n$4\r\nPINGxx", b"*1000000\r\n", b"$", b"*", b"*1\r", b"\xff\xfe\r\n"]


def known_keys(n: int = 64) -> dict[bytes, bytes]:
    """The keys written before the fuzz and checked after each batch (they spread over every shard)."""
    return {b"known:%03d" % i: b"value-%03d-" % i + bytes(range(256)) for i in range(n)}


def multibulk(*args: bytes) -> bytes:
    return b"*%d\r\n%s" % (len(args), b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args))


def _command(rng: random.Random) -> bytes:
    name = rng.choice(_NAMES)
    key = PREFIX + str(rng.randrange(50)).encode()
    args = [name, *[rng.choice([key, b"1", b"EX", b"NX", b"GET", bytes(rng.randrange(256) for _ in range(5))])
                    for _ in range(rng.choice([0, 1, 1, 2, 2, 3, 5]))]]
    if name in (b"SET", b"sEt", b"APPEND") and len(args) >= 2:
        args[1] = key
    if rng.random() < 0.15:
        args.append(os.urandom(rng.choice([100, 3000, 70_000])))
    if rng.random() < 0.2:  # inline
        words = [a for a in args if a and not any(c in a for c in b"\r\n\x00\"' \t")]
        return b" ".join(words) + rng.choice([b"\r\n", b"\n"]) if words else b"\r\n"
    return multibulk(*args)


def _mutate(rng: random.Random, data: bytearray) -> None:
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(data) + 1)
        kind = rng.randrange(6)
        if kind == 0 and data:
            data[min(i, len(data) - 1)] = rng.randrange(256)
        elif kind == 1:
            data[i:i] = rng.choice([b"\r\n", b"*", b"$", b"-1", b"0", b"9" * 11, b"+", b"\x00", b"\n", b"\r", b'"'])
        elif kind == 2:
            del data[i:i + rng.randint(1, 8)]
        elif kind == 3:
            data[i:i] = os.urandom(rng.randint(1, 16))
        elif kind == 4:
            data[i:i] = rng.choice(_JUNK)
        else:
            del data[i:]


def stream(rng: random.Random) -> bytes:
    """One connection's bytes: mostly valid commands, often mutated, sometimes pure junk."""
    kind = rng.random()
    if kind < 0.05:
        return os.urandom(rng.randint(1, 4000))
    if kind < 0.08:
        return b"x" * rng.choice([65536, 65537, 70000]) + rng.choice([b"", b"\r\n"])  # long inline lines
    if kind < 0.10:
        return rng.choice(_JUNK) * rng.randint(1, 3)
    data = bytearray(b"".join(_command(rng) for _ in range(rng.randint(1, 30))))
    if rng.random() < 0.6:
        _mutate(rng, data)
    return bytes(data)


@dataclass
class Expectation:
    commands: int            # replies the server owes before anything else
    error: str | None        # the protocol error that ends the stream, if any
    complete: bool           # the stream ends at a command boundary (a PING sentinel can follow)


def expect(data: bytes) -> Expectation:
    commands, pos, error, _ = parse(data, MAX_BULK, MAX_ARGS)
    return Expectation(len(commands), None if error is None else str(error), error is None and pos == len(data))


def replies(buf: bytes) -> tuple[list[bytes], int]:
    """The complete top-level RESP2 replies in ``buf`` (each as its first line) and where they end."""
    out: list[bytes] = []
    pos = 0

    def one(p: int) -> int:
        end = buf.find(b"\r\n", p)
        if end < 0:
            return -1
        kind, line = buf[p:p + 1], buf[p + 1:end]
        if kind in (b"+", b"-", b":"):
            return end + 2
        if kind == b"$":
            n = int(line)
            if n < 0:
                return end + 2
            return end + 2 + n + 2 if len(buf) >= end + 2 + n + 2 else -1
        if kind == b"*":
            q = end + 2
            for _ in range(max(int(line), 0)):
                q = one(q)
                if q < 0:
                    return -1
            return q
        raise AssertionError(f"not a RESP2 reply at {p}: {buf[p:p + 60]!r}")

    while pos < len(buf):
        end = one(pos)
        if end < 0:
            break
        out.append(buf[pos:buf.find(b"\r\n", pos)])
        pos = end
    return out, pos


SENTINEL = b"*1\r\n$4\r\nPING\r\n"


@dataclass
class Conn:
    sock: socket.socket
    data: bytes
    expected: Expectation
    sent: int = 0
    got: bytearray = field(default_factory=bytearray)
    closed: bool = False
    finished_writing: bool = False


def run_batch(port: int, rng: random.Random, streams: int, deadline_s: float = 120.0) -> dict[str, int]:
    """One batch of ``streams`` concurrent connections; raises AssertionError on a violated invariant."""
    sel = selectors.DefaultSelector()
    conns: list[Conn] = []
    for _ in range(streams):
        data = stream(rng)
        expected = expect(data)
        if expected.complete:
            data += SENTINEL
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.setblocking(False)
        conn = Conn(sock, data, expected)
        conns.append(conn)
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
    deadline = time.monotonic() + deadline_s
    open_conns = len(conns)
    while open_conns:
        if time.monotonic() > deadline:
            stuck = [c for c in conns if not c.closed]
            raise AssertionError(f"{len(stuck)} connections unfinished, e.g. {stuck[0].data[:200]!r} "
                                 f"expected {stuck[0].expected}, got {bytes(stuck[0].got[:300])!r}")
        for key, events in sel.select(timeout=1.0):
            conn: Conn = key.data
            if events & selectors.EVENT_WRITE and not conn.finished_writing:
                size = rng.choice([1, 3, 17, 500, 4096, 65536])
                try:
                    conn.sent += conn.sock.send(conn.data[conn.sent:conn.sent + size])
                except (BlockingIOError, InterruptedError):
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    conn.finished_writing = True  # the server closed on a protocol error: read what came
                if conn.sent >= len(conn.data) and not conn.finished_writing:
                    conn.finished_writing = True
                if conn.finished_writing:
                    sel.modify(conn.sock, selectors.EVENT_READ, conn)
                    if not conn.expected.complete and conn.expected.error is None:
                        with contextlib.suppress(OSError):  # (unless the server closed first)
                            conn.sock.shutdown(socket.SHUT_WR)  # it ends inside a command: end it by EOF
            if events & selectors.EVENT_READ:
                try:
                    chunk = conn.sock.recv(1 << 20)
                except (BlockingIOError, InterruptedError):
                    continue
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    conn.got += chunk
                    if conn.expected.complete:
                        done, _ = replies(bytes(conn.got))
                        if len(done) == conn.expected.commands + 1:
                            chunk = b""  # every reply and the sentinel's: done
                if not chunk:
                    conn.closed = True
                    open_conns -= 1
                    sel.unregister(conn.sock)
                    conn.sock.close()
    sel.close()
    counts = {"connections": streams, "commands": 0, "protocol_errors": 0, "incomplete": 0, "bytes": 0}
    for conn in conns:
        check(conn)
        counts["commands"] += conn.expected.commands
        counts["protocol_errors"] += conn.expected.error is not None
        counts["incomplete"] += not conn.expected.complete and conn.expected.error is None
        counts["bytes"] += len(conn.data)
    return counts


def check(conn: Conn) -> None:
    got = bytes(conn.got)
    done, end = replies(got)
    e = conn.expected
    where = f"stream {conn.data[:300]!r}... ({len(conn.data)} bytes), expected {e}, got {got[:300]!r}"
    assert not any(line.startswith(b"-ERR Protocol error") for line in done[:-1]), "reply after a protocol error: " \
        + where
    if e.error is not None:
        assert end == len(got), "bytes after the last reply: " + where
        assert done and done[-1] == b"-ERR " + e.error.replace("\r", " ").replace("\n", " ").encode(
            "utf-8", "replace"), "not the expected protocol error: " + where
        assert len(done) == e.commands + 1, "not one reply per command before the error: " + where
    elif e.complete:
        assert len(done) == e.commands + 1 and done[-1] == b"+PONG", "not one reply per command: " + where
    else:  # ended by our EOF inside a command: the server may drop replies still in flight, never add any
        assert len(done) <= e.commands and end == len(got), "more replies than commands: " + where


def check_health(port: int, keys: dict[bytes, bytes]) -> None:
    """A fresh, well-behaved client: the known values intact, SET/GET served."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        names = list(keys)
        s.sendall(multibulk(b"MGET", *names) + multibulk(b"SET", PREFIX + b"probe", b"p") +
                  multibulk(b"GET", PREFIX + b"probe"))
        expected = b"*%d\r\n%s+OK\r\n$1\r\np\r\n" % (len(names), b"".join(b"$%d\r\n%s\r\n" % (len(keys[k]), keys[k])
                                                                        for k in names))
        got = b""
        while len(got) < len(expected):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            got += chunk
        assert got == expected, f"after the fuzz, a fresh client got {got[:300]!r}"


def write_known(port: int, keys: dict[bytes, bytes]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"".join(multibulk(b"SET", k, v) for k, v in keys.items()))
        got = b""
        while len(got) < 5 * len(keys):
            got += s.recv(1 << 16)
        assert got == b"+OK\r\n" * len(keys), got[:200]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, help="RESP port of a running daemon (default: start one)")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--streams", type=int, default=64, help="concurrent connections per batch")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    print(f"seed {seed}", flush=True)
    proc = None
    tmp = None
    port = args.port
    if port is None:
        import psutil  # noqa: F401 - only to fail early if the test extras are missing

        tmp = tempfile.TemporaryDirectory()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            native = s.getsockname()[1]
        log = open(Path(tmp.name) / "shardd.log", "wb")  # noqa: SIM115 - the daemon's lifetime
        proc = subprocess.Popen([sys.executable, "-m", "shardd", "serve", "--bind", f"tcp://127.0.0.1:{native}",
                                 "--shards", "2", "--runtime-dir", str(Path(tmp.name) / "run"),
                                 "--resp-bind", f"tcp://127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).resolve().parent.parent)
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    s.sendall(SENTINEL)
                    if s.recv(16) == b"+PONG\r\n":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                print(Path(tmp.name, "shardd.log").read_text(errors="replace"))
                return 2
            time.sleep(0.1)
    keys = known_keys()
    totals: dict[str, int] = {}
    batches = 0
    end = time.monotonic() + args.seconds
    try:
        write_known(port, keys)
        while time.monotonic() < end:
            counts = run_batch(port, rng, args.streams)
            check_health(port, keys)
            if proc is not None:
                assert proc.poll() is None, "the daemon exited"
            batches += 1
            for k, v in counts.items():
                totals[k] = totals.get(k, 0) + v
            if batches % 10 == 0:
                print(f"{batches} batches: {totals}", flush=True)
    except AssertionError as exc:
        print(f"FAILED (seed {seed}, batch {batches}): {exc}", flush=True)
        return 1
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        if tmp is not None:
            tmp.cleanup()
    print(f"ok: {batches} batches, {totals}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
