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
