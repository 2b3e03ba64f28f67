"""Prometheus ``/metrics`` for the daemon, served from the supervisor process.

Theory of operation
-------------------
The supervisor never serves cache requests, but it may serve this: ``start`` runs
prometheus_client's HTTP server on a daemon thread bound to ``metrics_bind``. Nothing is
cached and no worker is touched directly: on each scrape :class:`StatsCollector` sends one
``stats`` request through the router's control endpoint (``shardd.client.Client``) and
turns the reply into metric families, so a scrape costs the daemon exactly one admin
fan-out and the numbers are as fresh as the scrape.

Naming follows Prometheus conventions: ``shardd_`` prefix, a ``shard`` label per shard,
counters end in ``_total``, sizes in ``_bytes``, times in ``_seconds``. If the router does
not answer, the scrape still succeeds with ``shardd_up 0`` so alerting sees it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from shardd import histogram
from shardd.client import Client
from shardd.config import Config
from shardd.errors import SharddError

log = logging.getLogger("shardd.metrics")

# (stats field, metric name without prefix, help); gauges then counters, per shard.
_GAUGES = [
    ("keys", "keys", "Keys stored (including expired ones not yet reclaimed)."),
    ("expiring", "keys_with_ttl", "Keys that have a TTL."),
    ("used_bytes", "memory_used_bytes", "Bytes accounted to keys, values and per-entry overhead."),
    ("max_bytes", "memory_max_bytes", "This shard's share of max_memory."),
    ("rss_bytes", "worker_resident_memory_bytes", "Resident set size of the worker process."),
    ("arena_bytes", "memory_arena_bytes", "Bytes written into the shard's record segments, live and dead."),
    ("garbage_bytes", "memory_garbage_bytes", "Dead record bytes not yet reclaimed by cleaning."),
    ("compressed_raw_bytes", "compressed_raw_bytes", "Values stored compressed: their size as written."),
    ("compressed_bytes", "compressed_bytes", "Values stored compressed: their size as stored."),
    ("mailbox", "mailbox", "Requests in flight to the shard (router's count)."),
    ("mailbox_high", "mailbox_high", "High-water mark of mailbox."),
    ("ops_per_s", "ops_per_second", "Ops applied per second over the last 10-20 s."),
    ("uptime_s", "uptime_seconds", "Seconds since the worker started."),
]
_COUNTERS = [
    ("ops", "ops", "Ops applied by the worker."),
    ("hits", "hits", "Key lookups that found the key."),
    ("misses", "misses", "Key lookups that did not."),
    ("sets", "sets", "Values written."),
    ("deletes", "deletes", "Live keys deleted."),
    ("expired", "expired_keys", "Keys reclaimed because their TTL passed."),
    ("oom_rejected", "oom_rejections", "Writes refused with OUT_OF_MEMORY."),
    ("busy", "busy_replies", "BUSY replies the router gave for this shard."),
]
# (field of a shard's "near" stats block, metric name without prefix, help); counters, per shard.
_NEAR_COUNTERS = [
    ("messages", "near_invalidation_messages", "Invalidation messages (keys or all) sent on the shard's feed."),
    ("keys_invalidated", "near_keys_invalidated", "Keys named in the shard's invalidation messages."),
    ("resets", "near_resets", "Times the shard told near caches to drop all its keys (flush, resize)."),
]


class StatsCollector(Collector):
    """Asks the daemon for ``stats`` on every scrape (one request through the control endpoint)."""

    def __init__(self, endpoint: str, timeout: float = 2.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._lock = threading.Lock()  # a Client is not thread-safe; scrapes may overlap

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            try:
                with Client(self.endpoint, timeout=self.timeout) as client:
                    stats = client.stats()
            except SharddError as exc:
                log.warning("metrics scrape: no stats from the router (%s)", exc)
                stats = None
        yield from families(stats)


def families(stats: dict[str, Any] | None) -> Iterator[Metric]:
    """Metric families for one ``stats`` reply (None: the daemon did not answer)."""
    up = GaugeMetricFamily("shardd_up", "1 if the router answered this scrape.")
    up.add_metric([], 0 if stats is None else 1)
    yield up
    if stats is None:
        return
    rows = stats["shards"]
    shard_up = GaugeMetricFamily("shardd_shard_up", "1 if the shard's worker is serving.", labels=["shard"])
    for row in rows:
        shard_up.add_metric([str(row["shard"])], 1 if row.get("status") == "up" else 0)
    yield shard_up
    live = [row for row in rows if row.get("status") == "up"]
    for field, name, doc in _GAUGES:
        g = GaugeMetricFamily(f"shardd_{name}", doc, labels=["shard"])
        for row in live if field not in ("mailbox", "mailbox_high") else rows:
            if row.get(field) is not None:
                g.add_metric([str(row["shard"])], row[field])
        yield g
    for field, name, doc in _COUNTERS:
        c = CounterMetricFamily(f"shardd_{name}", doc, labels=["shard"])
        for row in live if field != "busy" else rows:
            if row.get(field) is not None:
                c.add_metric([str(row["shard"])], row[field])
        yield c
    ev = CounterMetricFamily("shardd_evicted_keys", "Keys evicted to stay under max_memory, by policy.",
                             labels=["shard", "reason"])
    for row in live:
        for reason, count in sorted((row.get("evictions") or {}).items()):
            ev.add_metric([str(row["shard"]), reason], count)
    yield ev
    svc = HistogramMetricFamily("shardd_service_seconds", "Time to apply one op inside the worker.",
                                labels=["shard"])
    for row in live:
        buckets = row.get("service_buckets")
        if not buckets:
            continue
        pairs = [(f"{bound / 1e9:.9g}", count) for bound, count in zip(histogram.PROM_BOUNDS_NS, buckets,
                                                                      strict=True)]
        pairs.append(("+Inf", row["service_count"]))
        svc.add_metric([str(row["shard"])], pairs, row["service_sum_s"])
    yield svc
    near = [row for row in live if row.get("near")]
    if near:  # near caches (docs/near-cache.md): each shard's marks and invalidation feed
        hot = GaugeMetricFamily("shardd_near_hot_keys", "Keys the shard has marked hot for clients' near caches.",
                                labels=["shard"])
        for row in near:
            hot.add_metric([str(row["shard"])], row["near"]["marked"])
        yield hot
        for field, name, doc in _NEAR_COUNTERS:
            c = CounterMetricFamily(f"shardd_{name}", doc, labels=["shard"])
            for row in near:
                c.add_metric([str(row["shard"])], row["near"][field])
            yield c
    imbalance = stats.get("imbalance") or {}
    ratio = GaugeMetricFamily("shardd_imbalance_ratio", "Busiest shard / mean over shards.", labels=["dimension"])
    for dim in ("keys", "ops"):
        if dim in imbalance:
            ratio.add_metric([dim], imbalance[dim])
    yield ratio
    router = stats.get("router") or {}
    req = CounterMetricFamily("shardd_router_requests", "Messages the router received from clients.")
    req.add_metric([], router.get("requests", 0))
    yield req
    cluster = router.get("cluster")
    if cluster:  # cluster mode (docs/cluster.md): this node's view
        epoch = GaugeMetricFamily("shardd_cluster_epoch", "Epoch of the slot map this node serves by.")
        epoch.add_metric([], cluster["epoch"])
        yield epoch
        lease = GaugeMetricFamily("shardd_cluster_lease_seconds",
                                  "Seconds this node may still serve before its etcd lease must be renewed.")
        lease.add_metric([], cluster["lease_left_s"])
        yield lease
        slots = GaugeMetricFamily("shardd_cluster_slots", "Slots by what this node does with them.", labels=["state"])
        for state, count in sorted(cluster["slots"].items()):
            slots.add_metric([state], count)
        yield slots
    resp = stats.get("resp")
    if resp:  # the Redis-protocol endpoint (docs/resp.md), summed over the processes serving it
        conns = GaugeMetricFamily("shardd_resp_connections", "Open connections on the RESP endpoint.")
        conns.add_metric([], resp["connections"])
        yield conns
        for field, name, doc in (("accepted", "resp_connections_accepted", "RESP connections accepted."),
                                 ("rejected", "resp_connections_rejected", "RESP connections refused (maxclients)."),
                                 ("protocol_errors", "resp_protocol_errors",
                                  "RESP connections closed for a malformed request.")):
            counter = CounterMetricFamily(f"shardd_{name}", doc)
            counter.add_metric([], resp[field])
            yield counter
        commands = CounterMetricFamily("shardd_resp_commands", "RESP commands received, by command.",
                                       labels=["command"])
        for command, count in sorted(resp["by_command"].items()):
            commands.add_metric([command], count)
        yield commands
        errors = CounterMetricFamily("shardd_resp_errors", "RESP error replies, by command.", labels=["command"])
        for command, count in sorted(resp["errors_by_command"].items()):
            errors.add_metric([command], count)
        yield errors


class MetricsServer:
    """The running /metrics endpoint; ``close`` stops it."""

    def __init__(self, server: Any, thread: threading.Thread, address: tuple[str, int]) -> None:
        self.server = server
        self.thread = thread
        self.address = address

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(2)


def start(config: Config) -> MetricsServer | None:
    """Serve /metrics on ``metrics_bind`` (None when it is off, or cannot bind: logged, not fatal)."""
    address = config.metrics_address()
    if address is None:
        return None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(config.control_endpoint()))
    host, port = address
    try:
        server, thread = start_http_server(port, host, registry=registry)
    except OSError as exc:
        # A cache that serves without its metrics beats one that does not serve.
        log.error("cannot serve metrics on %s: %s; continuing without /metrics", config.metrics_bind, exc)
        return None
    log.info("metrics on http://%s/metrics", config.metrics_bind)
    return MetricsServer(server, thread, address)
