"""``shardd cluster status`` and ``shardd cluster leave`` (docs/cluster.md)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from shardd.cli.common import DEFAULT_ENDPOINT, Endpoint, TimeoutOpt, app, ask, fail
from shardd.errors import SharddError
from shardd.slots import SLOTS, SlotMap

cluster_app = typer.Typer(help="Operate a cluster of shardd nodes (cluster_etcd set).", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")


def _cluster_map(topology: dict[str, Any], endpoint: str) -> tuple[SlotMap, str]:
    cluster = topology.get("cluster")
    if not cluster:
        raise fail(f"{endpoint} is not a cluster node (its config has no cluster_etcd)")
    if cluster.get("map") is None:
        raise fail(f"{endpoint} (node {cluster.get('node')}) has no slot map yet: is etcd reachable?")
    return SlotMap.from_wire(cluster["map"]), cluster.get("name", "")


def status_report(smap: SlotMap, name: str, stats: dict[str, Any]) -> dict[str, Any]:
    """Members, slots and keys per node, epoch, handoffs, imbalance (pure: the CLI and tests)."""
    rows = []
    for i, node in enumerate(smap.nodes):
        node_stats = stats.get(node.id)
        rows.append({
            "id": node.id,
            "endpoint": node.endpoint,
            "shards": node.shards,
            "slots": smap.owners.count(i),
            "handing_over": sum(1 for source in smap.handoff.values() if source == i),
            "keys": node_stats.get("total", {}).get("keys") if isinstance(node_stats, dict) else None,
            "epoch_installed": (node_stats.get("router", {}).get("cluster", {}).get("epoch")
                                if isinstance(node_stats, dict) else None),
            # replica lag: keys written on this node not yet streamed to their replica
            "replication_pending": (node_stats.get("router", {}).get("cluster", {}).get("replication_pending")
                                    if isinstance(node_stats, dict) else None),
            "error": node_stats if isinstance(node_stats, str) else None,
        })
    owning = [row["slots"] for row in rows if row["slots"]]
    keys = [row["keys"] for row in rows if isinstance(row["keys"], int)]
    return {
        "cluster": name,
        "epoch": smap.epoch,
        "nodes": rows,
        "slots": SLOTS,
        "unowned_slots": smap.owners.count(-1),
        "handoffs_pending": len(smap.handoff),
        "slot_imbalance": round(max(owning) / (sum(owning) / len(owning)), 3) if owning else None,
        "key_imbalance": round(max(keys) / (sum(keys) / len(keys)), 3) if keys and sum(keys) else None,
        "replicas": 1 if smap.replicas else 0,
    }


@cluster_app.command("status")
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    endpoint: Endpoint = DEFAULT_ENDPOINT,
    timeout: TimeoutOpt = 2.0,
) -> None:
    """Members, slots and keys per node, the map's epoch, pending handoffs and imbalance."""
    from shardd.cli.common import connect

    smap, name = _cluster_map(ask(endpoint, timeout, lambda client: client.topology()), endpoint)
    stats: dict[str, Any] = {}
    for node in smap.nodes:
        try:
            with connect(node.endpoint, timeout) as client:
                stats[node.id] = client.stats()
        except SharddError as exc:
            stats[node.id] = f"unreachable: {exc}"
    report = status_report(smap, name, stats)
    if as_json:
        typer.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    typer.echo(f"cluster {report['cluster']}: epoch {report['epoch']}, {len(smap.nodes)} node(s), "
               f"{report['handoffs_pending']} slot handoff(s) pending, slot imbalance {report['slot_imbalance']}, "
               f"key imbalance {report['key_imbalance']}")
    typer.echo(f"{'node':<28} {'slots':>6} {'out':>5} {'keys':>10}  state")
    for row in report["nodes"]:
        state = row["error"] or f"epoch {row['epoch_installed']}"
        if report["replicas"] and not row["error"]:
            state += f", replica lag {row['replication_pending']} keys"
        typer.echo(f"{row['id'][:28]:<28} {row['slots']:>6} {row['handing_over']:>5} "
                   f"{row['keys'] if row['keys'] is not None else '-':>10}  {state}")


@cluster_app.command("leave")
def leave(endpoint: Endpoint = DEFAULT_ENDPOINT, timeout: TimeoutOpt = 2.0) -> None:
    """Hand this node's slots to the other members, then stop it (as SIGTERM does)."""
    ask(endpoint, timeout, lambda client: client.leave())
    typer.echo(f"{endpoint}: leaving (its slots move to the other members, then it stops)")
