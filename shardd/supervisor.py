"""The supervisor: the ``shardd serve`` main process. It never serves a request.

Theory of operation
-------------------
``shardd serve`` parses its flags and checks the config, then becomes (exec, same pid) a fresh
interpreter that runs ``main`` here: the daemon's main process carries none of the CLI's
modules. It imports none of the roles' either: a child is named by its entry function
("module:function") and comes from the forkserver (shardd.process), which alone imports them.

``Arbiter.run`` prepares a private runtime directory for the ipc sockets, starts the workers
(through ``manage_workers``) and then the router, each a :class:`shardd.process.Child`
(children get a picklable Config and a shard id, and build everything else themselves),
waits until a ping through the router is answered by every shard, reports ready (a log line
and ``READY=1`` to systemd), then sleeps on its children's sentinels, a signal wake-up pipe
and its next timer (restart backoff, health check, snapshot).

``manage_workers`` is the one reconcile step (gunicorn's ``manage_workers``): from the wanted
shard ids, ``range(max(config.shards, target))``, to the running workers. It reaps workers
that exited (deciding restart, crash loop or boot failure), starts every wanted shard that is
neither running nor waiting out its restart backoff (``restart_at``), and stops running shards
that are no longer wanted. Boot, crash restarts and both ends of a resize all go through it.

SIGUSR1 comes from the router, which cannot start processes, at two moments of a resize
(shardd.migration). The signal carries no meaning of its own: ``handle_sigusr1`` reads the
router's topology and the phase it shows decides what happens:
- ``pending_resize`` set: a client asked for M shards. ``target`` becomes M, the reconcile
  starts shards N..M-1, and ``resize_start(M)`` tells the router they are there.
- ``resizing`` set: keys are moving; nothing for the supervisor (a late or repeated signal).
- neither: no resize (any more). ``config.shards`` becomes the router's shard count,
  ``target`` is cleared, and the reconcile stops the workers of removed shards.

Invariants:
1. Signal handlers only record the signal; the main loop dispatches to ``handle_<name>``.
2. A child that fails during boot stops the daemon (exit BOOT_FAILED); it is not retried. So
   does a restarted worker that exits BOOT_FAILED, or exits by itself (code > 0) before the
   supervisor saw it serve (``Child.ready``, from the health check, polled every
   ``_READY_POLL`` until then): its start-up failed (e.g. its ipc path became unusable) and a
   retry would fail the same way. One line names it. A worker killed by a signal is a crash.
3. A worker that dies while serving is restarted after ``_BACKOFF`` (at once the first time);
   its shard answers UNAVAILABLE meanwhile (the router sees the disconnect). ``_CRASH_LIMIT``
   deaths of one shard within ``_CRASH_WINDOW`` stop the daemon (exit CHILD_FAILED).
4. At most one worker per shard id runs or waits to restart: a second copy would take over
   the first one's ipc socket.
5. Every worker starts with ``config.shards`` = the router's current shard count, so a worker
   started for a resize owns no key until the router's ``migrate`` (and a restarted one joins
   the layout in force); the router tells each worker the rest.
6. If the router dies the daemon exits CHILD_FAILED, so systemd restarts it whole.
7. Stop order: router first (it stops accepting and drains what is in flight), then the
   workers; anything still alive at the deadline is killed; the forkserver goes last. The
   runtime directory is removed if we created it. Exit 0 on a requested stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NoReturn

import msgspec

from shardd import process, snapshot, systemd, transport
from shardd.config import RESTART_KEYS, Config, load_config  # RESTART_KEYS: settings a SIGHUP cannot change
from shardd.control import ControlClient
from shardd.errors import ConfigError, ExitCode, SharddError
from shardd.logs import setup_logging
from shardd.process import Child

log = logging.getLogger("shardd.supervisor")

_CRASH_LIMIT = 5          # deaths of one shard within the window before we give up
_CRASH_WINDOW = 60.0      # seconds
# Restart delay after the n-th death in the window: the first restart is immediate (a shard
# must serve again within a second), later ones back off so a crash loop does not spin.
_BACKOFF = (0.0, 0.1, 0.5, 1.0, 2.0)
# How often the supervisor checks every shard and refreshes STATUS= when systemd asked for
# no watchdog; with WatchdogSec it checks twice per watchdog period.
_HEALTH_INTERVAL = 5.0
# How often the health check runs while a restarted worker has not been seen serving yet: the
# sooner it is marked ready, the smaller the window in which a crash counts as a failed start.
_READY_POLL = 0.1
# SIGUSR1 comes from the router: a resize changed phase (see the theory of operation).
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
# The roles' entry functions, by name: the supervisor never imports a role's modules. The
# forkserver imports them once for every child (shardd.process): _PRELOAD is all they import.
_WORKER = "shardd.worker:run_worker"
_ROUTER = "shardd.router:run_router"
# Cluster mode only; not preloaded: it imports the etcd client (grpc), which no other role needs.
_AGENT = "shardd.cluster_agent:run_agent"
_PRELOAD = ("shardd.worker", "shardd.router_main")


class Arbiter:
    """Spawns, watches and stops the router and the workers.

    ``process`` makes a child (``Child``'s signature) and ``clock`` is the monotonic clock the
    restart backoff reads: collaborators, so the reconcile step runs in tests without processes.
    """

    def __init__(self, config: Config, reload_config: Callable[[], Config] | None = None, *,
                 process: Callable[..., Child] = Child, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.raw_config = config  # as given, before the runtime dir and shard count are resolved
        self.reload_config = reload_config
        self.process = process
        self.clock = clock
        self.control: Any = None  # the router's control endpoint (a ControlClient) once serving
        self.target: int | None = None  # the shard count a resize is going to, while one is under way
        self.restart_at: dict[int, float] = {}
        self.watchdog = systemd.watchdog_interval()
        self.next_health_check = 0.0
        self.next_snapshot = float("inf")
        self.ready = False
        self.workers: dict[int, Child] = {}
        self.router: Child | None = None
        self.agent: Child | None = None  # the cluster agent (cluster mode), started once we serve
        self.agent_restart_at: float | None = None
        self.deaths: dict[int, deque[float]] = {}
        self.signals: deque[int] = deque()
        self.owns_runtime_dir = False
        self.metrics: Any = None  # the /metrics server (shardd.metrics), when metrics_bind is set

    # --- entry point --------------------------------------------------------------

    def run(self) -> int:
        # First, while this process is single-threaded and holds nothing: the forkserver is a
        # fork of it, so every process of the daemon shares one interpreter (shardd.process).
        process.preload(*_PRELOAD)
        process.start_forkserver()
        try:
            return self._run()
        finally:
            process.stop_forkserver()

    def _run(self) -> int:
        if self.config.auth_dir:
            try:
                transport.ServerAuth(self.config.auth_dir)
            except (OSError, ValueError) as exc:
                log.error("auth_dir %s is not usable (%s); create it with: shardd keys generate %s",
                          self.config.auth_dir, exc, self.config.auth_dir)
                return ExitCode.CONFIG
        wakeup_r = self._install_signals()
        try:
            self.prepare_runtime_dir()
        except OSError as exc:
            log.error("cannot create runtime directory: %s", exc)
            return ExitCode.BOOT_FAILED
        try:
            code = self.boot()
            if code == ExitCode.OK and not self.signals:
                self.control = ControlClient(self.config.control_endpoint(), timeout=self._health_timeout())
                code = self.loop(wakeup_r)
        finally:
            if self.control is not None:
                self.control.close()
            self.stop()
            self.cleanup_runtime_dir()
        return code

    # --- boot ---------------------------------------------------------------------

    def prepare_runtime_dir(self) -> None:
        cfg = self.config
        path = cfg.runtime_dir or os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
        if path:
            os.makedirs(path, mode=0o700, exist_ok=True)
            # The ipc sockets inside accept any local process that can reach them: a directory
            # others may write to would let them replace a socket file with their own.
            if os.stat(path).st_mode & stat.S_IWOTH:
                raise OSError(f"{path} is writable by other users; use a private directory (mode 0700)")
        else:
            path = tempfile.mkdtemp(prefix="shardd-")  # mode 0700
            self.owns_runtime_dir = True
        state = cfg.state_dir or os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        if state:
            os.makedirs(state, mode=0o700, exist_ok=True)
        self.config = msgspec.structs.replace(cfg, runtime_dir=path, shards=cfg.shard_count(), state_dir=state)

    def boot(self) -> int:
        cfg = self.config
        # Workers load the current snapshot generation while they start (shardd.snapshot).
        loading = bool(cfg.state_dir) and snapshot.current(cfg.state_dir) is not None
        self.manage_workers()  # nothing runs yet: starts one worker per shard
        self.spawn_router()
        deadline = time.monotonic() + cfg.ready_timeout
        with ControlClient(cfg.control_endpoint(), timeout=0.5) as client:
            while True:
                failed = self.dead_children()
                if failed:
                    log.error("%s exited during start-up (exit code %s); stopping",
                              failed[0].name, failed[0].exitcode)
                    return ExitCode.BOOT_FAILED
                if self.signals:
                    return ExitCode.OK
                try:
                    client.ping()
                    break
                except SharddError:
                    pass
                if time.monotonic() > deadline:
                    log.error("not every shard answered within ready_timeout (%ss); stopping", cfg.ready_timeout)
                    return ExitCode.BOOT_FAILED
                time.sleep(0.05)
        self.ready = True
        for child in self.children():
            child.ready = True
        if loading:
            snapshot.consume(cfg.state_dir)  # loaded: a later crash must not bring it back
        self.schedule_snapshot()
        if cfg.metrics_address() is not None:  # (prometheus_client is loaded only then)
            from shardd import metrics

            self.metrics = metrics.start(cfg)  # /metrics (a thread here, never on the data path); None if off
        if cfg.clustered:
            self.spawn_agent()
        log.info("ready: %d shards behind %s (pid %d)", cfg.shards, cfg.bind, os.getpid())
        systemd.notify("READY=1", f"STATUS=serving {cfg.shards} shards on {cfg.bind}", f"MAINPID={os.getpid()}")
        return ExitCode.OK

    def spawn_worker(self, shard: int) -> None:
        child = self.process(f"shardd-worker-{shard}", _WORKER, (self.config, shard), shard)
        child.start()
        self.workers[shard] = child
        if self.ready:  # a restart or a resize: watch for it to serve (check_health marks it ready)
            self.next_health_check = min(self.next_health_check, time.monotonic() + _READY_POLL)

    def spawn_router(self) -> None:
        self.router = self.process("shardd-router", _ROUTER, (self.config,))
        self.router.start()

    def spawn_agent(self) -> None:
        self.agent = self.process("shardd-cluster-agent", _AGENT, (self.config,))
        self.agent.start()
        self.agent_restart_at = None

    def children(self) -> list[Child]:
        return [*self.workers.values(), *([self.router] if self.router else []), *([self.agent] if self.agent else [])]

    def dead_children(self) -> list[Child]:
        return [child for child in self.children() if not child.is_alive()]

    # --- serving --------------------------------------------------------------------

    def loop(self, wakeup_r: int) -> int:
        while True:
            sentinels = [child.sentinel for child in self.children()]
            wake_at = min([self.next_health_check, self.next_snapshot, *self.restart_at.values(),
                           *([self.agent_restart_at] if self.agent_restart_at is not None else [])])
            timeout = max(0.0, min(1.0, wake_at - self.clock()))
            process.wait([*sentinels, wakeup_r], timeout)
            transport.drain_fd(wakeup_r)
            while self.signals:
                signum = self.signals.popleft()
                code = getattr(self, f"handle_{signal.Signals(signum).name.lower()}")()
                if code is not None:
                    return code
            code = self.manage_workers()
            if code is not None:
                return code
            if time.monotonic() >= self.next_health_check:
                self.check_health()
            if time.monotonic() >= self.next_snapshot:
                self.take_snapshot()
                self.schedule_snapshot()

    def wanted(self) -> range:
        """The shard ids that should have a worker: the current ones, and a resize's new ones."""
        return range(max(self.config.shards, self.target or 0))

    def manage_workers(self) -> int | None:
        """The reconcile step: reap, start what is wanted and missing, stop what is not wanted.

        Returns the exit code if the daemon must stop (see the invariants), else None.
        """
        code = self.reap_children()
        if code is not None:
            return code
        now, wanted = self.clock(), self.wanted()
        for shard in wanted:
            if shard not in self.workers and self.restart_at.get(shard, now) <= now:
                self.restart_at.pop(shard, None)
                self.spawn_worker(shard)
        for shard in [shard for shard in self.restart_at if shard not in wanted]:
            del self.restart_at[shard]
        removed = [self.workers.pop(shard) for shard in sorted(self.workers) if shard not in wanted]
        if removed:
            _terminate(removed, time.monotonic() + self.config.stop_timeout)
            log.info("stopped %d removed worker(s): shard(s) %s", len(removed), [child.shard for child in removed])
        return None

    def reap_children(self) -> int | None:
        """Forget exited workers and schedule their restart; the exit code if that is a stop."""
        code = process.reap_forkserver()
        if code is not None:  # (nothing is lost: the next worker start makes another)
            log.warning("the forkserver exited (exit code %s); a worker that starts next will make another", code)
        if self.router is not None and not self.router.is_alive():
            log.error("router exited (exit code %s); stopping so the service manager restarts us",
                      self.router.exitcode)
            return ExitCode.CHILD_FAILED
        code = self.reap_agent()
        if code is not None:
            return code
        wanted = self.wanted()
        for shard, child in list(self.workers.items()):
            if child.is_alive():
                continue
            child.join()
            del self.workers[shard]
            if shard not in wanted:
                continue  # a removed shard's worker: it was on its way out
            code = child.exitcode or 0
            if code == ExitCode.BOOT_FAILED or (code > 0 and not child.ready):
                # It ended itself before it served: its start-up failed, and would again.
                log.error("worker %d could not start (exit code %d; its reason is logged above); stopping, "
                          "as a restart would fail the same way", shard, code)
                return ExitCode.BOOT_FAILED
            now = self.clock()
            recent = self.deaths.setdefault(shard, deque())
            recent.append(now)
            while recent and now - recent[0] > _CRASH_WINDOW:
                recent.popleft()
            if len(recent) >= _CRASH_LIMIT:
                log.error("worker %d died %d times in %.0f s (last exit code %s); crash loop, stopping",
                          shard, len(recent), _CRASH_WINDOW, child.exitcode)
                return ExitCode.CHILD_FAILED
            delay = _BACKOFF[min(len(recent), len(_BACKOFF)) - 1]
            log.warning("worker %d exited%s (exit code %s); restarting it%s", shard,
                        "" if child.ready else " before it was ready", child.exitcode,
                        f" in {delay:g} s" if delay else "")
            self.restart_at[shard] = now + delay
        return None

    def reap_agent(self) -> int | None:
        """The cluster agent is restarted after a death (its node serves nothing meanwhile: its
        lease lapses); one that cannot start (no etcd client, bad settings) stops the daemon."""
        agent = self.agent
        if agent is not None and not agent.is_alive():
            agent.join()
            self.agent = None
            if agent.exitcode == ExitCode.CONFIG:
                log.error("the cluster agent cannot run (its reason is logged above); stopping")
                return ExitCode.CONFIG
            log.warning("cluster agent exited (exit code %s); restarting it in 1 s", agent.exitcode)
            self.agent_restart_at = self.clock() + 1.0
        if self.agent is None and self.agent_restart_at is not None and self.clock() >= self.agent_restart_at:
            self.spawn_agent()
        return None

    # --- health and systemd -----------------------------------------------------------

    def _health_timeout(self) -> float:
        return min(2.0, (self.watchdog or _HEALTH_INTERVAL) / 2)

    def check_health(self) -> bool:
        """Ask every shard through the router; tell systemd (STATUS=, and WATCHDOG=1 if all answered)."""
        self.next_health_check = time.monotonic() + (self.watchdog or _HEALTH_INTERVAL)
        try:
            stats = self.control.stats()
        except SharddError as exc:
            systemd.notify(f"STATUS=degraded: {exc}")
            log.warning("health check failed: %s", exc)
            return False
        rows = stats["shards"]
        for row in rows:  # a restarted worker is ready once the router has it up
            child = self.workers.get(row["shard"])
            if child is not None and row.get("status") == "up" and row.get("pid") == child.pid:
                child.ready = True
        if not all(child.ready for child in self.workers.values()):
            self.next_health_check = time.monotonic() + _READY_POLL
        down = [row["shard"] for row in rows if row.get("status") != "up"]
        keys = sum(row.get("keys", 0) for row in rows)
        if down:
            systemd.notify(f"STATUS=degraded: shard(s) {', '.join(map(str, down))} down; {keys} keys")
            return False
        states = [f"STATUS=serving {len(rows)} shards, {keys} keys on {self.config.bind}"]
        if self.watchdog:
            states.append("WATCHDOG=1")
        systemd.notify(*states)
        return True

    # --- signals --------------------------------------------------------------------

    def _install_signals(self) -> int:
        return transport.signal_wakeup_pipe(_SIGNALS, lambda signum, frame: self.signals.append(signum))

    def handle_sigterm(self) -> int:
        log.info("SIGTERM: stopping")
        return ExitCode.OK

    def handle_sigint(self) -> int:
        log.info("SIGINT: stopping")
        return ExitCode.OK

    def handle_sighup(self) -> None:
        systemd.notify("RELOADING=1", systemd.monotonic_usec())
        try:
            self.reload()
        finally:
            systemd.notify("READY=1")

    def handle_sigusr1(self) -> int | None:
        """The router's resize changed phase: read which from its topology, then reconcile."""
        try:
            topology = self.control.topology()
        except SharddError as exc:
            log.error("resize: cannot read the topology: %s", exc)
            return None
        return self.follow_resize(topology)

    def follow_resize(self, topology: dict[str, Any]) -> int | None:
        """Set the wanted shards from the phase ``topology`` shows (see the theory of operation)."""
        pending, shards = topology["pending_resize"], topology["shards"]
        if pending is not None:
            # New workers join the current layout (invariant 5); shard ids still running or
            # waiting out a restart are not started again (invariant 4).
            self.config = msgspec.structs.replace(self.config, shards=shards)
            self.target = pending
            before = set(self.workers)
            code = self.manage_workers()
            if code is not None:
                return code
            started = sorted(set(self.workers) - before)
            log.info("resize to %d shards: %s", pending, f"started workers {started}" if started else "no new workers")
            try:
                self.control.resize_start(pending)
            except SharddError as exc:
                log.error("resize: the router did not take the new workers: %s", exc)
        elif topology["resizing"] is None:
            log.info("resize done: %d shards (epoch %d)", shards, topology["epoch"])
            self.config = msgspec.structs.replace(self.config, shards=shards)
            self.target = None
            return self.manage_workers()
        return None

    def reload(self) -> None:
        """Re-read the config; apply what can change live, log what needs a restart."""
        if self.reload_config is None:
            log.info("SIGHUP: no configuration source to re-read; nothing changed")
            return
        try:
            new = self.reload_config()
        except SharddError as exc:
            log.error("SIGHUP: configuration not reloaded, keeping the running one: %s", exc)
            return
        old = msgspec.structs.asdict(self.raw_config)
        changed = {k: v for k, v in msgspec.structs.asdict(new).items() if old[k] != v}
        needs_restart = sorted(k for k in changed if k in RESTART_KEYS)
        live = {k: v for k, v in changed.items() if k not in RESTART_KEYS}
        if needs_restart:
            log.warning("SIGHUP: %s changed but only take effect after a restart", ", ".join(needs_restart))
        if not live:
            log.info("SIGHUP: no live setting changed")
            return
        if "log_level" in live:
            logging.getLogger().setLevel(live["log_level"].upper())
        try:
            self.control.configure(live)
        except SharddError as exc:
            log.error("SIGHUP: could not apply %s to every shard: %s", ", ".join(sorted(live)), exc)
            return
        self.raw_config = msgspec.structs.replace(self.raw_config, **live)
        self.config = msgspec.structs.replace(self.config, **live)
        if "snapshot_interval" in live:
            self.schedule_snapshot()
        log.info("SIGHUP: applied %s", ", ".join(f"{k}={v!r}" for k, v in sorted(live.items())))

    # --- stop -----------------------------------------------------------------------

    def schedule_snapshot(self) -> None:
        cfg = self.config
        periodic = cfg.snapshot_interval and cfg.state_dir
        self.next_snapshot = time.monotonic() + cfg.snapshot_interval if periodic else float("inf")

    def take_snapshot(self, drain: bool = False) -> bool:
        """Have every shard write a new snapshot generation, then make it current.

        With ``drain`` the router first stops taking client requests and answers what is in
        flight, so no write acknowledged to a client is missing from the snapshot.
        """
        cfg = self.config
        started = time.monotonic()
        generation = snapshot.new_generation(cfg.state_dir)
        try:
            with ControlClient(cfg.control_endpoint(), timeout=cfg.snapshot_timeout) as control:
                if drain:
                    control.drain()
                results = control.snapshot(generation)
            snapshot.commit(cfg.state_dir, generation)
        except (SharddError, OSError) as exc:
            shutil.rmtree(generation, ignore_errors=True)
            log.error("snapshot failed, the previous one (if any) stays current: %s", exc)
            return False
        keys = sum(r["keys"] for r in results)
        size = sum(r["bytes"] for r in results)
        log.info("snapshot %s: %d keys, %d bytes, %.3f s", os.path.basename(generation), keys, size,
                 time.monotonic() - started)
        return True

    def stop(self) -> None:
        """Snapshot if configured, then router, then workers; kill whatever outlives ``stop_timeout``."""
        systemd.notify("STOPPING=1")
        if self.metrics is not None:
            self.metrics.close()
        cfg = self.config
        if self.agent is not None and self.agent.is_alive():
            # Cluster mode: the agent hands this node's slots to the other members first (SIGTERM
            # is its "leave"); the node keeps serving them until each is handed over.
            log.info("leaving the cluster (up to cluster_leave_timeout = %g s)", cfg.cluster_leave_timeout)
            _terminate([self.agent], time.monotonic() + cfg.cluster_leave_timeout + 5)
        if (cfg.snapshot_on_stop and cfg.state_dir and self.ready and self.router is not None
                and self.router.is_alive()):
            self.take_snapshot(drain=True)
        deadline = time.monotonic() + self.config.stop_timeout
        if self.router is not None:
            _terminate([self.router], deadline)
        _terminate(list(self.workers.values()), deadline)

    def cleanup_runtime_dir(self) -> None:
        path = self.config.runtime_dir
        if not path:
            return
        if self.owns_runtime_dir:
            shutil.rmtree(path, ignore_errors=True)
            return
        # (suppress: a path someone made unusable, e.g. a directory, must not turn a stop into a crash)
        for endpoint in [*map(self.config.worker_endpoint, self.wanted()), self.config.control_endpoint()]:
            with contextlib.suppress(OSError):
                transport.remove_ipc_file(endpoint)


def _terminate(procs: list[Child], deadline: float) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            log.warning("%s did not stop in time; killing it", proc.name)
            proc.kill()
            proc.join(5)


def main(request: str) -> NoReturn:
    """Entry of the supervisor's own interpreter, which ``shardd serve`` becomes once its flags are parsed.

    ``request`` is JSON: {"config": the config file or null, "overrides": the flags}. Both are
    read again here, and again on SIGHUP. A failure is one line on stderr and an exit code, as
    from the CLI.
    """
    process.set_name("shardd")  # as the console script was called, not "python3"
    import json  # (not msgspec.json: a path may hold surrogate escapes, which JSON carries as \udcXX)

    args = json.loads(request)
    path, overrides = args["config"], args["overrides"]
    try:
        config = load_config(path, overrides)
        code = serve(config, lambda: load_config(path, overrides))
    except ConfigError as exc:  # (the file changed since the CLI read it)
        print(f"shardd: {exc}", file=sys.stderr)
        code = ExitCode.CONFIG
    except Exception as exc:  # a bug: still one line, with the way to see more
        if os.environ.get("SHARDD_DEBUG"):
            raise
        print(f"shardd: unexpected error: {type(exc).__name__}: {exc} (SHARDD_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        code = ExitCode.FAILURE
    sys.exit(code)


def serve(config: Config, reload_config: Callable[[], Config] | None = None) -> int:
    """Run the daemon in the foreground until stopped; returns the process exit code.

    ``reload_config`` re-reads the configuration (file and flags) on SIGHUP.
    """
    setup_logging(config.log_level, "supervisor")
    return Arbiter(config, reload_config).run()
