"""The supervisor: the ``shardd serve`` main process. It never serves a request.

Theory of operation
-------------------
``Arbiter.run`` prepares a private runtime directory for the ipc sockets, spawns one
worker per shard and then the router (``spawn`` start method: children get a picklable
Config and a shard id, and build everything else themselves), waits until a ping through
the router is answered by every shard, reports ready (a log line and ``READY=1`` to
systemd), then sleeps on its children's sentinels and a signal wake-up pipe.

Invariants:
1. Signal handlers only record the signal; the main loop dispatches to ``handle_<name>``.
2. A child that fails during boot stops the daemon (exit BOOT_FAILED); it is not retried.
3. A worker that dies while serving is respawned at once; its shard answers UNAVAILABLE
   meanwhile (the router sees the disconnect). Too many deaths of one shard within
   ``_CRASH_WINDOW`` stop the daemon (exit CHILD_FAILED) instead of looping forever.
4. If the router dies the daemon exits CHILD_FAILED, so systemd restarts it whole.
5. Stop order: router first (it stops accepting and drains what is in flight), then the
   workers; anything still alive at the deadline is killed. The runtime directory is
   removed if we created it. Exit 0 on a requested stop.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.resource_tracker
import os
import shutil
import signal
import stat
import tempfile
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.process import BaseProcess

import msgspec

from shardd import metrics, snapshot, systemd, transport
from shardd.client import Client
from shardd.config import Config
from shardd.errors import ExitCode, SharddError
from shardd.logs import setup_logging
from shardd.router import run_router
from shardd.worker import run_worker

log = logging.getLogger("shardd.supervisor")

_CRASH_LIMIT = 5          # deaths of one shard within the window before we give up
_CRASH_WINDOW = 60.0      # seconds
# Restart delay after the n-th death in the window: the first restart is immediate (a shard
# must serve again within a second), later ones back off so a crash loop does not spin.
_BACKOFF = (0.0, 0.1, 0.5, 1.0, 2.0)
# How often the supervisor checks every shard and refreshes STATUS= when systemd asked for
# no watchdog; with WatchdogSec it checks twice per watchdog period.
_HEALTH_INTERVAL = 5.0
# SIGUSR1 comes from the router: a resize needs workers started, or has ended.
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
# Settings a SIGHUP cannot change: they shape processes and sockets made at start-up.
RESTART_KEYS = frozenset({"bind", "shards", "runtime_dir", "pin_cpus", "enable_debug_ops", "metrics_bind", "direct",
                          "state_dir", "allow_remote_without_auth", "auth_dir"})


class Arbiter:
    """Spawns, watches and stops the router and the workers."""

    def __init__(self, config: Config, reload_config: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.raw_config = config  # as given, before the runtime dir and shard count are resolved
        self.reload_config = reload_config
        self.control: Client | None = None
        self.restart_at: dict[int, float] = {}
        self.watchdog = systemd.watchdog_interval()
        self.next_health_check = 0.0
        self.next_snapshot = float("inf")
        self.ready = False
        self.mp = multiprocessing.get_context("spawn")
        self.workers: dict[int, BaseProcess] = {}
        self.router: BaseProcess | None = None
        self.deaths: dict[int, deque[float]] = {}
        self.signals: deque[int] = deque()
        self.owns_runtime_dir = False
        self.metrics: metrics.MetricsServer | None = None

    # --- entry point --------------------------------------------------------------

    def run(self) -> int:
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
                self.control = Client(self.config.control_endpoint(), timeout=self._health_timeout())
                code = self.loop(wakeup_r)
        finally:
            if self.control is not None:
                self.control.close()
            self.stop()
            self.cleanup_runtime_dir()
            _stop_resource_tracker()
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
        for shard in range(cfg.shards):
            self.spawn_worker(shard)
        self.spawn_router()
        deadline = time.monotonic() + cfg.ready_timeout
        with Client(cfg.control_endpoint(), timeout=0.5) as client:
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
        if loading:
            snapshot.consume(cfg.state_dir)  # loaded: a later crash must not bring it back
        self.schedule_snapshot()
        self.metrics = metrics.start(cfg)  # /metrics (a thread here, never on the data path); None if off
        log.info("ready: %d shards behind %s (pid %d)", cfg.shards, cfg.bind, os.getpid())
        systemd.notify("READY=1", f"STATUS=serving {cfg.shards} shards on {cfg.bind}", f"MAINPID={os.getpid()}")
        return ExitCode.OK

    def spawn_worker(self, shard: int, config: Config | None = None) -> None:
        config = self.config if config is None else config
        proc = self.mp.Process(target=run_worker, args=(config, shard), name=f"shardd-worker-{shard}")
        proc.start()
        self.workers[shard] = proc

    def spawn_router(self) -> None:
        self.router = self.mp.Process(target=run_router, args=(self.config,), name="shardd-router")
        self.router.start()

    def dead_children(self) -> list[BaseProcess]:
        procs = [*self.workers.values(), *([self.router] if self.router else [])]
        return [proc for proc in procs if not proc.is_alive()]

    # --- serving --------------------------------------------------------------------

    def loop(self, wakeup_r: int) -> int:
        while True:
            sentinels = [proc.sentinel for proc in self.workers.values()]
            if self.router is not None:
                sentinels.append(self.router.sentinel)
            now = time.monotonic()
            wake_at = min([self.next_health_check, self.next_snapshot, *self.restart_at.values()])
            multiprocessing.connection.wait([*sentinels, wakeup_r], timeout=max(0.0, min(1.0, wake_at - now)))
            transport.drain_fd(wakeup_r)
            while self.signals:
                signum = self.signals.popleft()
                code = getattr(self, f"handle_{signal.Signals(signum).name.lower()}")()
                if code is not None:
                    return code
            code = self.reap_children()
            if code is not None:
                return code
            self.restart_due_workers()
            if time.monotonic() >= self.next_health_check:
                self.check_health()
            if time.monotonic() >= self.next_snapshot:
                self.take_snapshot()
                self.schedule_snapshot()

    def reap_children(self) -> int | None:
        if self.router is not None and not self.router.is_alive():
            log.error("router exited (exit code %s); stopping so the service manager restarts us",
                      self.router.exitcode)
            return ExitCode.CHILD_FAILED
        for shard, proc in list(self.workers.items()):
            if proc.is_alive():
                continue
            proc.join()
            now = time.monotonic()
            recent = self.deaths.setdefault(shard, deque())
            recent.append(now)
            while recent and now - recent[0] > _CRASH_WINDOW:
                recent.popleft()
            if len(recent) >= _CRASH_LIMIT:
                log.error("worker %d died %d times in %.0f s (last exit code %s); crash loop, stopping",
                          shard, len(recent), _CRASH_WINDOW, proc.exitcode)
                return ExitCode.CHILD_FAILED
            delay = _BACKOFF[min(len(recent), len(_BACKOFF)) - 1]
            log.warning("worker %d exited (exit code %s); restarting it%s", shard, proc.exitcode,
                        f" in {delay:g} s" if delay else "")
            del self.workers[shard]
            self.restart_at[shard] = now + delay
        return None

    def restart_due_workers(self) -> None:
        now = time.monotonic()
        for shard, due in list(self.restart_at.items()):
            if due <= now:
                del self.restart_at[shard]
                self.spawn_worker(shard)

    # --- health and systemd -----------------------------------------------------------

    def _health_timeout(self) -> float:
        return min(2.0, (self.watchdog or _HEALTH_INTERVAL) / 2)

    def check_health(self) -> bool:
        """Ask every shard through the router; tell systemd (STATUS=, and WATCHDOG=1 if all answered)."""
        self.next_health_check = time.monotonic() + (self.watchdog or _HEALTH_INTERVAL)
        assert self.control is not None
        try:
            stats = self.control.stats()
        except SharddError as exc:
            systemd.notify(f"STATUS=degraded: {exc}")
            log.warning("health check failed: %s", exc)
            return False
        rows = stats["shards"]
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

    def handle_sigusr1(self) -> None:
        """The router asks for a resize's workers, or reports the resize done (shardd.migration)."""
        assert self.control is not None
        try:
            topology = self.control.topology()
        except SharddError as exc:
            log.error("resize: cannot read the topology: %s", exc)
            return
        wanted = topology["pending_resize"]
        if wanted is not None:
            # Reconcile shard ids, not counts: a shard waiting to restart after a crash is still
            # ours (restart_due_workers brings it back), and a second copy of it would take over
            # its ipc socket.
            started = [shard for shard in range(wanted) if shard not in self.workers and shard not in self.restart_at]
            # A worker started for a resize joins the current layout: it owns no key until the
            # router's migrate (shardd.migration), and loads nothing from a snapshot.
            joining = msgspec.structs.replace(self.config, shards=topology["shards"])
            for shard in started:
                self.spawn_worker(shard, joining)
            self.config = msgspec.structs.replace(self.config, shards=max(wanted, self.config.shards))
            log.info("resize to %d shards: %s", wanted, f"started workers {started}" if started else "no new workers")
            try:
                self.control.resize_start(wanted)
            except SharddError as exc:
                log.error("resize: the router did not take the new workers: %s", exc)
        elif topology["resizing"] is None:
            shards = topology["shards"]
            self.config = msgspec.structs.replace(self.config, shards=shards)
            removed = [proc for shard, proc in self.workers.items() if shard >= shards]
            for shard in [s for s in self.workers if s >= shards]:
                del self.workers[shard]
                self.restart_at.pop(shard, None)
            _terminate(removed, time.monotonic() + self.config.stop_timeout)
            log.info("resize done: %d shards (epoch %d)%s", shards, topology["epoch"],
                     f"; stopped {len(removed)} removed worker(s)" if removed else "")

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
            assert self.control is not None
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
            with Client(cfg.control_endpoint(), timeout=cfg.snapshot_timeout) as control:
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
        for shard in range(self.config.shards):
            transport.remove_ipc_file(self.config.worker_endpoint(shard))
        transport.remove_ipc_file(self.config.control_endpoint())


def _terminate(procs: list[BaseProcess], deadline: float) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            log.warning("%s did not stop in time; killing it", proc.name)
            proc.kill()
            proc.join(5)


def _stop_resource_tracker() -> None:
    """Reap the helper process the ``spawn`` start method starts, so none outlives us.

    Left alone it notices our exit only a second or so later; under systemd that is a
    process still in the unit's cgroup after the main one exited.
    """
    tracker = multiprocessing.resource_tracker._resource_tracker
    stop = getattr(tracker, "_stop", None)
    if stop is not None:
        with contextlib.suppress(Exception):
            stop()


def serve(config: Config, reload_config: Callable[[], Config] | None = None) -> int:
    """Run the daemon in the foreground until stopped; returns the process exit code.

    ``reload_config`` re-reads the configuration (file and flags) on SIGHUP.
    """
    setup_logging(config.log_level, "supervisor")
    return Arbiter(config, reload_config).run()
