"""The router's stats: its own numbers, each shard's row, totals, imbalance, hot keys, health.

A mixin of :class:`shardd.router.Router`; the combine functions turn the parts of a fan-out
gather into one reply.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from shardd import protocol as p
from shardd.router_types import Gather

log = logging.getLogger("shardd.router")

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


class StatsDuty:
    """Stats methods of the Router (they read its links and counters)."""

    def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "shards": self.n,
            "mailbox_limit": self.mailbox_limit,
            "requests": self.requests,
            "maintenance": self.maintenance,
            "clients_in_flight": len(self.peer_inflight),  # connections with requests unanswered (Rule 5)
        }

    def gather_deadline(self, op: p.Op) -> float | None:
        """Seconds a fan-out of ``op`` waits for the shards before answering without the rest."""
        if type(op) is p.Health:
            return op.deadline_ms / 1000
        if type(op) in (p.Stats, p.Hotkeys):
            return GATHER_DEADLINE_S
        return None

    def _combine_stats(self, parts: list[tuple[int, Any, Any]]) -> dict[str, Any]:
        """Router stats plus one row per shard: the worker's own numbers and the router's view.

        A shard that did not answer has status "down" (no worker connected) or "timeout" (did
        not answer within GATHER_DEADLINE_S) and is also listed in "missing".
        """
        by_shard = {shard: value for shard, _, value in parts}
        rows = []
        for link in self.links:
            value = by_shard.get(link.shard)
            row: dict[str, Any] = dict(value) if isinstance(value, dict) else {"shard": link.shard}
            row.update(status="up" if isinstance(value, dict) else _missing_state(value),
                       mailbox=link.inflight, mailbox_high=link.high, busy=link.busy)
            rows.append(row)
        missing = [{"shard": row["shard"], "status": row["status"]} for row in rows if row["status"] != "up"]
        return {"router": self.stats(), "shards": rows, "missing": missing,
                **_totals(rows, self.config.imbalance_threshold)}

    def check_balance(self, now: float) -> None:
        """Every imbalance_check_s, gather stats from the shards and warn about a hot one."""
        if now < self.next_balance_check or self.draining:
            return
        self.next_balance_check = now + self.config.imbalance_check_s
        up = [link for link in self.links if link.up]
        if not up:
            return
        gather = Gather(None, 0, len(up), lambda parts: self._warn_imbalance(self._combine_stats(parts)), True)
        gather.deadline = now + GATHER_DEADLINE_S  # a stuck shard must not keep this gather forever
        self.timed.append(gather)
        for link in up:
            self._queue(link, p.Stats(), (gather, None))
        self.flush_outboxes()

    def _warn_imbalance(self, stats: dict[str, Any]) -> None:
        """Log once when a dimension passes the threshold, again every _BALANCE_REWARN_S, and when it clears."""
        imbalance, total = stats["imbalance"], stats["total"]
        n = max(1, total["shards_up"])
        floors = {"keys": total["keys"] / n >= _BALANCE_MIN_KEYS,
                  "ops": total["ops_per_s"] / n >= _BALANCE_MIN_OPS_PER_S}
        now = time.monotonic()
        threshold = self.config.imbalance_threshold
        for dim, meaningful in floors.items():
            ratio, hot = imbalance[dim], imbalance[f"hot_shard_{dim}"]
            if meaningful and ratio > threshold:
                last = self.imbalanced.get(dim)
                if last is None or now - last >= _BALANCE_REWARN_S:
                    self.imbalanced[dim] = now
                    log.warning("shard %s is hot: %.2fx the mean %s over %d shards (imbalance_threshold %.2f)",
                                hot, ratio, "keys" if dim == "keys" else "ops/s", n, threshold)
            elif dim in self.imbalanced:
                del self.imbalanced[dim]
                log.info("%s are balanced again: max/mean %.2f", dim, ratio)

    def _combine_hotkeys(self, parts: list[tuple[int, Any, Any]]) -> dict[str, Any]:
        """Every shard's top keys, merged: [key, shard, rate/s, count, error], hottest first.

        "down" lists the shards not included; "missing" says why ("down" or "timeout").
        """
        rows: list[list[Any]] = []
        top, window, down, missing = 1, 0.0, [], []
        for shard, _, value in parts:
            if not isinstance(value, dict):
                down.append(shard)
                missing.append({"shard": shard, "status": _missing_state(value)})
                continue
            top = max(top, value["top"])
            window = max(window, value["window_s"])
            rows.extend([key, shard, rate, count, error] for key, rate, count, error in value["keys"])
        rows.sort(key=lambda row: row[2], reverse=True)
        return {"window_s": window, "keys": rows[:top], "down": sorted(down),
                "missing": sorted(missing, key=lambda row: row["shard"])}

    def _combine_health(self, parts: list[tuple[int, Any, Any]]) -> dict[str, Any]:
        """Each shard: "ok", "down" (no worker connected) or "timeout" (did not answer in time)."""
        states = {}
        for shard, _, value in parts:
            if value == 1:  # a ping part: the shard answered (a worker answers ping with 1)
                states[shard] = "ok"
            elif isinstance(value, tuple) and value[1] == "timeout":
                states[shard] = "timeout"
            else:
                states[shard] = "down"
        shards = [{"shard": i, "status": states.get(i, "timeout")} for i in range(len(self.links))]
        return {"ok": all(row["status"] == "ok" for row in shards), "maintenance": self.maintenance,
                "shards": shards}


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
