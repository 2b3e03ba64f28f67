"""The router's stats as pure functions over its shard links: each shard's row, totals,
imbalance, hot keys and health, combined from the parts of a fan-out gather.

No I/O and no Router: callers pass the links (anything with ``shard``, ``inflight``, ``high``
and ``busy``) and the router's own numbers. The balance check that *sends* stats requests
lives in router.py; what it concludes is ``imbalance_news``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shardd import protocol as p
from shardd.router_types import Part
from shardd.shard_link import ShardLink

# Below these means a balance ratio is noise: a few keys or ops/s on an idle daemon are
# never "imbalanced". (The check runs every imbalance_check_s, an internal stats fan-out.)
_BALANCE_MIN_KEYS = 1000
_BALANCE_MIN_OPS_PER_S = 100.0
_BALANCE_REWARN_S = 300.0

# Stats and hotkeys answer with the shards that replied within this many seconds and name the
# others (a stuck worker, e.g. SIGSTOPped or in a long GC, never holds the whole reply). Below
# the clients' default timeout (1 s), so the answer arrives before a default client gives up.
GATHER_DEADLINE_S = 0.75

# Per-shard stats fields summed into the "total" row of stats.
_SUMMED = ("keys", "expiring", "used_bytes", "max_bytes", "rss_bytes", "ops", "ops_per_s", "hits", "misses",
           "sets", "deletes", "expired", "evicted", "oom_rejected", "mailbox", "mailbox_high", "busy")


def gather_deadline(op: p.Op) -> float | None:
    """Seconds a fan-out of ``op`` waits for the shards before answering without the rest."""
    if type(op) is p.Health:
        return op.deadline_ms / 1000
    if type(op) in (p.Stats, p.Hotkeys):
        return GATHER_DEADLINE_S
    return None


def combine_stats(parts: list[Part], links: Sequence[ShardLink], router: dict[str, Any],
                  threshold: float) -> dict[str, Any]:
    """Router stats plus one row per shard: the worker's own numbers and the router's view.

    A shard that did not answer has status "down" (no worker connected) or "timeout" (did
    not answer within GATHER_DEADLINE_S) and is also listed in "missing".
    """
    by_shard = {shard: value for shard, _, value in parts}
    rows = []
    for link in links:
        value = by_shard.get(link.shard)
        row: dict[str, Any] = dict(value) if isinstance(value, dict) else {"shard": link.shard}
        row.update(status="up" if isinstance(value, dict) else _missing_state(value),
                   mailbox=link.inflight, mailbox_high=link.high, busy=link.busy)
        rows.append(row)
    missing = [{"shard": row["shard"], "status": row["status"]} for row in rows if row["status"] != "up"]
    combined = {"router": router, "shards": rows, "missing": missing, **_totals(rows, threshold)}
    resp = combine_resp([router.get("resp"), *(row.get("resp") for row in rows)])
    if resp is not None:
        combined["resp"] = resp
    near = combine_near([row.get("near") for row in rows if row["status"] == "up"])
    if near is not None:
        combined["near_cache"] = near
    return combined


def combine_near(parts: list[dict[str, Any] | None]) -> dict[str, int] | None:
    """The near-cache side of the shards that answered (each one's ``near`` block, hot_marks):
    keys marked hot now and invalidations sent, summed; None when no shard has near caches on."""
    present = [part for part in parts if part]
    if not present:
        return None
    return {"marked": sum(part.get("marked", 0) for part in present),
            "invalidation_messages": sum(part.get("messages", 0) for part in present),
            "keys_invalidated": sum(part.get("keys_invalidated", 0) for part in present),
            "resets": sum(part.get("resets", 0) for part in present),
            "shards": len(present)}


def combine_resp(parts: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The RESP endpoint's counters over every process serving it (each worker, or the router):
    numbers and per-command counts summed; None when no process serves one."""
    present = [part for part in parts if part]
    if not present:
        return None
    total: dict[str, Any] = {"bind": present[0].get("bind"), "processes": len(present)}
    for part in present:
        for field, value in part.items():
            if isinstance(value, dict):
                into = total.setdefault(field, {})
                for name, count in value.items():
                    into[name] = into.get(name, 0) + count
            elif isinstance(value, int) and not isinstance(value, bool):
                total[field] = total.get(field, 0) + value
    return total


def imbalance_news(stats: dict[str, Any], warned: dict[str, float], now: float,
                   threshold: float) -> list[tuple[bool, str]]:
    """What to log about balance, as (is_warning, message): once when a dimension passes the
    threshold, again every _BALANCE_REWARN_S, and once when it clears. ``warned`` (dimension →
    when we last warned) is updated in place."""
    imbalance, total = stats["imbalance"], stats["total"]
    n = max(1, total["shards_up"])
    floors = {"keys": total["keys"] / n >= _BALANCE_MIN_KEYS,
              "ops": total["ops_per_s"] / n >= _BALANCE_MIN_OPS_PER_S}
    news = []
    for dim, meaningful in floors.items():
        ratio, hot = imbalance[dim], imbalance[f"hot_shard_{dim}"]
        if meaningful and ratio > threshold:
            last = warned.get(dim)
            if last is None or now - last >= _BALANCE_REWARN_S:
                warned[dim] = now
                news.append((True, f"shard {hot} is hot: {ratio:.2f}x the mean {'keys' if dim == 'keys' else 'ops/s'} "
                                   f"over {n} shards (imbalance_threshold {threshold:.2f})"))
        elif dim in warned:
            del warned[dim]
            news.append((False, f"{dim} are balanced again: max/mean {ratio:.2f}"))
    return news


def combine_hotkeys(parts: list[Part]) -> dict[str, Any]:
    """Every shard's top keys, merged: [key, shard, rate/s, count, error], hottest first.

    "down" lists the shards not included; "missing" says why ("down" or "timeout"). With near
    caches on, "hot" lists the keys of "keys" their shard has marked hot (a key has one owner,
    so the key names its row), and "marked" has one {"shard", "marked"} per shard that answered,
    in shard order: how many keys it has marked in all. Both are empty when no shard has near
    caches (or the workers predate them); the rows themselves are unchanged.
    """
    rows: list[list[Any]] = []
    top, window, down, missing = 1, 0.0, [], []
    hot: set[tuple[bytes, int]] = set()
    marked: list[dict[str, int]] = []
    for shard, _, value in parts:
        if not isinstance(value, dict):
            down.append(shard)
            missing.append({"shard": shard, "status": _missing_state(value)})
            continue
        top = max(top, value["top"])
        window = max(window, value["window_s"])
        rows.extend([key, shard, rate, count, error] for key, rate, count, error in value["keys"])
        if "marked" in value:
            marked.append({"shard": shard, "marked": value["marked"]})
            hot.update((key, shard) for key in value.get("hot") or ())
    rows.sort(key=lambda row: row[2], reverse=True)
    rows = rows[:top]
    return {"window_s": window, "keys": rows, "down": sorted(down),
            "missing": sorted(missing, key=lambda row: row["shard"]),
            "hot": [row[0] for row in rows if (row[0], row[1]) in hot],
            "marked": sorted(marked, key=lambda row: row["shard"])}


def combine_health(parts: list[Part], shards: int, maintenance: bool) -> dict[str, Any]:
    """Each shard: "ok", "down" (no worker connected) or "timeout" (did not answer in time)."""
    states = {}
    for shard, _, value in parts:
        if value == 1:  # a ping part: the shard answered (a worker answers ping with 1)
            states[shard] = "ok"
        elif isinstance(value, tuple) and value[1] == "timeout":
            states[shard] = "timeout"
        else:
            states[shard] = "down"
    rows = [{"shard": i, "status": states.get(i, "timeout")} for i in range(shards)]
    return {"ok": all(row["status"] == "ok" for row in rows), "maintenance": maintenance, "shards": rows}


def _missing_state(value: Any) -> str:
    """The state of a shard whose gather part is an error: "timeout" (the deadline passed) or "down"."""
    return "timeout" if isinstance(value, tuple) and value[1:2] == ("timeout",) else "down"


def _totals(rows: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """The "total" row and the "imbalance" ratios (max/mean over the shards that are up)."""
    up = [row for row in rows if row.get("status") == "up"]
    total: dict[str, Any] = {f: sum(row.get(f) or 0 for row in up) for f in _SUMMED}
    total["mailbox"] = sum(row.get("mailbox") or 0 for row in rows)
    total["busy"] = sum(row.get("busy") or 0 for row in rows)
    total["shards_up"] = len(up)
    evictions: dict[str, int] = {}
    for row in up:
        for reason, count in (row.get("evictions") or {}).items():
            evictions[reason] = evictions.get(reason, 0) + count
    total["evictions"] = evictions
    # Quantiles cannot be added up: the total shows the worst shard's.
    for q in ("service_p50_us", "service_p99_us"):
        values = [row[q] for row in up if row.get(q) is not None]
        total[q] = max(values) if values else None
    imbalance: dict[str, Any] = {"threshold": threshold}
    for dim, field in (("keys", "keys"), ("ops", "ops_per_s")):
        values = [(row.get(field) or 0, row["shard"]) for row in up]
        mean = sum(v for v, _ in values) / len(values) if values else 0
        peak, hot = max(values) if values else (0, None)
        imbalance[dim] = round(peak / mean, 3) if mean else 1.0
        imbalance[f"hot_shard_{dim}"] = hot
    return {"total": total, "imbalance": imbalance}
