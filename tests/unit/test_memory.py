"""Calibration: the store's accounted bytes against what Python really allocates.

ENTRY_OVERHEAD is derived from sys.getsizeof (shardd/store.py). These tests check it the
other way round, with tracemalloc (every byte Python allocates for the entries) and with
the process's RSS, for small values and for values past pymalloc's 512-byte limit.
"""

from __future__ import annotations

import gc
import random
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from shardd.store import Store

REPO = Path(__file__).resolve().parent.parent.parent

N = 50_000


@pytest.mark.parametrize("size", [10, 100, 1000, 20_000])
def test_accounted_bytes_match_what_the_store_holds(size: int) -> None:
    """Records live in mmap'd segments, which tracemalloc does not see: what the store holds is
    the Python memory it allocated (index, TTL array, values kept aside) plus the bytes written
    into its segments."""
    n = N if size < 10_000 else 500
    rng = random.Random(size)
    values = [rng.randbytes(size) for _ in range(n)]
    keys = [b"key:%d" % i for i in range(n)]
    gc.collect()
    tracemalloc.start()
    try:
        store = Store(lambda: 0, random.Random(1))
        base = tracemalloc.get_traced_memory()[0]
        for k, v in zip(keys, values, strict=True):
            store.set(k, v)
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    if size >= 10_000:  # kept aside: the values' bytes objects were allocated before tracing
        traced += sum(sys.getsizeof(v) for v in values)
    real = traced + store.arena_bytes
    ratio = store.used_bytes / real
    assert 0.85 <= ratio <= 1.15, (store.used_bytes / n, real / n)


_RSS_SCRIPT = """
import gc, random, sys, psutil
from shardd.memory import tune_allocator
from shardd.store import Store
tune_allocator()
rng = random.Random(9)
sizes = [int(a) for a in sys.argv[1:]]
proc = psutil.Process()
gc.collect()
before = proc.memory_info().rss
store = Store(lambda: 0, random.Random(1))
for i in range(100_000):
    store.set(b"key:%d" % i, rng.randbytes(rng.choice(sizes)))
print(store.used_bytes, proc.memory_info().rss - before)
"""


@pytest.mark.parametrize("sizes", [("100",), ("50", "200", "3000")])
def test_accounted_bytes_track_process_rss(sizes: tuple[str, ...]) -> None:
    """In a fresh interpreter (freed memory from other tests would hide the growth)."""
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, *sizes], capture_output=True, text=True,
                         timeout=60, cwd=REPO, check=True).stdout.split()
    used, grown = int(out[0]), int(out[1])
    # RSS also counts the allocator's partly used pools and arenas: within 20%.
    assert 0.8 <= used / grown <= 1.2, (used, grown)
