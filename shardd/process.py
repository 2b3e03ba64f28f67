"""One child process of the supervisor, router or worker, as an object (uvicorn's ``Process``).

Owns: how a role's entry function comes to run in a process of its own, and the verbs the
supervisor uses on it (``start``, ``is_alive``, ``terminate``, ``kill``, ``join``) with what
it reads back (``pid``, ``exitcode``, ``sentinel``, ``ready``).

Theory of operation
-------------------
Children come from a *forkserver* (docs/design.md, decision 3), a helper process that forks one child
per request. The supervisor makes it first thing (``start_forkserver``), by forking itself
while it is still single-threaded and holds no Context, socket or signal handler: the
forkserver is the supervisor's freshly started interpreter and nothing else. It imports the
roles' modules (``preload``), moves everything out of the cyclic GC's reach (``gc.freeze``:
no collection then writes to those pages) and waits for requests. So one copy of the
interpreter, msgspec, zmq, asyncio and shardd's modules serves every process of the daemon,
shared copy-on-write: what a fresh interpreter per child (``spawn``) paid once per process is
paid about once in all (bench/footprint.py). A restarted worker runs the code the router
runs, even if the installed package changed on disk meanwhile. A forkserver started later
(the first one died) cannot be a fork of a supervisor that has threads: it is a fresh
interpreter, with the supervisor's flags and ``sys.path``.

Each child is forked twice, forkserver → intermediate → child, and the intermediate exits at
once: the child is re-parented to the supervisor, which made itself a child subreaper
(prctl(2) ``PR_SET_CHILD_SUBREAPER``). So the supervisor is every child's parent, as with
``spawn``: it reaps them with ``waitpid`` and reads their exit status, and ``os.getppid()`` in
the router names it (the router signals it that way). The forkserver reports a child's pid
only after it reaped the intermediate, when the child is the supervisor's already.

``SHARDD_START_METHOD=spawn`` starts every child as a fresh interpreter instead (nothing
shared, no forkserver); it is also the fallback where the supervisor cannot be a subreaper.
No resource tracker runs in either case: multiprocessing is not used, nothing here needs one.

Invariants:
1. A child is handed only its entry function's name ("module:function") and arguments (a
   Config and a shard id), pickled through a pipe or the socketpair between the supervisor and
   its forkserver, which no other process can reach. It builds everything else itself:
   ZeroMQ Context, sockets, CPU pinning, logging.
2. The forkserver is single-threaded, holds no resource but its socket and never runs a
   role's code; a child gets nothing from it but imported modules. It never imports the
   CLI's modules (the supervisor it came from runs without them: shardd.supervisor.main),
   nor prometheus_client (imported after boot, and only with metrics on).
3. The entry function's return value is the child's exit code, so a worker that cannot start
   exits ``ExitCode.BOOT_FAILED`` and the supervisor can tell that from a crash. An exception
   is exit code 1 after its traceback on stderr; death by a signal is ``-signum``.
4. A child's ``sentinel`` is the read end of a pipe whose write end only that child holds: it
   becomes readable when the child exits, on any kernel.
5. ``ready`` is False until the supervisor has seen the child serve (the router answered for
   it); only the supervisor sets it.

This module imports nothing of shardd, so a child started here imports no more than its role.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import math
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
import weakref
from collections.abc import Iterable
from typing import Any, NoReturn

_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
_LENGTH = struct.Struct("!I")
_PID = struct.Struct("!i")
# Bound on one answer of the forkserver (its first one includes importing the preload modules).
_FORKSERVER_TIMEOUT = 60.0

# What the forkserver imports before its first fork (``preload``).
_preload: list[str] = []


def preload(*modules: str) -> None:
    """Have the forkserver import ``modules`` before it forks anything (call before the first start)."""
    _preload.extend(m for m in modules if m not in _preload)


def start_method() -> str:
    """"forkserver" (the default) or "spawn" (``SHARDD_START_METHOD=spawn``)."""
    return "spawn" if os.environ.get("SHARDD_START_METHOD") == "spawn" else "forkserver"


def set_name(name: str) -> None:
    """Name this process for ``ps -o comm``, ``top`` and ``pgrep`` (Linux keeps 15 bytes)."""
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write(name[:15])


class Child:
    """A router or worker process. ``shard`` is None for the router.

    ``target`` is the entry function or its "module:function" name; the supervisor passes the
    name, so it need not import the role's modules itself.
    """

    def __init__(self, name: str, target: Any, args: tuple[Any, ...], shard: int | None = None) -> None:
        self.name = name
        self.shard = shard
        self.ready = False
        self.target = target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"
        self.args = args
        self.pid: int | None = None
        self.exitcode: int | None = None
        self.sentinel = -1

    def start(self) -> None:
        r, w = os.pipe()
        weakref.finalize(self, os.close, r)
        self.sentinel = r
        request = (self.name, self.target, self.args)
        try:
            if start_method() == "forkserver" and _forkserver.usable():
                self.pid = _forkserver.fork(request, w)
            else:
                self.pid = _spawn(request, w)
        finally:
            os.close(w)

    def is_alive(self) -> bool:
        """False once it exited; the first call that sees it exited reaps it and sets ``exitcode``."""
        if self.pid is None or self.exitcode is not None:
            return False
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # someone else reaped it (never expected): the sentinel still tells
            if not _readable(self.sentinel, 0):
                return True
            self.exitcode = 255
            return False
        if pid == 0:
            return True
        self.exitcode = os.waitstatus_to_exitcode(status)
        return False

    def join(self, timeout: float | None = None) -> None:
        if self.is_alive() and _readable(self.sentinel, timeout):
            with contextlib.suppress(ChildProcessError):
                _, status = os.waitpid(self.pid, 0)  # it is exiting: its last fd is closed
                self.exitcode = os.waitstatus_to_exitcode(status)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        if self.pid is not None and self.exitcode is None:  # never a reaped pid: it may be reused
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)


def wait(fds: Iterable[int], timeout: float | None) -> list[int]:
    """Those of ``fds`` that are readable (a child's sentinel once it exited), after waiting up to
    ``timeout`` seconds for one (None: no limit).

    poll(2), not select(2): a daemon of hundreds of shards has fds past select's 1024.
    """
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll(None if timeout is None else math.ceil(max(0.0, timeout) * 1000))]


def _readable(fd: int, timeout: float | None) -> bool:
    return bool(wait([fd], timeout))


# A fresh interpreter's whole program. What it runs, and this interpreter's sys.path, come in
# $SHARDD_BOOT (JSON), so its command line stays short: ps shows what follows.
_BOOT = ("import json, os, sys; boot = json.loads(os.environ.pop('SHARDD_BOOT')); sys.path[:] = boot['path']; "
         "from shardd.process import _boot; _boot(*boot['call'])")


def _fresh(entry: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """argv (before what ps should show) and environment of a fresh interpreter, with this one's
    flags and ``sys.path``, that calls ``entry`` ("module:function") with ``args``."""
    import json

    argv = [sys.executable, *subprocess._args_from_interpreter_flags(), "-c", _BOOT]
    return argv, {**os.environ, "SHARDD_BOOT": json.dumps({"path": sys.path, "call": [entry, *args]})}


def _boot(entry: str, *args: str) -> None:
    module, _, function = entry.partition(":")
    getattr(importlib.import_module(module), function)(*args)


def replace_with(entry: str, *args: str) -> NoReturn:
    """Become a fresh interpreter that calls ``entry(*args)`` (``_fresh``): same pid, fds and
    environment, and the same command line after ``python -c ...``."""
    argv, env = _fresh(entry, *args)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os.execve(argv[0], [*argv, *sys.argv], env)


def _exec(role: str, entry: str, args: tuple[str, ...], pass_fds: tuple[int, ...]) -> int:
    """Start a fresh interpreter that calls ``entry(*args)``, with ``pass_fds`` open in it and stdin
    on /dev/null; its pid. ``role`` is its command line, for ps.

    ``os.posix_spawn`` and not ``subprocess.Popen``: a Popen reaps its process by itself
    (subprocess's clean-up of Popen objects that were collected), taking the exit status from us.
    """
    argv, env = _fresh(entry, *args)
    for fd in pass_fds:
        os.set_inheritable(fd, True)
    try:
        return os.posix_spawn(argv[0], [*argv, role], env,
                              file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)])
    finally:
        for fd in pass_fds:
            os.set_inheritable(fd, False)


# --- spawn: one fresh interpreter per child ------------------------------------------------


def _spawn(request: tuple[str, str, tuple[Any, ...]], sentinel: int) -> int:
    r, w = os.pipe()
    try:
        pid = _exec(request[0], "shardd.process:_spawned", (str(r),), (r, sentinel))
    finally:
        os.close(r)
    with os.fdopen(w, "wb") as pipe:
        pipe.write(pickle.dumps(request, pickle.HIGHEST_PROTOCOL))
    return pid


def _spawned(fd: str) -> NoReturn:
    """Entry of a spawned child (it inherited its sentinel's write end): read what to run, run it."""
    with os.fdopen(int(fd), "rb") as pipe:
        name, target, args = pickle.load(pipe)
    _run(name, target, args)


# --- forkserver --------------------------------------------------------------------------


class _Forkserver:
    """The supervisor's end: starts the forkserver (``start_forkserver``, or again on the first
    request after it died) and asks it for children."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.pid: int | None = None
        self.subreaper: bool | None = None

    def usable(self) -> bool:
        """Whether children can come from a forkserver: this process must be their subreaper."""
        if self.subreaper is None:
            try:
                import ctypes

                libc = ctypes.CDLL(None, use_errno=True)
                self.subreaper = libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
            except (OSError, AttributeError):
                self.subreaper = False
        return self.subreaper

    def fork(self, request: tuple[str, str, tuple[Any, ...]], sentinel: int) -> int:
        """A child that runs ``request``; ``sentinel`` is the write end it alone will hold."""
        payload = pickle.dumps(request, pickle.HIGHEST_PROTOCOL)
        try:
            return self._ask(payload, sentinel)
        except (OSError, EOFError):
            self.close()  # it died, was killed or hangs: start another, once
        return self._ask(payload, sentinel)

    def _ask(self, payload: bytes, sentinel: int) -> int:
        sock = self.sock or self._start()
        socket.send_fds(sock, [_LENGTH.pack(len(payload)) + payload], [sentinel])
        (pid,) = _PID.unpack(_recv_exactly(sock, _PID.size))
        if pid <= 0:
            raise OSError(-pid, f"the forkserver could not fork: {os.strerror(-pid)}")
        return pid

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair()
        try:
            if _single_threaded():
                self.pid = _fork_forkserver(ours, theirs)
            else:  # a fork of a process with threads is unsafe: a fresh interpreter, then
                self.pid = _exec("shardd-forkserver", "shardd.process:_serve_forks", (str(theirs.fileno()), *_preload),
                                 (theirs.fileno(),))
        finally:
            theirs.close()
        ours.settimeout(_FORKSERVER_TIMEOUT)
        self.sock = ours
        return ours

    def reap(self) -> int | None:
        """If the forkserver exited, reap and forget it (the next child starts another): its exit code."""
        if self.pid is None:
            return None
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 255 << 8
        if pid == 0:
            return None
        self.pid = None
        self.close()
        return os.waitstatus_to_exitcode(status)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the forkserver (it exits when its socket closes) and reap it."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.pid is not None:
            pid, self.pid = self.pid, None
            _reap(pid, timeout)


_forkserver = _Forkserver()


def start_forkserver() -> None:
    """Start the forkserver now, if children are to come from one.

    The supervisor calls this first, while it is single-threaded and holds no resource, so the
    forkserver is a fork of it and shares its pages (see the theory of operation).
    """
    if start_method() == "forkserver" and _forkserver.usable() and _forkserver.sock is None:
        _forkserver._start()


def reap_forkserver() -> int | None:
    """Reap the forkserver if it died (killed: it exits only when told); its exit code, else None."""
    return _forkserver.reap()


def stop_forkserver() -> None:
    """Stop the forkserver, if one was started (the supervisor, last thing before it exits)."""
    _forkserver.close()


def _single_threaded() -> bool:
    """Whether this process has one thread (ZeroMQ's I/O threads included, unlike threading's count)."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _fork_forkserver(ours: socket.socket, theirs: socket.socket) -> int:
    """Fork this (single-threaded) process into the forkserver; its pid."""
    gc.freeze()  # our own collections must not write to the pages we now share either
    pid = os.fork()
    if pid == 0:
        try:
            ours.close()
            null = os.open(os.devnull, os.O_RDONLY)  # stdin, as a fresh interpreter gets it from _exec
            os.dup2(null, 0)
            os.close(null)
            _serve_forks(str(theirs.fileno()), *_preload)
        finally:
            os._exit(0)  # never the supervisor's atexit handlers or finalizers
    return pid


def _reap(pid: int, timeout: float) -> None:
    """Wait up to ``timeout`` for ``pid`` to exit, then kill it; reap it either way."""
    with contextlib.suppress(ChildProcessError):
        deadline = time.monotonic() + timeout
        while not os.waitpid(pid, os.WNOHANG)[0]:
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return
            time.sleep(0.01)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _serve_forks(fd: str, *modules: str) -> None:
    """Entry of the forkserver: import the preload modules, then fork a child per request.

    It exits when the supervisor closes its end of the socket (or dies).
    """
    set_name("shardd-forksrv")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which stops us
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception:  # the child that needs it imports it again, and exits saying why it cannot
            traceback.print_exc()
    sock = socket.socket(fileno=int(fd))
    while True:
        try:
            first, fds, _, _ = socket.recv_fds(sock, 65536, 1)
            if not first or not fds:
                return
            (length,) = _LENGTH.unpack(first[:_LENGTH.size])
            payload = first[_LENGTH.size:]
            if len(payload) < length:
                payload += _recv_exactly(sock, length - len(payload))
        except (OSError, EOFError, struct.error):
            return
        try:
            gc.freeze()  # what exists now is shared with the child: no collection of it writes to it
            pid = _fork_child(pickle.loads(payload), sock)
        except OSError as exc:
            pid = -(exc.errno or 1)
        finally:
            os.close(fds[0])  # only the child holds its sentinel's write end
        try:
            sock.sendall(_PID.pack(pid))
        except OSError:
            return


def _fork_child(request: tuple[str, str, tuple[Any, ...]], sock: socket.socket) -> int:
    """Fork the child through an intermediate that exits at once: the child's pid, once it is the supervisor's."""
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:  # the intermediate
        try:
            sock.close()
            os.close(r)
            pid = os.fork()
            if pid == 0:
                os.close(w)
                signal.signal(signal.SIGINT, signal.default_int_handler)  # as a fresh interpreter has it
                _run(*request)
            os.write(w, _PID.pack(pid))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        data = pipe.read(_PID.size)
    os.waitpid(middle, 0)  # it exited, so the child has been re-parented to the supervisor
    if len(data) != _PID.size:
        raise OSError(0, "the intermediate process died before it forked")
    return _PID.unpack(data)[0]


def _run(name: str, target: str, args: tuple[Any, ...]) -> NoReturn:
    """Run in the child: the role's entry function; its return value becomes the exit code."""
    code = 1
    try:
        set_name(name)
        module, _, function = target.partition(":")
        code = getattr(importlib.import_module(module), function)(*args) or 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
