"""The router process: signals, the transport hub, and the poll loop that drives ``Router``.

Everything here is wiring: which inbox or channel wakes which Router method, and what runs
each pass (timers: gather deadlines, the balance check, drains, the resize's progress,
retiring links). The routing logic is shardd.router, testable without this file.

Invariants: the Router only ever sees the transport's inboxes and channels (no sockets); a
poll pass never blocks longer than 20 ms while a gather has a deadline, 100 ms while stopping.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable

from shardd import transport
from shardd.config import Config
from shardd.errors import ExitCode
from shardd.logs import setup_logging
from shardd.resp_server import RespServer
from shardd.router import Router
from shardd.shard_link import ShardLink

log = logging.getLogger("shardd.router")


def serve(config: Config) -> int:
    """Serve the public endpoint until SIGTERM (``shardd.router.run_router``).

    On SIGTERM the router answers requests that still arrive with UNAVAILABLE, waits until every shard has answered what
    was in flight (bounded by ``stop_timeout``), and exits 0.
    """
    setup_logging(config.log_level, "router")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor orders the stop
    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    wakeup = transport.signal_wakeup_pipe([signal.SIGTERM], on_term)
    hub = transport.Hub(transport.ServerAuth(config.auth_dir) if config.auth_dir else None)
    public = [config.bind]
    try:
        def connect(shard: int) -> transport.ShardChannel:
            return hub.shard_channel(config.worker_endpoint(shard))

        links = [ShardLink(shard, connect(shard)) for shard in range(config.shards)]
        try:
            frontend = hub.public_inbox(public, config.max_message_bytes)
            control = hub.public_inbox([config.control_endpoint()], config.max_message_bytes,
                                       transport.PRIVATE_IPC_MODE, secure=False)
        except transport.BindError as exc:
            log.error("%s", exc)
            return ExitCode.BOOT_FAILED
        router = Router(config, frontend, links, control, connect)
        router.admin_ids = hub.admin_ids
        if config.resp_bind and config.resp_front == "router":
            try:
                router.resp = RespServer(config, router, hub)
            except OSError as exc:
                log.error("%s", exc.strerror or exc)
                return ExitCode.BOOT_FAILED
            log.info("RESP (Redis protocol) endpoint on %s", config.resp_bind)
        log.info("listening on %s for %d shards", config.bind, config.shards)
        try:
            _serve(router, hub, wakeup, lambda: stopping)
        finally:
            if router.resp is not None:
                router.resp.close()
    finally:
        for endpoint in [*public, config.control_endpoint()]:
            transport.remove_ipc_file(endpoint)
        hub.close()  # every socket, including shards added or removed by a resize
    log.info("stopped")
    return ExitCode.OK


def _serve(router: Router, hub: transport.Hub, wakeup: int, should_stop: Callable[[], bool]) -> None:
    hub.watch(router.frontend, router.on_frontend)
    hub.watch(router.control, router.on_control)
    hub.watch_fd(wakeup, lambda: transport.drain_fd(wakeup))

    def watch(link: ShardLink) -> None:
        hub.watch(link.channel, lambda: router.on_shard(link), lambda event: router.on_shard_event(link, event))

    for link in router.links:
        watch(link)
    router.on_new_link = watch  # type: ignore[method-assign]
    router.on_removed_link = lambda link: hub.unwatch(link.channel)  # type: ignore[method-assign]
    deadline = None
    resp = router.resp
    while True:
        if deadline is None and should_stop():
            router.draining = True
            deadline = time.monotonic() + router.config.stop_timeout * 0.6
            # Unbinding would also drop the connections accepted on the endpoint, and with them the
            # replies we still owe; so connections stay, and new requests get UNAVAILABLE.
            log.info("stopping: refusing new requests; answering what is in flight")
        if deadline is not None and (router.idle() or time.monotonic() >= deadline):
            if not router.idle():
                log.warning("stop timeout: %d shard(s) still had requests in flight",
                            sum(1 for link in router.links if link.pending))
            return
        timeout = 100 if deadline is not None else 1000
        if router.timed:
            timeout = 20  # a health gather's deadline needs a clock, not only socket events
        hub.poll(timeout)
        if resp is not None:  # this pass's Redis commands go to the shards in one batch each, then
            router.flush_outboxes()  # the replies that are ready go out, one send per connection
            resp.flush()
        router.check_balance(time.monotonic())
        if router.timed:
            router.expire_gathers(time.monotonic())
            router.flush_outboxes()
        router.answer_drained()
        if router.resize is not None:
            router.advance_resize()
        if router.retiring:
            router.retire_links()
