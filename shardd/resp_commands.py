"""Redis commands as shardd ops: what each command means, and how each answer is spelled in RESP.

Theory of operation
-------------------
``COMMANDS`` maps a command name to its ``Command``: Redis's arity and flags (what ``COMMAND``
reports and what the endpoint checks before anything else) and a handler. A handler reads the
arguments and returns one of:

* ``bytes``: the reply, answered at once (PING, ECHO, syntax errors, ...);
* ``(op, convert)``: one native op (shardd.protocol) for the router to place, and how to turn
  its answer ``(status, value)`` into the reply — the path of GET, SET and every keyed command;
* ``Plan(ops, combine)``: several native ops, all queued in one go, whose answers, in order,
  ``combine`` turns into one reply (EXISTS and TOUCH of several keys).

Every Redis semantic that needs atomicity is one native op (SET ... GET is ``setget``, EXPIRE
NX/XX/GT/LT is ``expire_if``, MSETNX is ``set_many_nx``), so no command reads and then writes
across two round trips. Handlers are pure: the connection state they may read or change is the
``Session``; the daemon's numbers come back as ops (``stats`` for INFO and DBSIZE).

Errors use Redis's texts where Redis has one (``-ERR wrong number of arguments for 'get'
command``, ``-OOM command not allowed when used memory > 'maxmemory'.``); shardd's own refusals
map to the Redis code a client already handles (docs/resp.md lists each one).
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shardd import protocol as p
from shardd import resp as r

REDIS_VERSION = "7.0.0"  # what HELLO and INFO report: the Redis whose commands this endpoint follows

Convert = Callable[[int, Any, bool], bytes]
Handler = Callable[["Session", list[bytes]], Any]


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    arity: int                 # Redis's: n = exactly n words (name included), -n = at least n
    flags: tuple[str, ...]
    first_key: int
    last_key: int
    step: int
    handler: Handler
    summary: str
    admin: bool = False        # needs the admin user when resp_admin_password is set
    no_auth: bool = False      # allowed before AUTH


class Plan:
    """Several native ops queued together; ``combine(answers, resp3)`` makes the one reply."""

    __slots__ = ("combine", "ops")

    def __init__(self, ops: list[p.Op], combine: Callable[[list[tuple[int, Any]], bool], bytes]) -> None:
        self.ops = ops
        self.combine = combine


class Session:
    """One connection's state: protocol, name, user; and what the server lets commands read."""

    __slots__ = ("admin", "client_id", "closing", "created", "lib_name", "lib_ver", "multi", "multi_failed", "name",
                 "peer", "resp3", "server", "user")

    def __init__(self, server: Any, client_id: int, peer: str, authenticated: bool) -> None:
        self.server = server  # resp_server.RespServer: config, counters
        self.client_id = client_id
        self.peer = peer
        self.resp3 = False
        self.name = b""
        self.lib_name = b""
        self.lib_ver = b""
        self.user: str | None = "default" if authenticated else None
        self.admin = authenticated and not server.admin_password
        self.closing = False  # QUIT: close once the reply is written
        self.multi: list[tuple[Command, list[bytes]]] | None = None  # MULTI: the commands queued for EXEC
        self.multi_failed = False  # a queued command was refused: EXEC answers EXECABORT
        self.created = time.monotonic()


# --- errors ------------------------------------------------------------------------------------

SYNTAX = r.error("ERR syntax error")
NOT_INT = r.error("ERR value is not an integer or out of range")
OVERFLOW = r.error("ERR increment or decrement would overflow")
OOM = r.error("OOM command not allowed when used memory > 'maxmemory'.")
WRONGPASS = r.error("WRONGPASS invalid username-password pair or user is disabled.")
NOAUTH = r.error("NOAUTH Authentication required.")


def arity_error(name: str) -> bytes:
    return r.error(f"ERR wrong number of arguments for '{name}' command")


def unknown_command(args: list[bytes]) -> bytes:
    """Redis's text, byte for byte: its 128-byte caps, C strings (cut at a NUL), the trailing space."""
    listed = b""
    for arg in args[1:]:
        if len(listed) >= 128:
            break
        listed += b"'" + _cstr(arg, 128 - len(listed)) + b"' "
    text = b"ERR unknown command '" + _cstr(args[0], 128) + b"', with args beginning with: " + listed
    return b"-" + text.replace(b"\r", b" ").replace(b"\n", b" ") + b"\r\n"


def _cstr(arg: bytes, limit: int) -> bytes:
    """``%.*s`` of a C string: up to the first NUL, at most ``limit`` bytes."""
    return arg.split(b"\0", 1)[0][:limit]


def unknown_subcommand(command: str, sub: bytes) -> bytes:
    return r.error(f"ERR unknown subcommand '{_text(sub)[:128]}'. Try {command.upper()} HELP.")


def _text(arg: bytes) -> str:
    return arg.decode("utf-8", "replace")


def expire_error(command: str) -> bytes:
    return r.error(f"ERR invalid expire time in '{command}' command")


def native_error(status: int, value: Any) -> bytes:
    """A shardd error status as the Redis error a client already knows how to handle."""
    message = value if isinstance(value, str) else str(value)
    if status == p.OUT_OF_MEMORY:
        return OOM
    if status == p.NOT_INTEGER:
        return OVERFLOW if "overflow" in message else NOT_INT
    if status in (p.BUSY, p.TRYAGAIN, p.UNAVAILABLE):
        return r.error(f"TRYAGAIN {message}")  # retryable: cluster-aware clients retry it themselves
    if status == p.MAINTENANCE:
        return r.error(f"READONLY {message}")
    if status == p.FORBIDDEN:
        return r.error(f"NOPERM {message}")
    return r.error(f"ERR {message}")


# --- reply conversions (status, value, resp3) → bytes ----------------------------------------------


def _bulk_or_nil(status: int, value: Any, resp3: bool) -> bytes:
    if status:
        return native_error(status, value)
    if value is None:
        return r.NIL3 if resp3 else r.NIL2
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _ok_or_nil(status: int, value: Any, resp3: bool) -> bytes:
    if status:
        return native_error(status, value)
    return r.OK if value else (r.NIL3 if resp3 else r.NIL2)


def _ok(status: int, value: Any, resp3: bool) -> bytes:
    return native_error(status, value) if status else r.OK


def _int(status: int, value: Any, resp3: bool) -> bytes:
    if status:
        return native_error(status, value)
    return b":%d\r\n" % value  # bool is an int: True → 1


def _ttl_seconds(status: int, value: Any, resp3: bool) -> bytes:
    if status:
        return native_error(status, value)
    return b":%d\r\n" % (value if value < 0 else (value + 500) // 1000)  # Redis rounds TTL


def _expiretime(scale: int) -> Convert:
    """EXPIRETIME (scale 1000) / PEXPIRETIME (1) from the TTL left. Deadlines are kept on the
    monotonic clock, so the wall-clock time comes back within a millisecond of what EXPIREAT set;
    EXPIRETIME snaps such a time to its second (2 ms of slack) so that it answers EXPIREAT's T."""
    slack = 2 if scale == 1000 else 0

    def convert(status: int, value: Any, resp3: bool) -> bytes:
        if status:
            return native_error(status, value)
        return b":%d\r\n" % (value if value < 0 else (_now_ms() + value + slack) // scale)
    return convert


def _type(status: int, value: Any, resp3: bool) -> bytes:
    if status:
        return native_error(status, value)
    return b"+string\r\n" if value else b"+none\r\n"


def _array_of_bulks(status: int, value: Any, resp3: bool) -> bytes:
    if status:
        return native_error(status, value)
    nil = r.NIL3 if resp3 else r.NIL2
    return b"*%d\r\n%s" % (len(value), b"".join(nil if v is None else b"$%d\r\n%s\r\n" % (len(v), v) for v in value))


def _sum_of(answers: list[tuple[int, Any]], resp3: bool) -> bytes:
    for status, value in answers:
        if status:
            return native_error(status, value)
    return b":%d\r\n" % sum(1 for _, value in answers if value)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- argument parsing ----------------------------------------------------------------------------

_I64 = (-(1 << 63), (1 << 63) - 1)
_match_int = re.compile(rb"0|-?[1-9][0-9]*").fullmatch


def _parse_int(arg: bytes) -> int | None:
    """A Redis integer argument (signed 64-bit decimal, no spaces, "+", leading zeros or "-0": as
    Redis's string2ll), or None."""
    if not arg or len(arg) > 20 or _match_int(arg) is None:
        return None
    value = int(arg)
    return value if _I64[0] <= value <= _I64[1] else None


# --- strings ---------------------------------------------------------------------------------------


def cmd_get(s: Session, args: list[bytes]) -> Any:
    return p.Get(args[1]), _bulk_or_nil


def _expiry(command: str, unit: bytes, arg: bytes) -> int | bytes:
    """EX/PX/EXAT/PXAT's argument as a TTL in ms (≤ 0 for a past EXAT/PXAT), or the error reply
    (Redis's getExpireMillisecondsOrReply; past 2**53-1 ms, shardd's limit, is invalid too)."""
    value = _parse_int(arg)
    if value is None:
        return NOT_INT
    if value <= 0:
        return expire_error(command)
    if unit == b"EX" or unit == b"EXAT":
        value *= 1000
    if unit == b"EXAT" or unit == b"PXAT":
        value -= _now_ms()
    if value > p.MAX_TTL_MS:
        return expire_error(command)
    return value


_UNITS = (b"EX", b"PX", b"EXAT", b"PXAT")


def _string_options(args: list[bytes], start: int, is_set: bool) -> tuple[int, bool, bool, bool, bytes | None, bytes]:
    """Redis's parseExtendedStringArgumentsOrReply for SET (``is_set``) and GETEX: (cond, get,
    keepttl, persist, unit, its argument) or, in ``unit``'s place, b"" for a syntax error.
    An option may repeat (the last EX/PX/... wins); options that exclude each other do not mix."""
    cond, get, keep, persist = p.ALWAYS, False, False, False
    unit: bytes | None = None
    amount = b""
    i, n = start, len(args)
    while i < n:
        opt = args[i].upper()
        if opt == b"NX" and is_set and cond != p.IF_PRESENT:
            cond = p.IF_ABSENT
        elif opt == b"XX" and is_set and cond != p.IF_ABSENT:
            cond = p.IF_PRESENT
        elif opt == b"GET" and is_set:
            get = True
        elif opt == b"KEEPTTL" and is_set and not persist and unit is None:
            keep = True
        elif opt == b"PERSIST" and not is_set and not keep and unit is None:
            persist = True
        elif opt in _UNITS and not keep and not persist and unit in (None, opt) and i + 1 < n:
            unit, amount = opt, args[i + 1]
            i += 1
        else:
            return cond, get, keep, persist, b"", b""
        i += 1
    return cond, get, keep, persist, unit, amount


def cmd_set(s: Session, args: list[bytes]) -> Any:
    key, value = args[1], args[2]
    if len(args) == 3:
        return p.Set(key, value), _ok
    cond, get, keep, _, unit, amount = _string_options(args, 3, True)
    if unit == b"":
        return SYNTAX
    ttl: int | None = None
    if unit is not None:
        got = _expiry("set", unit, amount)
        if type(got) is bytes:
            return got
        ttl = got  # type: ignore[assignment]
    if ttl is not None and ttl <= 0:  # EXAT/PXAT in the past: the key is set and gone at once
        if cond != p.ALWAYS:  # ... if it would have been set at all
            return p.SetGet(key, value, 1, cond), (_bulk_or_nil if get else _stored_from_old(cond))
        if get:
            return p.GetDel(key), _bulk_or_nil
        return p.Delete(key), _ok
    if get or keep:
        op = p.SetGet(key, value, ttl, cond, keep)
        if get:
            return op, _bulk_or_nil
        return op, _stored_from_old(cond)
    return p.Set(key, value, ttl, cond), _ok_or_nil


def _stored_from_old(cond: int) -> Convert:
    """SET ... KEEPTTL without GET runs as setget; whether it stored follows from the old value."""
    def convert(status: int, value: Any, resp3: bool) -> bytes:
        if status:
            return native_error(status, value)
        stored = cond == p.ALWAYS or (value is None) == (cond == p.IF_ABSENT)
        return r.OK if stored else (r.NIL3 if resp3 else r.NIL2)
    return convert


def cmd_setnx(s: Session, args: list[bytes]) -> Any:
    return p.Set(args[1], args[2], None, p.IF_ABSENT), _int


def _setex(command: str, scale: int) -> Handler:
    def handler(s: Session, args: list[bytes]) -> Any:
        ttl = _parse_int(args[2])
        if ttl is None:
            return NOT_INT
        if ttl <= 0 or ttl > p.MAX_TTL_MS // scale:
            return expire_error(command)
        return p.Set(args[1], args[3], ttl * scale), _ok
    return handler


def cmd_getset(s: Session, args: list[bytes]) -> Any:
    return p.SetGet(args[1], args[2]), _bulk_or_nil


def cmd_getdel(s: Session, args: list[bytes]) -> Any:
    return p.GetDel(args[1]), _bulk_or_nil


def cmd_getex(s: Session, args: list[bytes]) -> Any:
    key = args[1]
    _, _, _, persist, unit, amount = _string_options(args, 2, False)
    if unit == b"":
        return SYNTAX
    if unit is not None:
        got = _expiry("getex", unit, amount)
        if type(got) is bytes:
            return got
        return p.GetEx(key, got, False), _bulk_or_nil
    if persist:
        return p.GetEx(key, None, True), _bulk_or_nil
    return p.Get(key), _bulk_or_nil


def cmd_append(s: Session, args: list[bytes]) -> Any:
    return p.Append(args[1], args[2]), _int


def cmd_strlen(s: Session, args: list[bytes]) -> Any:
    return p.Strlen(args[1]), _int


def cmd_mget(s: Session, args: list[bytes]) -> Any:
    return p.GetMany(args[1:]), _array_of_bulks


def cmd_mset(s: Session, args: list[bytes]) -> Any:
    if len(args) % 2 == 0:
        return arity_error("mset")
    return p.SetMany(list(zip(args[1::2], args[2::2], strict=True))), _ok


def _msetnx_answer(status: int, value: Any, resp3: bool) -> bytes:
    if status == p.BAD_REQUEST and "more than one shard" in str(value):
        return r.error(f"CROSSSLOT Keys in request don't hash to the same shard: {value}")
    return _int(status, value, resp3)


def cmd_msetnx(s: Session, args: list[bytes]) -> Any:
    if len(args) % 2 == 0:
        return arity_error("msetnx")
    return p.SetManyNx(list(zip(args[1::2], args[2::2], strict=True))), _msetnx_answer


def cmd_incr(s: Session, args: list[bytes]) -> Any:
    return p.Incr(args[1], 1), _int


def cmd_decr(s: Session, args: list[bytes]) -> Any:
    return p.Incr(args[1], -1), _int


def cmd_incrby(s: Session, args: list[bytes]) -> Any:
    delta = _parse_int(args[2])
    if delta is None:
        return NOT_INT
    return p.Incr(args[1], delta), _int


def cmd_decrby(s: Session, args: list[bytes]) -> Any:
    delta = _parse_int(args[2])
    if delta is None:
        return NOT_INT
    if delta == _I64[0]:
        return r.error("ERR decrement would overflow")
    return p.Incr(args[1], -delta), _int


# --- keyspace --------------------------------------------------------------------------------------


def cmd_del(s: Session, args: list[bytes]) -> Any:
    if len(args) == 2:
        return p.Delete(args[1]), _int
    return p.DeleteMany(args[1:]), _int


def cmd_exists(s: Session, args: list[bytes]) -> Any:
    if len(args) == 2:
        return p.Exists(args[1]), _int
    return Plan([p.Exists(key) for key in args[1:]], _sum_of)  # a repeated key counts each time (Redis)


def cmd_touch(s: Session, args: list[bytes]) -> Any:
    if len(args) == 2:
        return p.Touch(args[1]), _int
    return Plan([p.Touch(key) for key in args[1:]], _sum_of)


_FLAGS = {b"NX": 1, b"XX": 2, b"GT": 4, b"LT": 8}
# The flags given → expire_if's ``when``: GT implies XX (a key without TTL is never "less" than it).
_WHEN = {0: p.EXPIRE_ALWAYS, 1: p.EXPIRE_NX, 2: p.EXPIRE_XX, 4: p.EXPIRE_GT, 6: p.EXPIRE_GT, 8: p.EXPIRE_LT,
         10: p.EXPIRE_XX_LT}


def _expire(command: str, scale: int, absolute: bool) -> Handler:
    def handler(s: Session, args: list[bytes]) -> Any:
        flags = 0  # Redis's parseExtendedExpireArgumentsOrReply: every option first, then conflicts
        for arg in args[3:]:
            flag = _FLAGS.get(arg.upper())
            if flag is None:
                return r.error(f"ERR Unsupported option {_text(arg)}")
            flags |= flag
        if flags & 1 and flags & 14:
            return r.error("ERR NX and XX, GT or LT options at the same time are not compatible")
        if flags & 4 and flags & 8:
            return r.error("ERR GT and LT options at the same time are not compatible")
        amount = _parse_int(args[2])
        if amount is None:
            return NOT_INT
        ms = amount * scale
        if absolute:
            ms -= _now_ms()
        if not -p.MAX_TTL_MS <= ms <= p.MAX_TTL_MS:
            return expire_error(command)
        return p.ExpireIf(args[1], ms, _WHEN[flags]), _int
    return handler


def cmd_ttl(s: Session, args: list[bytes]) -> Any:
    return p.Ttl(args[1]), _ttl_seconds


def cmd_pttl(s: Session, args: list[bytes]) -> Any:
    return p.Ttl(args[1]), _int


def cmd_expiretime(s: Session, args: list[bytes]) -> Any:
    return p.Ttl(args[1]), _expiretime(1000)


def cmd_pexpiretime(s: Session, args: list[bytes]) -> Any:
    return p.Ttl(args[1]), _expiretime(1)


def cmd_persist(s: Session, args: list[bytes]) -> Any:
    return p.Persist(args[1]), _int


def cmd_type(s: Session, args: list[bytes]) -> Any:
    return p.Exists(args[1]), _type


SCAN_SHARD_BITS = 10  # a SCAN cursor is worker_cursor << 10 | shard (MAX_SHARDS = 1024)


def cmd_scan(s: Session, args: list[bytes]) -> Any:
    if not args[1].isdigit() or len(args[1]) > 20 or int(args[1]) >= 1 << 64:  # unsigned 64-bit
        return r.error("ERR invalid cursor")
    cursor = int(args[1])
    count, match, kind = 10, None, None
    i = 2
    while i < len(args):
        opt = args[i].upper()
        if i + 1 >= len(args):
            return SYNTAX
        if opt == b"COUNT":
            count = _parse_int(args[i + 1])
            if count is None:
                return NOT_INT
            if count < 1:
                return SYNTAX
            count = min(count, 100_000)
        elif opt == b"MATCH":
            match = args[i + 1]
            if match == b"*":
                match = None
        elif opt == b"TYPE":
            kind = args[i + 1].lower()
        else:
            return SYNTAX
        i += 2
    shard = cursor & ((1 << SCAN_SHARD_BITS) - 1)
    worker_cursor = cursor >> SCAN_SHARD_BITS
    shards = s.server.shards()
    if shard >= shards or worker_cursor >= 1 << 48:  # the daemon shrank since this cursor was made
        return b"*2\r\n$1\r\n0\r\n*0\r\n"
    if kind is not None and kind != b"string":
        return b"*2\r\n$1\r\n0\r\n*0\r\n"  # every value is a string

    def convert(status: int, value: Any, resp3: bool) -> bytes:
        if status:
            return native_error(status, value)
        next_cursor, keys = value
        if next_cursor:
            following = next_cursor << SCAN_SHARD_BITS | shard
        else:
            following = 0 if shard + 1 >= s.server.shards() else shard + 1
        text = b"%d" % following
        return b"*2\r\n$%d\r\n%s\r\n%s" % (len(text), text, _array_of_bulks(0, keys, resp3))
    return p.Scan(shard, worker_cursor, count, match), convert


# --- server ----------------------------------------------------------------------------------------


def cmd_ping(s: Session, args: list[bytes]) -> Any:
    if len(args) == 1:
        return r.PONG
    if len(args) == 2:
        return r.bulk(args[1])
    return arity_error("ping")


def cmd_echo(s: Session, args: list[bytes]) -> Any:
    return r.bulk(args[1])


def cmd_select(s: Session, args: list[bytes]) -> Any:
    index = _parse_int(args[1])
    if index is None:
        return NOT_INT
    return r.OK if index == 0 else r.error("ERR DB index is out of range")


def cmd_quit(s: Session, args: list[bytes]) -> Any:
    s.closing = True
    return r.OK


def cmd_reset(s: Session, args: list[bytes]) -> Any:
    s.multi = None
    s.resp3 = False
    s.name = b""
    authenticated = not s.server.password
    s.user = "default" if authenticated else None
    s.admin = authenticated and not s.server.admin_password
    return b"+RESET\r\n"


def _login(s: Session, user: bytes, password: bytes) -> bool:
    ok = s.server.check_password(_text(user), password)
    if ok:
        s.user = _text(user)
        s.admin = s.user == "admin" or not s.server.admin_password
    return ok


def cmd_auth(s: Session, args: list[bytes]) -> Any:
    if len(args) == 2:
        if not s.server.password:
            return r.error("ERR AUTH <password> called without any password configured for the default user. "
                           "Are you sure your configuration is correct?")
        return r.OK if _login(s, b"default", args[1]) else WRONGPASS
    if len(args) == 3:
        return r.OK if _login(s, args[1], args[2]) else WRONGPASS
    return SYNTAX


def cmd_hello(s: Session, args: list[bytes]) -> Any:
    proto = None
    i = 1
    if len(args) > 1:
        proto = _parse_int(args[1])
        if proto is None:
            return r.error("ERR Protocol version is not an integer or out of range")
        if proto not in (2, 3):
            return r.error("NOPROTO unsupported protocol version")
        i = 2
    name = None
    while i < len(args):
        opt = args[i].upper()
        if opt == b"AUTH" and i + 2 < len(args):
            if not _login(s, args[i + 1], args[i + 2]):
                return WRONGPASS
            i += 3
        elif opt == b"SETNAME" and i + 1 < len(args):
            name = args[i + 1]
            if b" " in name or b"\n" in name:
                return r.error("ERR Client names cannot contain spaces, newlines or special characters.")
            i += 2
        else:
            return r.error(f"ERR Syntax error in HELLO option '{_text(args[i])}'")
    if s.user is None:
        return r.error("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO "
                       "<proto> AUTH <user> <pass> option can be used to authenticate the client and select the "
                       "RESP protocol version at the same time")
    if proto is not None:
        s.resp3 = proto == 3
    if name is not None:
        s.name = name
    return r.encode({"server": "redis", "version": REDIS_VERSION, "proto": 3 if s.resp3 else 2,
                     "id": s.client_id, "mode": "standalone", "role": "master", "modules": []}, s.resp3)


def cmd_client(s: Session, args: list[bytes]) -> Any:
    sub = args[1].upper()
    if sub == b"SETNAME" and len(args) == 3:
        name = args[2]
        if any(c <= 32 or c > 126 for c in name):
            return r.error("ERR Client names cannot contain spaces, newlines or special characters.")
        s.name = name
        return r.OK
    if sub == b"GETNAME" and len(args) == 2:
        return (r.NIL3 if s.resp3 else r.NIL2) if not s.name else r.bulk(s.name)
    if sub == b"ID" and len(args) == 2:
        return r.integer(s.client_id)
    if sub == b"SETINFO" and len(args) == 4:
        attr = args[2].upper()
        if attr == b"LIB-NAME":
            s.lib_name = args[3]
        elif attr == b"LIB-VER":
            s.lib_ver = args[3]
        else:
            return r.error(f"ERR Unrecognized option '{_text(args[2])}'")
        return r.OK
    if sub == b"INFO" and len(args) == 2:
        return r.verbatim(s.server.client_line(s) + "\n", s.resp3)
    if sub == b"LIST" and len(args) == 2:
        return r.verbatim("".join(line + "\n" for line in s.server.client_lines()), s.resp3)
    if sub == b"HELP":
        return r.encode(["CLIENT <subcommand> [<arg> ...]. Subcommands are:", "ID", "INFO", "LIST",
                         "GETNAME", "SETNAME <name>", "SETINFO <LIB-NAME|LIB-VER> <value>"], s.resp3)
    if sub in (b"SETNAME", b"GETNAME", b"ID", b"SETINFO", b"INFO", b"LIST"):
        return r.error(f"ERR wrong number of arguments for 'client|{_text(sub).lower()}' command")
    return unknown_subcommand("client", args[1])


def cmd_time(s: Session, args: list[bytes]) -> Any:
    now = time.time_ns() // 1000
    return r.encode([b"%d" % (now // 1_000_000), b"%d" % (now % 1_000_000)], s.resp3)


def cmd_dbsize(s: Session, args: list[bytes]) -> Any:
    def convert(status: int, value: Any, resp3: bool) -> bytes:
        if status:
            return native_error(status, value)
        return r.integer(value["total"]["keys"])
    return p.Stats(), convert


def cmd_flushall(s: Session, args: list[bytes]) -> Any:
    if len(args) > 2 or (len(args) == 2 and args[1].upper() not in (b"ASYNC", b"SYNC")):
        return SYNTAX
    return p.Flush(), _ok


def cmd_config(s: Session, args: list[bytes]) -> Any:
    sub = args[1].upper()
    if sub == b"GET" and len(args) >= 3:
        settings = s.server.redis_config()
        found: dict[str, str] = {}
        for pattern in args[2:]:
            pat = _text(pattern).lower()
            for name, value in settings.items():
                if fnmatch.fnmatchcase(name, pat):
                    found[name] = value
        return r.encode(found, s.resp3)
    if sub == b"SET" and len(args) >= 4:
        return r.error(f"ERR Unknown option or number of arguments for CONFIG SET - '{_text(args[2])}' "
                       f"(shardd: use `shardd tune`)")
    if sub == b"RESETSTAT" and len(args) == 2:
        return r.OK
    if sub == b"HELP":
        return r.encode(["CONFIG <subcommand> [<arg> ...]. Subcommands are:", "GET <pattern>"], s.resp3)
    if sub in (b"GET", b"SET"):
        return r.error(f"ERR wrong number of arguments for 'config|{_text(sub).lower()}' command")
    return unknown_subcommand("config", args[1])


def cmd_info(s: Session, args: list[bytes]) -> Any:
    wanted = {_text(a).lower() for a in args[1:]} or {"default"}

    def convert(status: int, value: Any, resp3: bool) -> bytes:
        if status:
            return native_error(status, value)
        return r.verbatim(s.server.info_text(value, wanted), resp3)
    return p.Stats(), convert


def cmd_command(s: Session, args: list[bytes]) -> Any:
    resp3 = s.resp3
    if len(args) == 1:
        return r.encode([_command_info(c) for c in COMMANDS.values()], resp3)
    sub = args[1].upper()
    if sub == b"COUNT" and len(args) == 2:
        return r.integer(len(COMMANDS))
    if sub == b"LIST":
        return r.encode([c.name for c in COMMANDS.values()], resp3)
    if sub == b"INFO":
        names = args[2:] or [c.name.encode() for c in COMMANDS.values()]
        return r.encode([_command_info(COMMANDS[n.lower()]) if n.lower() in COMMANDS else None for n in names], resp3)
    if sub == b"DOCS":
        names = [n.lower() for n in args[2:]] or list(COMMANDS)
        return r.encode({n: {"summary": COMMANDS[n].summary, "since": "1.0.0", "group": _group(COMMANDS[n])}
                         for n in names if n in COMMANDS}, resp3)
    if sub == b"GETKEYS" and len(args) >= 3:
        command = COMMANDS.get(args[2].lower())
        if command is None:
            return r.error("ERR Invalid command specified")
        words = args[2:]
        last = len(words) - 1 if command.last_key < 0 else command.last_key
        keys = words[command.first_key:last + 1:command.step] if command.first_key else []
        if not keys:
            return r.error("ERR The command has no key arguments")
        return r.encode(keys, resp3)
    if sub == b"HELP":
        return r.encode(["COMMAND <subcommand> [<arg> ...]. Subcommands are:", "(no subcommand)", "COUNT",
                         "LIST", "INFO [<command-name> ...]", "DOCS [<command-name> ...]", "GETKEYS <full-command>"],
                        resp3)
    return unknown_subcommand("command", args[1])


def _command_info(c: Command) -> list[Any]:
    return [c.name, c.arity, [r.Reply(r.simple(f)) for f in c.flags], c.first_key, c.last_key, c.step,
            [r.Reply(r.simple(f"@{_group(c)}"))], [], [], []]


def _group(c: Command) -> str:
    return "string" if "string" in c.flags else ("keyspace" if c.first_key else "server")


def _server_runs(s: Session, args: list[bytes]) -> Any:
    raise AssertionError("resp_server runs transactions itself")  # pragma: no cover


# --- the table -----------------------------------------------------------------------------------

_W, _R, _F = "write", "readonly", "fast"


def _c(name: str, arity: int, flags: str, keys: tuple[int, int, int], handler: Handler, summary: str,
       **extra: Any) -> Command:
    return Command(name, arity, tuple(flags.split()), *keys, handler, summary, **extra)


_NOKEYS = (0, 0, 0)
_KEY = (1, 1, 1)
_KEYS = (1, -1, 1)

COMMANDS: dict[bytes, Command] = {c.name.encode(): c for c in [
    _c("get", 2, "readonly fast string", _KEY, cmd_get, "Returns the string value of a key."),
    _c("set", -3, "write denyoom string", _KEY, cmd_set, "Sets the string value of a key, with options."),
    _c("setnx", 3, "write denyoom fast string", _KEY, cmd_setnx, "Sets a key's value only if it does not exist."),
    _c("setex", 4, "write denyoom string", _KEY, _setex("setex", 1000), "Sets a value and its TTL in seconds."),
    _c("psetex", 4, "write denyoom string", _KEY, _setex("psetex", 1), "Sets a value and its TTL in ms."),
    _c("getset", 3, "write denyoom fast string", _KEY, cmd_getset, "Sets a value, returning the previous one."),
    _c("getdel", 2, "write fast string", _KEY, cmd_getdel, "Returns a value and deletes the key."),
    _c("getex", -2, "write fast string", _KEY, cmd_getex, "Returns a value, setting or clearing its TTL."),
    _c("append", 3, "write denyoom fast string", _KEY, cmd_append, "Appends to a value; returns its length."),
    _c("strlen", 2, "readonly fast string", _KEY, cmd_strlen, "Returns the length of a value."),
    _c("mget", -2, "readonly fast string", _KEYS, cmd_mget, "Returns the values of several keys."),
    _c("mset", -3, "write denyoom string", (1, -1, 2), cmd_mset, "Sets several keys."),
    _c("msetnx", -3, "write denyoom string", (1, -1, 2), cmd_msetnx,
       "Sets several keys only if none exists (keys on one shard)."),
    _c("incr", 2, "write denyoom fast string", _KEY, cmd_incr, "Increments an integer value by one."),
    _c("incrby", 3, "write denyoom fast string", _KEY, cmd_incrby, "Increments an integer value."),
    _c("decr", 2, "write denyoom fast string", _KEY, cmd_decr, "Decrements an integer value by one."),
    _c("decrby", 3, "write denyoom fast string", _KEY, cmd_decrby, "Decrements an integer value."),
    _c("del", -2, "write", _KEYS, cmd_del, "Deletes keys; returns how many existed."),
    _c("unlink", -2, "write fast", _KEYS, cmd_del, "Deletes keys (as DEL: memory is freed at once)."),
    _c("exists", -2, "readonly fast", _KEYS, cmd_exists, "Counts the keys that exist."),
    _c("touch", -2, "readonly fast", _KEYS, cmd_touch, "Marks keys as accessed; returns how many exist."),
    _c("expire", -3, "write fast", _KEY, _expire("expire", 1000, False), "Sets a TTL in seconds."),
    _c("pexpire", -3, "write fast", _KEY, _expire("pexpire", 1, False), "Sets a TTL in ms."),
    _c("expireat", -3, "write fast", _KEY, _expire("expireat", 1000, True), "Sets an expiry as a Unix time."),
    _c("pexpireat", -3, "write fast", _KEY, _expire("pexpireat", 1, True), "Sets an expiry as a Unix time in ms."),
    _c("ttl", 2, "readonly fast", _KEY, cmd_ttl, "Returns the TTL in seconds."),
    _c("pttl", 2, "readonly fast", _KEY, cmd_pttl, "Returns the TTL in ms."),
    _c("expiretime", 2, "readonly fast", _KEY, cmd_expiretime, "Returns the expiry as a Unix time."),
    _c("pexpiretime", 2, "readonly fast", _KEY, cmd_pexpiretime, "Returns the expiry as a Unix time in ms."),
    _c("persist", 2, "write fast", _KEY, cmd_persist, "Removes a key's TTL."),
    _c("type", 2, "readonly fast", _KEY, cmd_type, "Returns the type of a key (always string or none)."),
    _c("scan", -2, "readonly", _NOKEYS, cmd_scan, "Iterates over the keys, shard by shard."),
    _c("dbsize", 1, "readonly fast", _NOKEYS, cmd_dbsize, "Returns the number of keys."),
    _c("flushall", -1, "write", _NOKEYS, cmd_flushall, "Removes every key.", admin=True),
    _c("flushdb", -1, "write", _NOKEYS, cmd_flushall, "Removes every key (there is one database).", admin=True),
    _c("ping", -1, "fast", _NOKEYS, cmd_ping, "Returns PONG, or the argument."),
    _c("echo", 2, "fast", _NOKEYS, cmd_echo, "Returns the argument."),
    _c("hello", -1, "noauth fast", _NOKEYS, cmd_hello, "Chooses RESP2 or RESP3, authenticates.", no_auth=True),
    _c("auth", -2, "noauth fast", _NOKEYS, cmd_auth, "Authenticates the connection.", no_auth=True),
    _c("select", 2, "fast", _NOKEYS, cmd_select, "Selects a database (only 0 exists)."),
    _c("quit", -1, "noauth fast", _NOKEYS, cmd_quit, "Closes the connection.", no_auth=True),
    _c("reset", 1, "noauth fast", _NOKEYS, cmd_reset, "Resets the connection's state.", no_auth=True),
    _c("client", -2, "", _NOKEYS, cmd_client, "Connection commands: ID, GETNAME, SETNAME, SETINFO, INFO, LIST."),
    _c("command", -1, "", _NOKEYS, cmd_command, "Describes the commands: COUNT, LIST, INFO, DOCS, GETKEYS."),
    _c("info", -1, "", _NOKEYS, cmd_info, "Returns information and statistics about the daemon."),
    _c("config", -2, "", _NOKEYS, cmd_config, "CONFIG GET maxmemory, maxmemory-policy."),
    _c("time", 1, "fast", _NOKEYS, cmd_time, "Returns the server time."),
    # Run by resp_server itself (queue-and-run transactions); their handlers are never called.
    _c("multi", 1, "noscript loading stale fast allow_busy", _NOKEYS, _server_runs, "Starts a transaction."),
    _c("exec", 1, "noscript loading stale skip_slowlog", _NOKEYS, _server_runs,
       "Runs the queued commands, in order (without isolation from other clients)."),
    _c("discard", 1, "noscript loading stale fast allow_busy", _NOKEYS, _server_runs, "Drops the queued commands."),
    _c("watch", -2, "noscript loading stale fast allow_busy", _KEYS, _server_runs, "Not supported (an error)."),
    _c("unwatch", 1, "noscript loading stale fast allow_busy", _NOKEYS, _server_runs, "Does nothing."),
]}

