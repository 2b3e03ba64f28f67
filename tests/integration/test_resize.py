"""Online resize under concurrent load from several client processes (router mode).

Each load process owns its keys, so it knows the last value it had acknowledged for each and
can check every read exactly; INCR counters are shared by all processes and checked at the end.
"""

from __future__ import annotations

import multiprocessing
import random
import time

import pytest

from shardd.client import Client
from shardd.errors import SharddError
from tests.helpers import run_cli

COUNTERS = [f"ctr:{i}" for i in range(4)]


def _load(endpoint: str, worker: int, stop, progress, out, direct: bool = False) -> None:
    rng = random.Random(worker)
    mine = [f"own:{worker}:{i}" for i in range(150)]
    expected: dict[str, bytes | None] = {}
    errors: list[str] = []
    incrs = 0
    ops = 0
    with Client(endpoint, timeout=5, direct=direct) as c:
        c.set_many({key: b"0" for key in mine})
        expected.update({key: b"0" for key in mine})
        c.set(f"ttl:{worker}", b"t", ttl=3600)
        while not stop.is_set():
            key = rng.choice(mine)
            action = rng.random()
            try:
                if action < 0.35:
                    value = str(ops).encode()
                    assert c.set(key, value) is True
                    expected[key] = value
                elif action < 0.45:
                    c.delete(key)
                    expected[key] = None
                elif action < 0.55:
                    found = c.gets(key)
                    if (found[0] if found else None) != expected[key]:
                        errors.append(f"gets {key}: {found!r}, expected {expected[key]!r}")
                    elif found is not None:
                        value = f"cas{ops}".encode()
                        if c.cas(key, value, found[1]) is not True:
                            errors.append(f"cas {key} with its current version failed")
                        else:
                            expected[key] = value
                elif action < 0.65:
                    c.incr(COUNTERS[ops % len(COUNTERS)])
                    incrs += 1
                elif action < 0.75:
                    batch = rng.sample(mine, 10)
                    got = c.get_many(batch)
                    for k in batch:
                        if got.get(k) != expected[k]:
                            errors.append(f"get_many {k}: {got.get(k)!r}, expected {expected[k]!r}")
                elif action < 0.8:
                    batch = rng.sample(mine, 5)
                    c.set_many({k: f"m{ops}".encode() for k in batch})
                    expected.update({k: f"m{ops}".encode() for k in batch})
                else:
                    got = c.get(key)
                    if got != expected[key]:
                        errors.append(f"get {key}: {got!r}, expected {expected[key]!r}")
            except (SharddError, AssertionError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            ops += 1
            progress.value = ops
        ttl = c.ttl(f"ttl:{worker}")
    out.put({"worker": worker, "expected": expected, "errors": errors, "incrs": incrs, "ops": ops, "ttl": ttl})


def _run_resizes(d, sizes: list[int], procs: int = 3, direct: bool = False) -> tuple[list[dict], list[dict]]:
    mp = multiprocessing.get_context("spawn")
    stop, out = mp.Event(), mp.Queue()
    progress = [mp.Value("l", 0) for _ in range(procs)]
    load = [mp.Process(target=_load, args=(d.endpoint, i, stop, progress[i], out, direct)) for i in range(procs)]
    for p in load:
        p.start()
    results = []
    try:
        with Client(d.endpoint, timeout=120) as admin:
            admin.set_many({f"bulk:{i}": b"x" * 50 for i in range(20000)})
            for size in sizes:
                floor = [v.value for v in progress]
                deadline = time.monotonic() + 120  # against a hang only
                while any(v.value < f + 100 for v, f in zip(progress, floor, strict=True)):
                    assert time.monotonic() < deadline, "load processes stalled"
                    time.sleep(0.02)
                results.append(admin.resize(size))
    finally:
        stop.set()
        for p in load:
            p.join(60)
        assert [p.exitcode for p in load] == [0] * procs, d.log()[-3000:]
        reports = [out.get(timeout=10) for _ in load]
    return results, reports


def _check(d, reports: list[dict]) -> None:
    assert [e for r in reports for e in r["errors"]] == []
    assert all(r["ops"] >= 200 for r in reports), [r["ops"] for r in reports]  # >= 100 before each resize
    with Client(d.endpoint, timeout=10) as c:
        for r in reports:
            keys = list(r["expected"])
            got = c.get_many(keys)
            assert {k: got.get(k) for k in keys} == r["expected"]  # nothing lost, nothing back
            assert 600 < r["ttl"] <= 3600                         # TTLs survived the moves
        assert sum(int(c.get(k) or 0) for k in COUNTERS) == sum(r["incrs"] for r in reports)
        assert len(c.get_many([f"bulk:{i}" for i in range(20000)])) == 20000


@pytest.mark.parametrize("direct", [False, True], ids=["router", "direct"])
def test_grow_and_shrink_under_load_keep_every_guarantee(make_daemon, direct):
    d = make_daemon(shards=2)
    results, reports = _run_resizes(d, [3, 2], direct=direct)
    grow, shrink = results
    assert (grow["from"], grow["to"], shrink["from"], shrink["to"]) == (2, 3, 3, 2)
    for r in results:
        share = r["moved"] / r["total"]
        assert 0.25 < share < 0.42, r  # about |ΔN| / max(N_old, N_new) = 1/3
        assert r["lost"] == 0
    assert shrink["epoch"] == grow["epoch"] + 1
    _check(d, reports)
    with Client(d.endpoint) as c:
        topology = c.topology()
        assert (topology["shards"], topology["epoch"], topology["resizing"]) == (2, shrink["epoch"], None)
        assert len(c.stats()["shards"]) == 2
    assert "stopped 1 removed worker" in d.log()
    print(f"\n2→3: moved {grow['moved']}/{grow['total']} in {grow['seconds']} s; "
          f"3→2: moved {shrink['moved']}/{shrink['total']} in {shrink['seconds']} s")


def test_resize_cli_and_refusals(make_daemon):
    d = make_daemon(shards=1)
    r = run_cli(d.endpoint, "shards", "resize", "2")
    assert r.returncode == 0 and "resized 1 → 2 shards" in r.stdout, r.stderr
    r = run_cli(d.endpoint, "shards")
    assert "epoch 2: 2 shards" in r.stdout
    r = run_cli(d.endpoint, "shards", "resize", "0")
    assert r.returncode == 2 and "between 1 and 1024" in r.stderr
    with Client(d.endpoint) as c:
        assert c.ping() == 2
        assert c.resize(2)["moved"] == 0
