"""The RESP endpoint: Redis clients' TCP connections, served inside the router's poll loop.

Theory of operation
-------------------
``resp_bind`` adds a plain TCP listener to the router process. Each connection's bytes go to its
``RequestParser`` (shardd.resp); each command is checked (known, arity, authenticated, allowed)
and its handler (shardd.resp_commands) turns it into a reply at once or into native ops, which
``Router.submit`` places exactly as it places a native client's ops: same placement, same
batches to the workers, same maintenance, resize and BUSY rules. A shard's answer comes back to
the ``Call`` (or ``Part``) the op was queued with, which spells it in RESP.

Why the router's loop and not a gateway process per core (docs/resp.md, bench/resp.py): the
router already owns the shard links, batching, the resize re-routing and the gathers; a gateway
would need its own copy of all of it, and on this 2-core machine its extra process competes with
the workers for the same cores.

Rules
-----
Rule 1: replies leave in request order. Each command takes its place in its connection's queue
        (``calls``) when it is read; a reply that is ready waits for the ones before it.
Rule 2: one connection's memory is bounded: the parser bounds the request bytes it holds
        (resp.RequestParser, Rule 2), and a connection with more than ``MAX_PENDING`` commands
        unanswered or ``MAX_OUTPUT`` bytes unsent is not read until it drops below half: TCP
        then stops the client. A client that never reads costs at most that, never the daemon.
Rule 3: all socket writes happen once per poll pass (``flush``), one ``send`` per connection with
        every reply ready by then: one syscall for a whole pipeline's worth of replies.
Rule 4: nothing a client sends raises out of the loop: a handler that fails answers
        ``-ERR internal error`` and the connection goes on.
Rule 5: the endpoint never has more than ``budget`` (3/4 of mailbox_limit) ops in flight to the
        shards; commands past it wait, read but not run, in their connection's backlog (the
        connection is not read meanwhile). So its own pipelines never make a shard answer BUSY.
Rule 6: a connection whose ``barrier`` is up (in a worker: an op of it is in flight through the
        router, resp_worker Rule 1) runs no further command until it is down again.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import logging
import os
import select
import socket
import time
from collections import deque
from typing import Any

from shardd import __version__
from shardd import protocol as p
from shardd import resp as r
from shardd.config import Config
from shardd.resp_commands import (
    COMMANDS,
    NOAUTH,
    REDIS_VERSION,
    Command,
    Plan,
    Session,
    arity_error,
    unknown_command,
)

log = logging.getLogger("shardd.resp")

MAX_PENDING = 4096           # commands read but not yet answered, per connection (Rule 2)
MAX_OUTPUT = 4 * 1024 * 1024  # reply bytes not yet sent, per connection (Rule 2)
_READ_SIZE = 256 * 1024
_TRANSACTION = frozenset(("multi", "exec", "discard", "watch", "unwatch"))
_OUTSIDE_MULTI = frozenset(("multi", "exec", "discard", "watch", "quit", "reset"))  # run at once inside MULTI
_ACCEPT_PER_PASS = 64


class Call:
    """One command waiting for its reply; the router's target for a one-op command."""

    __slots__ = ("answers", "combine", "command", "conn", "out", "remaining")

    def __init__(self, conn: Connection, combine: Any, command: str = "") -> None:
        self.conn = conn
        self.command = command
        self.combine = combine  # (status, value, resp3) → bytes; for a Plan: (answers, resp3) → bytes
        self.out: bytes | None = None
        self.answers: list[Any] | None = None
        self.remaining = 0

    def answer(self, status: int, value: Any) -> None:
        conn = self.conn
        conn.server.inflight -= 1
        try:
            out = self.combine(status, value, conn.session.resp3)
        except Exception as exc:  # Rule 4: a bug spelling one reply must not stop the loop
            log.exception("resp: spelling the reply of %s failed", self.command or "a command")
            out = r.error(f"ERR internal error: {exc!r}")
        self.done(out)

    def done(self, out: bytes) -> None:
        self.out = out
        self.conn.ready(self)

    def answer_raw(self, frame: bytes) -> None:
        _answer_raw(self, frame)


class SubCall(Call):
    """One queued command of a MULTI ... EXEC: its reply is an element of EXEC's array."""

    __slots__ = ("index", "parent")

    def __init__(self, conn: Connection, combine: Any, command: str, parent: Call, index: int) -> None:
        super().__init__(conn, combine, command)
        self.parent = parent
        self.index = index

    def done(self, out: bytes) -> None:
        parent = self.parent
        parent.answers[self.index] = out  # type: ignore[index]
        parent.remaining -= 1
        if not parent.remaining:
            parent.done(b"*%d\r\n%s" % (len(parent.answers), b"".join(parent.answers)))  # type: ignore[arg-type]


class Part:
    """One op of a several-op command (Plan); the command's reply waits for all of them."""

    __slots__ = ("call", "conn", "index")

    def __init__(self, call: Call, index: int) -> None:
        self.call = call
        self.conn = call.conn
        self.index = index

    def answer(self, status: int, value: Any) -> None:
        call = self.call
        conn = call.conn
        conn.server.inflight -= 1
        call.answers[self.index] = (status, value)  # type: ignore[index]
        call.remaining -= 1
        if not call.remaining:
            try:
                out = call.combine(call.answers, conn.session.resp3)
            except Exception as exc:  # Rule 4
                log.exception("resp: spelling the reply of %s failed", call.command)
                out = r.error(f"ERR internal error: {exc!r}")
            call.done(out)

    def answer_raw(self, frame: bytes) -> None:
        _answer_raw(self, frame)


def _answer_raw(target: Call | Part, frame: bytes) -> None:
    """A shard's encoded reply, relayed by the router (send_to), as (status, value)."""
    try:
        reply = p.decode_reply(frame)
    except Exception:
        target.answer(p.INTERNAL_ERROR, "a shard sent an undecodable reply")
        return
    target.answer(reply.status, reply.value)


RESP_TARGETS = (Call, SubCall, Part)


class Connection:
    __slots__ = ("addr", "backlog", "barrier", "blocked", "calls", "closed", "deferred", "fd", "out", "out_bytes",
                 "parser", "paused", "peer_flight", "server", "session", "sock", "tail")

    def __init__(self, server: RespServer, sock: socket.socket, addr: str, client_id: int) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.addr = addr
        authenticated = not server.password
        self.session = Session(server, client_id, addr, authenticated)
        self.parser = r.RequestParser(server.max_bulk, authenticated=authenticated)
        self.calls: deque[Call] = deque()  # Rule 1: commands not yet answered, oldest first
        self.out: list[bytes] = []          # replies ready to send, in order
        self.out_bytes = 0
        self.backlog: list[list[bytes]] = []  # commands read but not run yet (Rules 5 and 6)
        self.barrier = 0  # ops of this connection in flight through the router (resp_worker, Rule 1)
        self.peer_flight = 0  # its ops on a worker's peer links (resp_worker)
        self.deferred: list[tuple[Any, Any]] = []  # its router-bound ops waiting for peer_flight 0
        self.tail: bytes | None = None  # a protocol error to answer once the backlog has run
        self.paused = False   # not read: too much pending (Rule 2), a backlog, or closing
        self.blocked = False  # its socket's send buffer is full: wait until writable
        self.closed = False

    def ready(self, call: Call) -> None:
        """A reply is ready: move every ready reply at the head of the queue to the output (Rule 1)."""
        calls = self.calls
        if call is not calls[0] if calls else True:
            return
        out = self.out
        server = self.server
        while calls and calls[0].out is not None:
            done = calls.popleft()
            data: bytes = done.out  # type: ignore[assignment]
            out.append(data)
            self.out_bytes += len(data)
            if data[0] == 45 and done.command:  # "-": an error from a shard's answer
                server.count_error(done.command)
        server.dirty.add(self)


class RespServer:
    """The listener, its connections and their counters; driven by router_main's loop."""

    def __init__(self, config: Config, router: Any, hub: Any, reuse_port: bool = False) -> None:
        self.config = config
        self.router = router
        self.hub = hub
        self.password = config.resp_password.encode()
        self.admin_password = config.resp_admin_password.encode()
        self.max_bulk = config.max_message_bytes
        self.max_clients = config.resp_max_clients
        self.conns: dict[int, Connection] = {}
        self.dirty: set[Connection] = set()
        self.next_id = 1
        self.started = time.monotonic()
        self.accepted = 0
        self.rejected = 0
        self.commands = 0
        self.errors = 0
        self.protocol_errors = 0
        self.calls_by_command: dict[str, int] = {}
        # Rule 5: ops submitted and not yet answered, over every connection, stay under the budget,
        # so that the endpoint's own pipelining never fills a shard's mailbox (BUSY is for overload
        # from elsewhere, and Redis never refuses a pipelined command). Past it, a connection's
        # remaining commands wait in its backlog, and the connection in ``stalled``, until answers
        # bring the count under half of it.
        self.inflight = 0
        self.budget = max(16, config.mailbox_limit * 3 // 4)
        self.stalled: deque[Connection] = deque()
        self.errors_by_command: dict[str, int] = {}
        self.listener = listen(config.resp_bind, reuse_port)
        self.port = self.listener.getsockname()[1]
        # The connections wait in an epoll set whose own fd is in the hub's poll: a pass then costs
        # one call for the ready ones, not a walk over every connection (zmq.Poller's cost is per fd).
        self.epoll = select.epoll()
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        hub.watch_fd(self.epoll.fileno(), self.on_epoll)

    def on_epoll(self) -> None:
        conns = self.conns
        listener = self.listener.fileno()
        for fd, _ in self.epoll.poll(0, 1024):
            conn = conns.get(fd)
            if conn is not None:
                self.on_event(conn)
            elif fd == listener:
                self.on_accept()

    def close(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn)
        self.listener.close()
        self.epoll.close()

    # --- connections -----------------------------------------------------------------------

    def on_accept(self) -> None:
        for _ in range(_ACCEPT_PER_PASS):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: the backlog waits; log, never crash
                log.warning("resp: accept failed: %s", exc)
                return
            if len(self.conns) >= self.max_clients:
                self.rejected += 1
                try:
                    sock.send(b"-ERR max number of clients reached\r\n")
                finally:
                    sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
            conn = Connection(self, sock, peer, self.next_id)
            self.next_id += 1
            self.accepted += 1
            self.conns[conn.fd] = conn
            self.epoll.register(conn.fd, select.EPOLLIN)

    def on_event(self, conn: Connection) -> None:
        """Readable or (when blocked) writable: the poll does not say which, so try what applies."""
        if conn.blocked:
            self.dirty.add(conn)
        if conn.paused or conn.closed:
            return
        try:
            data = conn.sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        self._serve(conn, data)

    def _serve(self, conn: Connection, data: bytes) -> None:
        """Parse what arrived and run it; then pause the connection if it is over its bounds (Rule 2)."""
        parser = conn.parser
        one_at_a_time = not parser.authenticated  # resp, Rule 3: feed(b"") gives the next one
        commands, problem = parser.feed(data)
        while commands:
            try:
                self._run(conn, commands)
            except Exception:  # Rule 4: a bug here must cost this connection, not the process
                log.exception("resp: internal error serving %s; closing the connection", conn.addr)
                self._close(conn)
                return
            if problem is not None or not one_at_a_time or conn.backlog or conn.session.closing:
                break
            one_at_a_time = not parser.authenticated
            commands, problem = parser.feed(b"")
        if problem is not None:
            self.protocol_errors += 1
            error = r.error(f"ERR {problem}")
            if conn.backlog:  # Rule 1: the error goes after the replies of the commands read before it
                conn.tail = error
            else:
                self._push(conn, error, "protocol")
                conn.session.closing = True
            self._pause(conn)
        elif conn.backlog or len(conn.calls) > MAX_PENDING or conn.out_bytes > MAX_OUTPUT:
            self._pause(conn)  # Rule 2 (and Rule 5: a backlog waits for the budget)

    def _run(self, conn: Connection, commands: list[list[bytes]]) -> None:
        """Run commands in order; past the in-flight budget the rest wait in the backlog (Rule 5)."""
        session = conn.session
        self.router.caller_is_admin = True  # the RESP endpoint checked its own users (_check)
        budget = self.budget
        for at, args in enumerate(commands):
            if session.closing:
                break
            if self.inflight >= budget or conn.barrier:  # Rules 5 and 6
                conn.backlog = commands[at:]
                self.stalled.append(conn)
                return
            if args:  # (both parsers drop empty commands; an empty one must not reach args[0])
                self._command(conn, args)
        if conn.backlog:
            conn.backlog = []
        if session.user is not None:  # resp, Rule 3: the parser's limits follow authentication
            conn.parser.authenticated = True

    def _check(self, conn: Connection, args: list[bytes]) -> tuple[Command | None, bytes | None]:
        """The command, or the error Redis answers before running anything (unknown, arity, auth)."""
        session = conn.session
        command = COMMANDS.get(args[0].lower())
        self.commands += 1
        if command is None:
            return None, unknown_command(args)
        text = command.name
        self.calls_by_command[text] = self.calls_by_command.get(text, 0) + 1
        arity = command.arity
        if (len(args) != arity) if arity > 0 else (len(args) < -arity):
            return command, arity_error(text)
        if session.user is None and not command.no_auth:
            return command, NOAUTH
        if command.admin and not session.admin:
            return command, r.error(f"NOPERM User {session.user} has no permissions to run the '{text}' command")
        return command, None

    def _command(self, conn: Connection, args: list[bytes]) -> None:
        command, problem = self._check(conn, args)
        session = conn.session
        text = command.name if command is not None else "unknown"
        if session.multi is not None and text not in _OUTSIDE_MULTI:  # queued for EXEC
            if problem is None:
                session.multi.append((command, args))
                self._push(conn, b"+QUEUED\r\n", text)
            else:
                session.multi_failed = True
                self._push(conn, problem, text)
            return
        if problem is not None:
            if text == "exec":  # Redis's execCommandAbort: the reason, without its "ERR "
                problem = b"-EXECABORT Transaction discarded because of: " + problem[1:].removeprefix(b"ERR ")
            self._push(conn, problem, text)
            return
        if text in _TRANSACTION:
            self._transaction(conn, text, args)
            return
        self._dispatch(conn, command, args, None)  # type: ignore[arg-type]

    def _dispatch(self, conn: Connection, command: Command, args: list[bytes], slot: tuple[Call, int] | None) -> None:
        """Run one checked command; its reply goes in the connection's queue, or into ``slot``
        (EXEC's array, at that index)."""
        text = command.name
        try:
            result = command.handler(conn.session, args)
        except Exception as exc:  # Rule 4
            log.exception("resp: %s failed", text)
            result = r.error(f"ERR internal error: {exc!r}")
        kind = type(result)
        if kind is bytes:
            if slot is None:
                self._push(conn, result, text)  # type: ignore[arg-type]
            else:
                SubCall(conn, None, text, *slot).done(result)  # type: ignore[arg-type]
            return
        if kind is tuple:
            op, combine = result
            ops = None
        else:
            plan: Plan = result
            op, combine, ops = None, plan.combine, plan.ops
        call = Call(conn, combine, text) if slot is None else SubCall(conn, combine, text, *slot)
        if slot is None:
            conn.calls.append(call)
        submit = self.router.submit
        if ops is None:
            self.inflight += 1
            submit(call, op)
            return
        call.answers = [None] * len(ops)
        call.remaining = len(ops)
        self.inflight += len(ops)
        for index, part_op in enumerate(ops):
            submit(Part(call, index), part_op)

    def _transaction(self, conn: Connection, text: str, args: list[bytes]) -> None:
        """MULTI / EXEC / DISCARD / WATCH / UNWATCH, as queue-and-run (docs/resp.md: no isolation)."""
        session = conn.session
        if text == "multi":
            if session.multi is not None:
                self._push(conn, r.error("ERR MULTI calls can not be nested"), text)
            else:
                session.multi, session.multi_failed = [], False
                self._push(conn, r.OK, text)
        elif text == "discard":
            if session.multi is None:
                self._push(conn, r.error("ERR DISCARD without MULTI"), text)
            else:
                session.multi = None
                self._push(conn, r.OK, text)
        elif text == "exec":
            queued, failed = session.multi, session.multi_failed
            session.multi = None
            if queued is None:
                self._push(conn, r.error("ERR EXEC without MULTI"), text)
            elif failed:
                self._push(conn, r.error("EXECABORT Transaction discarded because of previous errors."), text)
            elif not queued:
                self._push(conn, r.EMPTY_ARRAY, text)
            else:
                parent = Call(conn, None, text)
                parent.answers = [None] * len(queued)
                parent.remaining = len(queued)
                conn.calls.append(parent)
                for index, (command, queued_args) in enumerate(queued):
                    self._dispatch(conn, command, queued_args, (parent, index))
        elif text == "watch":
            self._push(conn, r.error("ERR WATCH inside MULTI is not allowed") if session.multi is not None
                       else r.error("ERR WATCH is not supported: MULTI/EXEC run without isolation here"), text)
        else:  # unwatch
            self._push(conn, r.OK, text)

    def count_error(self, command: str) -> None:
        self.errors += 1
        self.errors_by_command[command] = self.errors_by_command.get(command, 0) + 1

    def _push(self, conn: Connection, data: bytes, command: str = "") -> None:
        """A reply known at once: it still waits behind earlier ones (Rule 1)."""
        if data[0] == 45:  # "-": count errors answered here (a shard's are counted in Connection.ready)
            self.count_error(command or "unknown")
        if conn.calls:
            call = Call(conn, None)
            call.out = data
            conn.calls.append(call)
            return
        conn.out.append(data)
        conn.out_bytes += len(data)
        self.dirty.add(conn)

    def _pause(self, conn: Connection) -> None:
        if not conn.paused:
            conn.paused = True
            self._watch(conn)

    def _watch(self, conn: Connection) -> None:
        self.epoll.modify(conn.fd, (0 if conn.paused else select.EPOLLIN) | (select.EPOLLOUT if conn.blocked else 0))

    def flush(self) -> None:
        """Send every connection's ready replies: one send per connection per pass (Rule 3)."""
        stalled = self.stalled
        for _ in range(len(stalled)):  # Rules 5 and 6: backlogs run again, oldest first
            if self.inflight >= self.budget // 2:
                break
            conn = stalled.popleft()
            if conn.closed:
                continue
            if conn.barrier:
                stalled.append(conn)  # still waiting for the router
                continue
            backlog, conn.backlog = conn.backlog, []
            self._run(conn, backlog)
            if not conn.backlog and conn.tail is not None:  # a protocol error read after the backlog
                self._push(conn, conn.tail, "protocol")
                conn.tail = None
                conn.session.closing = True
            self.dirty.add(conn)  # (to be unpaused once its backlog is gone)
        if stalled:
            self.router.flush_outboxes()
        if not self.dirty:
            return
        dirty, self.dirty = self.dirty, set()
        for conn in dirty:
            if conn.closed:
                continue
            out = conn.out
            if out:
                data = out[0] if len(out) == 1 else b"".join(out)
                try:
                    sent = conn.sock.send(data)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    self._close(conn)
                    continue
                rest = data[sent:]
                if rest:
                    conn.out = [rest]
                    conn.out_bytes = len(rest)
                    if not conn.blocked:
                        conn.blocked = True
                        self._watch(conn)
                    continue
                out.clear()
                conn.out_bytes = 0
                if conn.blocked:
                    conn.blocked = False
                    self._watch(conn)
            if conn.session.closing:
                if not conn.calls:
                    self._close(conn)
            elif conn.paused and not conn.blocked and not conn.backlog and len(conn.calls) <= MAX_PENDING // 2:
                conn.paused = False
                self._watch(conn)

    def _close(self, conn: Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        conn.calls.clear()  # replies still on their way find a closed connection and are dropped
        self.conns.pop(conn.fd, None)
        self.dirty.discard(conn)
        with contextlib.suppress(OSError):
            self.epoll.unregister(conn.fd)
        with contextlib.suppress(OSError):
            conn.sock.close()

    # --- what commands read ---------------------------------------------------------------------

    def shards(self) -> int:
        return int(self.router.n)

    def check_password(self, user: str, password: bytes) -> bool:
        expected = {"default": self.password, "admin": self.admin_password}.get(user)
        if not expected:
            # The default user without a password is "nopass", as Redis's; admin needs one.
            return user == "default" and not self.password
        return hmac.compare_digest(expected, password)

    def redis_config(self) -> dict[str, str]:
        policy = self.router.config.eviction_policy
        return {"maxmemory": str(self.router.config.max_memory), "maxmemory-policy": policy,
                "save": "", "appendonly": "no", "databases": "1", "maxclients": str(self.max_clients),
                "port": str(self.port)}

    def client_line(self, s: Session) -> str:
        return (f"id={s.client_id} addr={s.peer} name={s.name.decode('utf-8', 'replace')} "
                f"age={int(time.monotonic() - s.created)} db=0 user={s.user or 'default'} "
                f"resp={3 if s.resp3 else 2} lib-name={s.lib_name.decode('utf-8', 'replace')} "
                f"lib-ver={s.lib_ver.decode('utf-8', 'replace')}")

    def client_lines(self) -> list[str]:
        return [self.client_line(conn.session) for conn in self.conns.values()]

    def stats(self) -> dict[str, Any]:
        return {"bind": self.config.resp_bind, "connections": len(self.conns), "accepted": self.accepted,
                "rejected": self.rejected, "commands": self.commands, "errors": self.errors,
                "protocol_errors": self.protocol_errors, "by_command": dict(self.calls_by_command),
                "errors_by_command": dict(self.errors_by_command)}

    def info_text(self, stats: dict[str, Any], wanted: set[str]) -> str:
        return info_text(stats, wanted, self)


def info_text(stats: dict[str, Any], wanted: set[str], server: RespServer) -> str:
    """INFO's sections from a combined ``stats`` answer (router_stats.combine_stats)."""
    total = stats.get("total", {})
    router = stats.get("router", {})
    resp = stats.get("resp") or {}  # every serving process's counters (router_stats.combine_resp)
    config = server.router.config
    uptime = int(time.monotonic() - server.started)
    sections: dict[str, list[tuple[str, Any]]] = {
        "server": [("redis_version", REDIS_VERSION), ("shardd_version", __version__), ("redis_mode", "standalone"),
                   ("os", f"{os.uname().sysname} {os.uname().release} {os.uname().machine}"), ("arch_bits", 64),
                   ("process_id", os.getpid()), ("tcp_port", server.port), ("uptime_in_seconds", uptime),
                   ("uptime_in_days", uptime // 86400)],
        "clients": [("connected_clients", resp.get("connections", len(server.conns))),
                    ("maxclients", server.max_clients), ("blocked_clients", 0)],
        "memory": [("used_memory", total.get("used_bytes", 0)),
                   ("used_memory_human", _human(total.get("used_bytes", 0))),
                   ("used_memory_rss", total.get("rss_bytes", 0)),
                   ("maxmemory", config.max_memory), ("maxmemory_human", _human(config.max_memory)),
                   ("maxmemory_policy", config.eviction_policy)],
        "stats": [("total_connections_received", resp.get("accepted", server.accepted)),
                  ("total_commands_processed", resp.get("commands", server.commands)),
                  ("instantaneous_ops_per_sec", int(total.get("ops_per_s", 0))),
                  ("rejected_connections", resp.get("rejected", server.rejected)),
                  ("expired_keys", total.get("expired", 0)), ("evicted_keys", total.get("evicted", 0)),
                  ("keyspace_hits", total.get("hits", 0)), ("keyspace_misses", total.get("misses", 0)),
                  ("total_error_replies", resp.get("errors", server.errors))],
        "cluster": [("cluster_enabled", 0)],  # (clients read it: redis-py's test harness does)
        "keyspace": ([("db0", f"keys={total.get('keys', 0)},expires={total.get('expiring', 0)},avg_ttl=0")]
                     if total.get("keys") else []),
        "shardd": [("shards", router.get("shards", len(stats.get("shards", [])))),
                   ("maintenance", int(bool(router.get("maintenance")))),
                   *[(f"shard{row.get('shard')}",
                      f"status={row.get('status')},keys={row.get('keys', 0)},used_bytes={row.get('used_bytes', 0)},"
                      f"ops_per_s={row.get('ops_per_s', 0)},hits={row.get('hits', 0)},misses={row.get('misses', 0)},"
                      f"evicted={row.get('evicted', 0)},mailbox={row.get('mailbox', 0)}")
                     for row in stats.get("shards", [])]],
    }
    if "commandstats" in wanted or "all" in wanted or "everything" in wanted:
        calls_by = resp.get("by_command", server.calls_by_command)
        errors_by = resp.get("errors_by_command", server.errors_by_command)
        sections["commandstats"] = [(f"cmdstat_{name}", f"calls={calls},failed_calls={errors_by.get(name, 0)}")
                                    for name, calls in sorted(calls_by.items())]
    if wanted & {"default", "all", "everything"}:
        names = [n for n in sections if n != "commandstats" or "default" not in wanted or len(wanted) > 1]
    else:
        names = [n for n in sections if n in wanted]
    lines = []
    for name in names:
        if lines:
            lines.append("")
        lines.append(f"# {name.capitalize() if name != 'commandstats' else 'Commandstats'}")
        lines.extend(f"{key}:{value}" for key, value in sections[name])
    return "\r\n".join(lines) + "\r\n"


def _human(n: int) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.2f}{unit}" if unit != "B" else f"{n}B"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def listen(endpoint: str, reuse_port: bool = False) -> socket.socket:
    """A non-blocking listening TCP socket on ``tcp://HOST:PORT`` (``reuse_port``: one of several
    processes' sockets on it, among which the kernel spreads the connections)."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host if host != "*" else "", int(port)))
        sock.listen(511)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno or errno.EINVAL, f"cannot bind resp_bind {endpoint}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock
