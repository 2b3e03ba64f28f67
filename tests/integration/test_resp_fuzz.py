"""Random and mutated RESP streams against a live daemon (2 shards), on many concurrent
connections with interleaved partial writes (bench/fuzz_resp.py; run that for longer).

After each batch: every daemon process is alive, the values written before the fuzz are intact
on both shards, a fresh client is served, and every fuzzed connection got exactly one reply per
command it sent (as the exact parser counts them) and nothing after a protocol error but the
close. The router's RSS after a large batch stays within 64 MiB of before it."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

from shardd.hashing import shard_for
from tests.conftest import free_port
from tests.resp_support import alive, router_process, wait_resp


def _fuzz_module() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "fuzz_resp.py"
    spec = importlib.util.spec_from_file_location("fuzz_resp", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_resp"] = module
    spec.loader.exec_module(module)
    return module


fuzz = _fuzz_module()


def test_fuzzed_streams_leave_the_daemon_healthy(make_daemon) -> None:
    port = free_port()
    d = make_daemon("--resp-bind", f"tcp://127.0.0.1:{port}", shards=2)
    wait_resp(port)
    keys = fuzz.known_keys()
    assert {shard_for(k, 2) for k in keys} == {0, 1}  # the known values live on both shards
    fuzz.write_known(port, keys)
    router = router_process(d, port)
    totals: dict[str, int] = {}
    for seed in range(30):
        counts = fuzz.run_batch(port, random.Random(seed), streams=48)
        assert alive(d), d.log()
        fuzz.check_health(port, keys)
        for name, value in counts.items():
            totals[name] = totals.get(name, 0) + value
    # Every kind of stream was exercised, not only the easy ones.
    assert totals["protocol_errors"] > 20 and totals["incomplete"] > 10 and totals["commands"] > 3000, totals
    # One large batch: the router's memory comes back within a generous bound.
    rss_before = router.memory_info().rss
    for seed in range(100, 104):
        fuzz.run_batch(port, random.Random(seed), streams=256)
        assert alive(d), d.log()
    fuzz.check_health(port, keys)
    rss_after = router.memory_info().rss
    assert rss_after - rss_before < 64 * 1024 * 1024, (rss_before, rss_after)
    print(f"fuzzed: {totals}")
