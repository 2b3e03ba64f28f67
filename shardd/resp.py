"""The Redis protocol (RESP2 and RESP3), sans-IO: request bytes in, commands out; replies as bytes.

Theory of operation
-------------------
A Redis client sends each command as an array of bulk strings (``*2\\r\\n$3\\r\\nGET\\r\\n$1\\r\\nk\\r\\n``),
or, typed by a person, as one "inline" line (``GET k\\r\\n``). ``RequestParser.feed`` takes whatever
the socket delivered and returns every complete command in it, in order, plus the protocol error
that ended the stream if there was one (the server answers the commands before it, then the error,
then closes: what Redis does). The texts of those errors are Redis's own, so clients and tools
that match on them behave the same.

Parsing is the largest per-command cost the RESP endpoint adds, so well-formed traffic goes to
hiredis's C parser (~0.4 µs per pipelined command against ~2.7 µs for the Python one,
bench/resp.py). hiredis is a *reply* parser, though: it would accept replies where a request must
have bulk strings, it knows no inline commands, and it allocates an array as soon as it reads a
count. So it only ever sees a buffer that starts at a command boundary and that a C-speed regex
found free of anything unusual (inline text, negative or huge counts and lengths); everything else,
and any buffer that ends inside a command, goes to the exact Python parser, which also finds the
boundary the next read continues from. Both produce the same commands (tests/unit/test_resp.py
feeds every input to both).

Rules
-----
Rule 1: ``feed`` never raises; a malformed stream becomes a ProtocolError after the commands that
        preceded it, and the parser accepts nothing more.
Rule 2: memory is bounded by the limits: no bulk string longer than ``max_bulk``, no command with
        more than ``max_args`` arguments, no inline line longer than 64 KiB, and no more than
        ``max_bulk`` + 64 KiB buffered while a command is incomplete.
Rule 3: until the connection has authenticated (when a password is required), a command may have
        at most 10 arguments and 16 KiB per argument (Redis's unauthenticated limits), and ``feed``
        returns one command at a time (``feed(b"")`` for the next), so that the command after an
        AUTH is parsed with the limits AUTH lifted.
"""

from __future__ import annotations

import re
from typing import Any

import hiredis

INLINE_MAX = 64 * 1024   # Redis's PROTO_INLINE_MAX_SIZE
_HEADER_MAX = 64 * 1024  # a count line without its CRLF after this many bytes is garbage
UNAUTH_MAX_ARGS = 10
UNAUTH_MAX_BULK = 16384

# Anything the fast path must not see: a count that is negative or 9+ digits (hiredis allocates
# an array as soon as it reads its count), a negative length, or an element hiredis would turn
# into bytes although it is not a bulk string (simple string "+", verbatim "=", big number "(";
# Redis answers "expected '$'"). A huge bulk length needs no check: hiredis allocates nothing
# before the bytes are there, and the exact parser refuses the length as soon as it reads it while
# the bytes are arriving. Values can contain these bytes too; then the exact parser runs, which
# only costs time. One regex with a literal first byte and plain substring tests: a character
# class first ("[*$]...") made the scan cost more than hiredis's parse (bench/resp.py).
_HUGE_COUNT = re.compile(rb"\*(?:-|\d{9})")


def _unusual(buf: bytes) -> bool:
    return (_HUGE_COUNT.search(buf) is not None or b"$-" in buf or b"\r\n+" in buf or b"\r\n=" in buf
            or b"\r\n(" in buf)


class ProtocolError(Exception):
    """The stream cannot be parsed further; the message is Redis's error text (after "-ERR ")."""


class RequestParser:
    """One connection's request stream. ``feed(data) -> (commands, error)``; see the module doc."""

    __slots__ = ("_buf", "_chunks", "_failed", "_have", "_need", "_reader", "authenticated", "max_args", "max_bulk")

    def __init__(self, max_bulk: int, max_args: int = 1024 * 1024, authenticated: bool = True) -> None:
        self.max_bulk = max_bulk
        self.max_args = max_args
        self.authenticated = authenticated
        self._buf = b""  # the unparsed bytes; they always start at a command boundary
        self._reader = hiredis.Reader()
        self._failed = False
        # While a long command arrives: its reads so far, their size, and the size it needs.
        self._chunks: list[bytes] = []
        self._have = 0
        self._need = 0

    @property
    def buffered(self) -> int:
        return len(self._buf) + self._have

    def feed(self, data: bytes) -> tuple[list[list[bytes]], ProtocolError | None]:
        if self._failed:
            return [], None
        if self._need:  # a large bulk string is arriving: join once it is all here, not per read
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._need:
                return [], None
            data = b"".join(self._chunks)
            self._chunks, self._have, self._need = [], 0, 0
        buf = self._buf + data if self._buf else data
        if not buf:
            return [], None
        if (buf[0] == 42 and buf.endswith(b"\r\n") and self.authenticated
                and not _unusual(buf)):
            commands = self._fast(buf)
            if commands is not None:
                self._buf = b""
                return commands, None
        authenticated = self.authenticated
        commands, pos, error, need = parse(buf, self.max_bulk if authenticated else min(self.max_bulk, UNAUTH_MAX_BULK),
                                           self.max_args if authenticated else UNAUTH_MAX_ARGS,
                                           unauthenticated=not authenticated)
        rest = buf[pos:]
        if error is None and max(len(rest), need) > self.max_bulk + _HEADER_MAX:
            error = ProtocolError("Protocol error: request too large")  # Rule 2 (a valid one cannot be)
        if error is not None:
            self._failed = True
            rest = b""
        elif need > len(rest) + 65536:
            self._chunks, self._have, self._need = [rest], len(rest), need
            rest = b""
        self._buf = rest
        return commands, error

    def _fast(self, buf: bytes) -> list[list[bytes]] | None:
        """Every command in ``buf`` by hiredis, or None if ``buf`` does not end exactly after one
        command, or holds anything but arrays of bulk strings (then the exact parser decides)."""
        reader = self._reader
        reader.feed(buf)
        commands = []
        gets = reader.gets
        try:
            while (command := gets()) is not False:
                if type(command) is not list:
                    break
                if command:  # "*0": Redis ignores an empty command, as parse does
                    commands.append(command)
            else:
                if not reader.has_data() and all(type(arg) is bytes for command in commands for arg in command):
                    # has_data() is also False when the buffer ends between two elements of an
                    # array: hiredis holds that partial command. An empty array tells: read
                    # alone it comes back as [], inside a partial command it does not.
                    reader.feed(b"*0\r\n")
                    if reader.gets() == []:
                        return commands
        except hiredis.ProtocolError:
            pass
        self._reader = hiredis.Reader()  # it holds a partial command or an error: start a new one
        return None


def parse(buf: bytes, max_bulk: int, max_args: int,
          unauthenticated: bool = False) -> tuple[list[list[bytes]], int, ProtocolError | None, int]:
    """Every complete command in ``buf`` (exact Redis semantics), where the unparsed rest starts,
    the error that stopped parsing, if any, and (0 if not known) how long the unparsed rest must
    grow before the command it starts can be complete."""
    commands: list[list[bytes]] = []
    pos = 0
    n = len(buf)
    find = buf.find
    while pos < n:
        if unauthenticated and commands:  # one at a time: an AUTH may lift the limits for the next (Rule 3)
            break
        if buf[pos] != 42:  # "*": otherwise an inline command
            end = find(b"\n", pos)
            if end < 0:
                if n - pos > INLINE_MAX:
                    return commands, pos, ProtocolError("Protocol error: too big inline request"), 0
                return commands, pos, None, 0
            if end - pos > INLINE_MAX:
                return commands, pos, ProtocolError("Protocol error: too big inline request"), 0
            line = buf[pos:end]
            pos = end + 1
            try:
                args = split_inline(line.rstrip(b"\r"))
            except ProtocolError as exc:
                return commands, pos, exc, 0
            if args:
                commands.append(args)
            continue
        end = find(b"\r\n", pos)
        if end < 0:
            if n - pos > _HEADER_MAX:
                return commands, pos, ProtocolError("Protocol error: too big mbulk count string"), 0
            return commands, pos, None, 0
        count = _int(buf[pos + 1:end])
        if count is None or count > 2**31 - 1:
            return commands, pos, ProtocolError("Protocol error: invalid multibulk length"), 0
        if count > max_args:
            return commands, pos, ProtocolError("Protocol error: unauthenticated multibulk length" if unauthenticated
                                                else "Protocol error: invalid multibulk length"), 0
        p = end + 2
        if count <= 0:  # Redis ignores an empty command
            pos = p
            continue
        args = []
        for _ in range(count):
            if p >= n:
                return commands, pos, None, 0
            if buf[p] != 36:  # "$"
                return commands, pos, ProtocolError(f"Protocol error: expected '$', got '{chr(buf[p])}'"), 0
            end = find(b"\r\n", p)
            if end < 0:
                if n - p > _HEADER_MAX:
                    return commands, pos, ProtocolError("Protocol error: too big bulk count string"), 0
                return commands, pos, None, 0
            length = _int(buf[p + 1:end])
            if length is None or length < 0 or length > max_bulk:
                return commands, pos, ProtocolError(
                    "Protocol error: unauthenticated bulk length" if unauthenticated and length is not None
                    and length > 0 else "Protocol error: invalid bulk length"), 0
            start = end + 2
            p = start + length + 2
            if p > n:
                return commands, pos, None, p - pos
            args.append(buf[start:start + length])
        commands.append(args)
        pos = p
    return commands, pos, None, 0


_DIGITS = re.compile(rb"0|-?[1-9]\d{0,18}")  # Redis's string2ll: no "+", no leading zeros, no "-0"


def _int(text: bytes) -> int | None:
    if not _DIGITS.fullmatch(text):
        return None
    value = int(text)
    return value if -(2**63) <= value < 2**63 else None  # string2ll fails on overflow


_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b", ord("a"): b"\a"}
_HEX = re.compile(rb"[0-9a-fA-F]{2}")


def _after_closing_quote(line: bytes, i: int) -> int:
    """Where the next word may start after the closing quote at ``i``: a space must follow it
    (sdssplitargs), or the line must end there."""
    if i + 1 < len(line) and line[i + 1] not in b" \t\n\r\v\f":
        raise ProtocolError("Protocol error: unbalanced quotes in request")
    return i + 1


def split_inline(line: bytes) -> list[bytes]:
    """An inline command's arguments, split as Redis's sdssplitargs does (quotes, escapes)."""
    args: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in b" \t\n\r\v\f":
            i += 1
        if i >= n:
            return args
        current = bytearray()
        quote = 0
        while True:
            if i >= n:
                if quote:
                    raise ProtocolError("Protocol error: unbalanced quotes in request")
                break
            c = line[i]
            if quote == 34:  # inside "..."
                if c == 92 and i + 3 < n and line[i + 1] == 120 and _HEX.fullmatch(line[i + 2:i + 4]):
                    current.append(int(line[i + 2:i + 4], 16))
                    i += 3
                elif c == 92 and i + 1 < n:
                    i += 1
                    current += _ESCAPES.get(line[i], bytes([line[i]]))
                elif c == 34:
                    i = _after_closing_quote(line, i)
                    break
                else:
                    current.append(c)
            elif quote == 39:  # inside '...'
                if c == 92 and i + 1 < n and line[i + 1] == 39:
                    i += 1
                    current.append(39)
                elif c == 39:
                    i = _after_closing_quote(line, i)
                    break
                else:
                    current.append(c)
            elif c in b" \t\n\r":  # sdssplitargs: \v and \f only separate outside a word
                break
            elif c in (34, 39):
                quote = c
            else:
                current.append(c)
            i += 1
        args.append(bytes(current))


# --- replies ---------------------------------------------------------------------------------

OK = b"+OK\r\n"
PONG = b"+PONG\r\n"
NIL2 = b"$-1\r\n"
NIL3 = b"_\r\n"
EMPTY_ARRAY = b"*0\r\n"
ZERO = b":0\r\n"
ONE = b":1\r\n"


def error(text: str) -> bytes:
    """An error reply; ``text`` starts with its code (ERR, WRONGPASS, ...). CR/LF become spaces."""
    return b"-%s\r\n" % text.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace")


def simple(text: str) -> bytes:
    return b"+%s\r\n" % text.encode()


def integer(n: int) -> bytes:
    return b":%d\r\n" % n


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def encode(value: Any, resp3: bool) -> bytes:
    """A Python value as a reply: bytes/str → bulk, int → integer, None → nil, list/tuple → array,
    dict → map (RESP3) or flat array (RESP2), float → double (RESP3) or bulk (RESP2),
    bool → integer 0/1 (RESP2) or boolean (RESP3)."""
    t = type(value)
    if t is bytes:
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if t is str:
        data = value.encode()
        return b"$%d\r\n%s\r\n" % (len(data), data)
    if t is bool:
        return (b"#t\r\n" if value else b"#f\r\n") if resp3 else (ONE if value else ZERO)
    if t is int:
        return b":%d\r\n" % value
    if value is None:
        return NIL3 if resp3 else NIL2
    if t is list or t is tuple:
        return b"*%d\r\n%s" % (len(value), b"".join(encode(item, resp3) for item in value))
    if t is dict:
        if resp3:
            return b"%%%d\r\n%s" % (len(value), b"".join(encode(k, resp3) + encode(v, resp3)
                                                          for k, v in value.items()))
        return b"*%d\r\n%s" % (2 * len(value), b"".join(encode(k, resp3) + encode(v, resp3)
                                                        for k, v in value.items()))
    if t is float:
        text = repr(value).encode()
        return b",%s\r\n" % text if resp3 else b"$%d\r\n%s\r\n" % (len(text), text)
    if isinstance(value, Reply):
        return value.data
    raise TypeError(f"no RESP encoding for {t.__name__}")


class Reply:
    """Bytes already encoded as a reply, to nest inside ``encode``'s containers (e.g. a status)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def verbatim(text: str, resp3: bool) -> bytes:
    """A text blob (INFO): a verbatim string in RESP3, a bulk string in RESP2."""
    data = text.encode()
    if resp3:
        return b"=%d\r\ntxt:%s\r\n" % (len(data) + 4, data)
    return b"$%d\r\n%s\r\n" % (len(data), data)
