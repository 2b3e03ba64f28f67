"""The router's sockets to its workers: how fast a restarted worker is found again."""

from __future__ import annotations

import zmq

from shardd import transport


def test_a_restarted_worker_is_retried_at_a_fixed_short_interval(tmp_path) -> None:
    # The supervisor restarts a killed worker at once; the router must find it within one
    # interval of its bind, not after an exponential backoff that had grown while it was down
    # (20 ms doubling to 200 ms took ~150 ms longer than the restart itself: bench/restart.py).
    ctx = zmq.Context()
    try:
        sock, monitor = transport.connect_shard_dealer(ctx, f"ipc://{tmp_path}/absent.ipc")
        assert sock.getsockopt(zmq.RECONNECT_IVL) == transport.SHARD_RECONNECT_MS <= 10
        assert sock.getsockopt(zmq.RECONNECT_IVL_MAX) == 0  # 0: no backoff, every retry after RECONNECT_IVL
        sock.close(0)
        monitor.close(0)
    finally:
        ctx.term()


def test_retiring_shard_sockets_never_stalls_the_context(tmp_path) -> None:
    # A shrink closes a shard's socket and its monitor, then the worker exits. If monitoring were
    # still on, libzmq's I/O thread could block forever sending that disconnect event, and every
    # other socket of the router would stop (seen: a router answering nothing after a shrink).
    ctx = zmq.Context()
    try:
        for i in range(50):
            worker = ctx.socket(zmq.ROUTER)
            worker.bind(f"ipc://{tmp_path}/w{i}.ipc")
            sock, monitor = transport.connect_shard_dealer(ctx, f"ipc://{tmp_path}/w{i}.ipc")
            assert monitor.poll(30_000), "no handshake"
            assert transport.read_monitor_event(monitor) == "up"
            transport.close_shard_dealer(sock, monitor)
            worker.close(0)  # the worker goes away after its link was retired
        probe_a, probe_b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        probe_a.bind(f"ipc://{tmp_path}/probe.ipc")
        probe_b.connect(f"ipc://{tmp_path}/probe.ipc")
        probe_b.send(b"alive")
        assert probe_a.poll(30_000) and probe_a.recv() == b"alive"  # 30 s: a hang, not a timing
        probe_a.close(0)
        probe_b.close(0)
    finally:
        ctx.term()
