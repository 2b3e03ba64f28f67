"""Cluster placement simulation: how many slots move, how balanced they are, how long it takes.

    python bench/cluster_sim.py                      # N = 3, 4, 8, 16, 32, 100
    python bench/cluster_sim.py --keys 100000        # also where 100k keys land (2 shards/node)
    python bench/cluster_sim.py --random-ids 200     # how often random ids exceed 1.15x
    python bench/cluster_sim.py --sizes 5,50 --trials 10

Theory of operation
-------------------
Pure computation with shardd.slots, the controller's own code: no daemon, no etcd. For each
cluster size N the nodes are named like their default ids, ``tcp://10.0.x.y:7400``, and
``next_map`` computes the settled map of N nodes. Then:

* add: ``next_map`` with one more (live) node, ``--trials`` different new ids; the planned
  moves are its handoffs. Ideal: 1/(N+1). "only new" checks every handoff goes to the new node.
* leave: the node owning the most slots (the worst case) turns "leaving"; its handoffs are
  the moves. Ideal: 1/N (the mean share). "only own" checks nothing else moves. A node that
  dies instead moves exactly the same slots, at once and without handoffs.
* slots max/mean: the largest node's slot count over 4096/N. Plain HRW gives each node a
  binomial share, so this grows with N (4096 slots are few for 100 nodes).
* map ms: ``next_map(None, members)``, best of ``--repeat``: the controller's whole
  computation for a cluster of N (N x 4096 xxh3 scores).
* ``--keys K``: ``K`` keys ``key:<i>`` placed by slot and then by shard_for over 2 shards per
  node: the busiest node over keys/N, and the busiest shard over keys/(2N) (cluster-wide).
* ``--random-ids S``: S sets of random 12-hex-digit ids per N: mean slot imbalance and the
  share of sets whose largest node exceeds 1.15x the mean.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout runs without an install

from shardd.slots import (
    SLOTS,
    Member,
    SlotMap,
    assign,
    imbalance,
    key_imbalance,
    next_map,
    owner_ids,
)


def endpoint(i: int) -> str:
    return f"tcp://10.0.{i // 256}.{i % 256}:7400"


def members_for(ids: list[str], shards: int) -> dict[str, Member]:
    return {i: Member(i, i, shards) for i in ids}


def settled_map(members: dict[str, Member]) -> SlotMap:
    smap = next_map(None, members, {})
    assert smap is not None
    return smap


def handoffs(before: SlotMap, after: SlotMap | None) -> list[tuple[int, str, str]]:
    """(slot, source id, destination id) of every planned move ``after`` starts."""
    if after is None:
        return []
    return [(s, after.nodes[f].id, after.nodes[after.owners[s]].id) for s, f in sorted(after.handoff.items())]


def simulate(n: int, trials: int, repeat: int, keys: list[bytes], shards: int) -> dict[str, object]:
    ids = [endpoint(i) for i in range(1, n + 1)]
    members = members_for(ids, shards)
    timings = []
    for _ in range(repeat):
        start = time.perf_counter()
        smap = settled_map(members)
        timings.append(time.perf_counter() - start)

    added, only_new = [], True
    for t in range(trials):
        new = endpoint(n + 1 + t)
        moves = handoffs(smap, next_map(smap, {**members, **members_for([new], shards)}, {}))
        added.append(len(moves) / SLOTS)
        only_new &= all(to == new for _, _, to in moves)

    owners = owner_ids(smap)
    heaviest = max(ids, key=owners.count)
    leaving = {**members, heaviest: Member(heaviest, heaviest, shards, "leaving")}
    moves = handoffs(smap, next_map(smap, leaving, {}))
    only_own = {s for s, _, _ in moves} == {s for s, o in enumerate(owners) if o == heaviest}
    only_own &= all(src == heaviest for _, src, _ in moves)

    row: dict[str, object] = {
        "n": n,
        "add_mean": sum(added) / len(added),
        "add_max": max(added),
        "add_ideal": 1 / (n + 1),
        "only_new": only_new,
        "leave": len(moves) / SLOTS,
        "leave_ideal": 1 / n,
        "only_own": only_own,
        "slots": imbalance(smap.owners, n),
        "ms": min(timings) * 1000,
    }
    if keys:
        spread = key_imbalance(keys, smap)
        row["key_node"], row["key_shard"] = spread.node, spread.shard
    return row


def random_ids(n: int, sets: int, rng: random.Random) -> tuple[float, float]:
    """Mean slot imbalance over ``sets`` random id sets, and the share above 1.15."""
    values = []
    for _ in range(sets):
        ids = [f"{rng.getrandbits(48):012x}" for _ in range(n)]
        values.append(imbalance(assign(ids), n))
    return sum(values) / sets, sum(v > 1.15 for v in values) / sets


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="3,4,8,16,32,100", help="cluster sizes N, comma-separated")
    ap.add_argument("--trials", type=int, default=5, help="new node ids tried per N for 'add'")
    ap.add_argument("--repeat", type=int, default=3, help="map computations timed per N (best is shown)")
    ap.add_argument("--keys", type=int, default=0, help="also place this many keys (per-node, per-shard)")
    ap.add_argument("--shards", type=int, default=2, help="shards per node for --keys")
    ap.add_argument("--random-ids", type=int, default=0, metavar="SETS", help="random id sets per N")
    ap.add_argument("--seed", type=int, default=1, help="seed of --random-ids")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    keys = [f"key:{i}".encode() for i in range(args.keys)]

    header = (f"{'N':>4} | {'add: moved':>10} {'max':>6} {'1/(N+1)':>7} {'only new':>8} | "
              f"{'leave: moved':>12} {'1/N':>6} {'only own':>8} | {'slots max/mean':>14} | {'map ms':>7}")
    if keys:
        header += f" | {'keys node':>9} {'shard':>6}"
    print(f"slots {SLOTS}, node ids tcp://10.0.x.y:7400, {args.trials} new ids per add, "
          f"leave = the node with the most slots")
    print(header)
    print("-" * len(header))
    for n in sizes:
        r = simulate(n, args.trials, args.repeat, keys, args.shards)
        line = (f"{n:>4} | {r['add_mean']:>10.4f} {r['add_max']:>6.4f} {r['add_ideal']:>7.4f} "
                f"{'yes' if r['only_new'] else 'NO':>8} | {r['leave']:>12.4f} {r['leave_ideal']:>6.4f} "
                f"{'yes' if r['only_own'] else 'NO':>8} | {r['slots']:>14.3f} | {r['ms']:>7.1f}")
        if keys:
            line += f" | {r['key_node']:>9.3f} {r['key_shard']:>6.3f}"
        print(line)
    if keys:
        print(f"keys: {args.keys} keys key:<i>, {args.shards} shards per node; max/mean per node and per shard")

    if args.random_ids:
        rng = random.Random(args.seed)
        print(f"\nrandom ids: {args.random_ids} sets of random 12-hex-digit ids per N")
        print(f"{'N':>4} | {'slots max/mean (mean)':>21} | {'sets > 1.15':>11}")
        for n in sizes:
            mean, over = random_ids(n, args.random_ids, rng)
            print(f"{n:>4} | {mean:>21.3f} | {over:>11.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
