"""The cluster agent: one process per node that speaks to etcd for it (docs/cluster.md).

Theory of operation
-------------------
The supervisor starts the agent once the node serves (cluster mode only) and restarts it if it
dies. The agent is asyncio, with three duties running side by side:

1. **Membership and fencing** (``_keep_lease``). It registers ``members/<node id>`` under a
   lease and refreshes the lease every TTL/3. After each acknowledged refresh it tells its
   router ``valid_until`` = the refresh's *send* time + the granted TTL - a margin: etcd cannot
   expire the lease before that, so the router stops serving (cluster_view, Rule 1) before
   anyone else may be given its slots. A lease found gone is replaced by a new one, and the
   member record re-put with the new lease id: its *incarnation*. The node serves a map only
   if the map names it with its current incarnation, so after losing a lease it serves
   nothing until the controller has seen it again.
2. **Controller** (``_control``). Every agent campaigns for the lease-bound ``controller`` key;
   the holder computes the next map from the members and the finished handoffs
   (shardd.slots.next_map, pure) and publishes it by compare-and-swap on the map's revision.
   When the controller's lease ends, its key goes and another agent wins the campaign.
3. **Following the map** (``_follow``). Each newer map is installed in the router
   (``cluster_set``). The handoffs this node is the source of are then driven, slot chunk by
   chunk (``_hand_off``): freeze the chunk here (TRYAGAIN), have the new owner empty those slots,
   take the entries here and send them on, have the new owner adopt the chunk, answer MOVED
   here (``slot_give``), and record the chunk in ``done/<node id>`` for the controller.

On SIGTERM the agent *leaves*: it marks its member record ``leaving`` (the controller hands its
slots to the others), waits until no slot is owned by or handed over from it (bounded by
``cluster_leave_timeout``), revokes its lease and exits 0.

Rules
-----
Rule 1: ``valid_until`` is only ever computed from a refresh etcd acknowledged, from the time the
        refresh was sent; with no live lease, or a map naming an older incarnation, it is 0.
Rule 2: only the controller writes ``map``, by compare-and-swap, and only after checking that
        the ``controller`` key is still its own.
Rule 3: a chunk is given away (MOVED here) only after the new owner answered its adopt; if
        anything fails on the way, the chunk stays frozen here until a newer map changes its
        (owner, source) pair, which resets it (cluster_view, Rule 3).
Rule 4: with replicas on (``cluster_replicas = 1``), the writes of every slot this node is the
        authority of stream asynchronously to the slot's replica: a replica first gets a copy of
        the slot (after emptying its old one), then every key written since the previous pull,
        read again when pulled. A failover loses the writes not yet streamed: at most one pull
        period (~5 ms idle) plus the stream's delay under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import Any

from shardd import protocol as p
from shardd.aclient import AsyncClient
from shardd.config import Config
from shardd.errors import ExitCode, SharddError
from shardd.logs import setup_logging
from shardd.slots import Done, Member, SlotMap, next_map, slot_of

log = logging.getLogger("shardd.cluster")

_CHUNK = 256          # slots handed over per step: the freeze window covers ~1/16 of a node's keys at most
_TAKE_LIMIT = 2000    # entries per slot_take per shard: one import message stays ~ a few MiB
_RETRY_S = 0.5        # after an etcd or router error
# A replication pull finds nothing: wait this long before the next. It bounds the extra window
# of acknowledged writes a failover can lose (bench/cluster.py measures the whole window) and
# costs two small round trips per period on an idle node.
_REPL_IDLE_S = 0.005


def _identity(value: Any) -> Any:
    return value


class Agent:
    """The node's cluster agent; ``run`` is the process's whole life."""

    def __init__(self, config: Config) -> None:
        from shardd.coord import Coordinator  # imports aetcd (grpc): only in this process

        self.config = config
        self.node_id = config.node_id()
        self.ttl = config.cluster_lease_ttl
        self.margin = max(0.5, self.ttl * 0.2)
        self.coord = Coordinator(list(config.cluster_etcd), config.cluster_prefix(), self.ttl)
        self.router = AsyncClient(config.control_endpoint(), timeout=10.0)
        self.peers: dict[str, AsyncClient] = {}
        self.state = "up"
        self.lease = 0              # the current lease id: this node's incarnation
        self.valid_until = 0.0
        self.map: SlotMap | None = None
        self.installed = 0          # the epoch installed in the router
        self.moved: dict[int, str] = {}  # slot → node id: handoffs finished in self.map's epoch
        self.handoff_wake = asyncio.Event()  # a map arrived: look for slots to hand over
        self.begun: dict[int, str] = {}  # slot → node id: the new owner was told to empty it for us
        self.synced: dict[int, tuple[str, int]] = {}  # slot → (replica id, lease) that has a full copy
        self.unreported = False  # finished handoffs etcd has not taken yet (_report)
        self.wake = asyncio.Event()  # a new map or member list arrived
        self.snapshot: dict[str, bytes] = {}
        self.leaving = asyncio.Event()

    # --- helpers --------------------------------------------------------------------

    async def _router(self, op: p.Op) -> Any:
        return await self.router._call(op, _identity)

    def _peer(self, endpoint: str) -> AsyncClient:
        client = self.peers.get(endpoint)
        if client is None:
            client = self.peers[endpoint] = AsyncClient(endpoint, timeout=10.0, curve=self._curve())
        return client

    def _curve(self) -> Any:
        if not self.config.auth_dir:
            return None
        from shardd.transport_client import load_curve

        return load_curve(self.config.auth_dir)

    def _member(self) -> bytes:
        return Member(self.node_id, self.config.advertised_endpoint(), self.config.shard_count(),
                      self.state, self.lease).to_json()

    def _serving(self) -> bool:
        """Rule 1: a live lease, and the map (if it names us) names this incarnation."""
        if self.lease == 0:
            return False
        if self.map is None:
            return True
        me = self.map.index_of(self.node_id)
        return me < 0 or self.map.nodes[me].lease == self.lease

    async def _push(self, with_map: bool) -> None:
        valid = self.valid_until if self._serving() else 0.0
        wire = self.map.to_wire() if with_map and self.map is not None else None
        await self._router(p.ClusterSet(wire, valid))
        if wire is not None:
            self.installed = self.map.epoch  # type: ignore[union-attr]

    # --- 1. membership and fencing ------------------------------------------------------

    async def _register(self) -> None:
        self.lease, _ = await self.coord.grant()
        await self.coord.put(f"members/{self.node_id}", self._member(), lease=True)
        log.info("registered as %s (lease %x)", self.node_id, self.lease)

    async def _keep_lease(self) -> None:
        while True:
            sent = time.monotonic()
            try:
                granted = await self.coord.keepalive() if self.lease else None
            except SharddError as exc:
                log.warning("lease refresh failed: %s", exc)
                granted = -1
            if granted is None:  # expired or never had one: a new incarnation
                if self.lease:
                    log.warning("membership lease lost; registering again (serving nothing meanwhile)")
                self.lease, self.valid_until = 0, 0.0
                with contextlib.suppress(SharddError):
                    await self._push(with_map=False)
                try:
                    await self._register()
                except SharddError as exc:
                    log.warning("cannot register with etcd: %s", exc)
                    await asyncio.sleep(_RETRY_S)
                    continue
                self.wake.set()
            elif granted > 0:
                self.valid_until = sent + granted - self.margin
                try:
                    await self._push(with_map=self.installed != (self.map.epoch if self.map else 0))
                except SharddError as exc:
                    log.warning("router did not take the lease: %s", exc)
            await asyncio.sleep(self.ttl / 3 if granted and granted > 0 else _RETRY_S)

    # --- 2 and 3: watch, control, follow ------------------------------------------------

    async def _watch(self) -> None:
        async for snapshot, _revision in self.coord.watch():
            self.snapshot = snapshot
            self.wake.set()

    async def _react(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            try:
                await self._control()
                await self._follow()
            except SharddError as exc:
                log.warning("cluster step failed (%s); retrying", exc)
                await asyncio.sleep(_RETRY_S)
                self.wake.set()

    def _members(self) -> dict[str, Member]:
        return {key.removeprefix("members/"): Member.from_json(value)
                for key, value in self.snapshot.items() if key.startswith("members/")}

    def _done(self) -> dict[str, Done]:
        return {key.removeprefix("done/"): Done.from_json(value)
                for key, value in self.snapshot.items() if key.startswith("done/")}

    async def _control(self) -> None:
        if not self.lease:
            return
        holder = self.snapshot.get("controller")
        if holder is None:
            if await self.coord.create("controller", self.node_id.encode(), lease=True):
                log.info("this node is the cluster controller now")
            return  # the watch brings the key (ours or another's) and wakes us again
        if holder != self.node_id.encode():
            return
        found = await self.coord.get("map")
        current, revision = (SlotMap.from_json(found[0]), found[1]) if found else (None, 0)
        new = next_map(current, self._members(), self._done(), self.config.cluster_replicas)
        if new is None:
            return
        check = await self.coord.get("controller")  # Rule 2
        if check is None or check[0] != self.node_id.encode():
            return
        if await self.coord.cas("map", new.to_json(), revision):
            log.info("published slot map epoch %d (%d nodes, %d handoffs)", new.epoch, len(new.nodes),
                     len(new.handoff))

    async def _follow(self) -> None:
        raw = self.snapshot.get("map")
        if raw is None:
            return
        new = SlotMap.from_json(raw)
        if self.map is not None and new.epoch <= self.map.epoch:
            if self.installed != self.map.epoch:
                await self._push(with_map=True)
            return
        self.map = new
        await self._push(with_map=True)
        # Handoffs finished under an earlier epoch and still pending in this one: report them
        # again, against this epoch (shardd.slots.next_map, Rule 3).
        me = new.index_of(self.node_id)
        self.moved = {slot: node for slot, node in self.moved.items()
                      if me >= 0 and new.handoff.get(slot) == me and new.nodes[new.owners[slot]].id == node}
        self.begun = {slot: node for slot, node in self.begun.items()
                      if me >= 0 and new.handoff.get(slot) == me and new.nodes[new.owners[slot]].id == node}
        if self.moved:
            await self._report(new)
        self.handoff_wake.set()

    # --- handoffs this node is the source of ----------------------------------------------

    def _next_chunk(self) -> tuple[list[int], str, str] | None:
        """The next slots to hand over under the latest map: (slots, owner id, owner endpoint)."""
        smap = self.map
        me = smap.index_of(self.node_id) if smap is not None else -1
        if smap is None or me < 0:
            return None
        by_owner: dict[int, list[int]] = {}
        for slot, source in sorted(smap.handoff.items()):
            if source == me and self.moved.get(slot) != smap.nodes[smap.owners[slot]].id:
                by_owner.setdefault(smap.owners[slot], []).append(slot)
        for owner, slots in sorted(by_owner.items()):
            node = smap.nodes[owner]
            return slots[:_CHUNK], node.id, node.endpoint
        return None

    def _still_mine(self, chunk: list[int], owner: str) -> bool:
        """The latest map still has us handing every slot of ``chunk`` to ``owner``."""
        smap = self.map
        me = smap.index_of(self.node_id) if smap is not None else -1
        return smap is not None and me >= 0 and all(
            smap.handoff.get(slot) == me and smap.nodes[smap.owners[slot]].id == owner for slot in chunk)

    async def _hand_off(self) -> None:
        """One chunk at a time, never interrupted by a newer map (a chunk cut short could lose the
        entries it had taken); each chunk is chosen from the latest map."""
        while True:
            with contextlib.suppress(TimeoutError):  # (with a report owed: try it again soon)
                await asyncio.wait_for(self.handoff_wake.wait(), _RETRY_S * 4 if self.unreported else None)
            self.handoff_wake.clear()
            if self.unreported and self.map is not None:
                await self._report(self.map)
            while (step := self._next_chunk()) is not None:
                chunk, owner, endpoint = step
                try:
                    moved = await self._move(chunk, owner, self._peer(endpoint))
                except (TimeoutError, SharddError) as exc:
                    log.warning("handoff of %d slots to %s failed (%s); they stay frozen here until the "
                                "map changes", len(chunk), owner, exc)
                    await asyncio.sleep(_RETRY_S)
                    break
                for slot in chunk:
                    self.moved[slot] = owner
                assert self.map is not None
                await self._report(self.map)
                log.info("handed %d slots (%d keys) to %s", len(chunk), moved, owner)

    async def _move(self, chunk: list[int], owner: str, peer: AsyncClient) -> int:
        """One chunk, in the order that keeps every acknowledged write (Rule 3)."""
        await self._router(p.SlotFreeze(chunk))
        if any(self.begun.get(slot) != owner for slot in chunk):
            # The new owner empties them first, once: a retry after a failure part-way must not
            # delete entries already taken from here and stored there.
            await peer._call(p.SlotImport(chunk, [], False), _identity)
            self.begun.update(dict.fromkeys(chunk, owner))
        moved = 0
        while True:
            if not self._still_mine(chunk, owner):
                raise SharddError(f"the map no longer hands these slots to {owner}")
            taken = await self._router(p.SlotTake(chunk, _TAKE_LIMIT))
            entries = [tuple(entry) for entry in taken["entries"]]
            if entries:
                await peer._call(p.SlotImport([], entries, False), _identity)
                moved += len(entries)
            if not taken["more"]:
                break
        # The new owner adopts only slots its own map already gives it: until its agent has
        # installed this map, ask again (it will, or the map changes and resets the chunk).
        deadline = time.monotonic() + 30.0
        while True:
            adopted = await peer._call(p.SlotImport(chunk, [], True), _identity)
            if adopted["adopted"] == len(chunk):
                break
            if time.monotonic() > deadline or not self._still_mine(chunk, owner):
                raise SharddError(f"{owner} did not adopt the slots (its map is older)")
            await asyncio.sleep(0.02)
        await self._router(p.SlotGive(chunk))
        return moved

    async def _report(self, smap: SlotMap) -> None:
        """Tell the controller which handoffs are finished. If etcd cannot take it now, the
        chunks stay recorded here (given away, answered MOVED) and are reported with the next
        chunk or the next map: an etcd outage delays the map, it must not end the agent."""
        done = Done(sorted(self.moved.items()), smap.epoch)
        try:
            await self.coord.put(f"done/{self.node_id}", done.to_json())
        except SharddError as exc:
            log.warning("cannot report finished handoffs to etcd (%s); will again", exc)
            self.unreported = True
        else:
            self.unreported = False

    # --- replication (replicas = 1) ----------------------------------------------------------

    def _replicated(self, smap: SlotMap) -> dict[int, tuple[str, int, str]]:
        """Slots this node is the authority of that have a replica: slot → (id, lease, endpoint)."""
        me = smap.index_of(self.node_id)
        if me < 0 or not smap.replicas:
            return {}
        wanted = {}
        for slot, owner in enumerate(smap.owners):
            source = smap.handoff.get(slot)
            if (owner == me and source is None) or source == me:
                replica = smap.replicas[slot]
                if replica >= 0 and replica != me:
                    node = smap.nodes[replica]
                    wanted[slot] = (node.id, node.lease, node.endpoint)
        return wanted

    async def _replicate(self) -> None:
        """Stream every write to its slot's replica (Rule 4): first a copy of each slot whose
        replica is new (or a new incarnation), then, in a loop, the keys written since the last
        pull, as they are now. One task does both, so the replica applies them in read order."""
        while True:
            smap = self.map
            if smap is None or not smap.replicas or not self._serving():
                self.synced.clear()
                await asyncio.sleep(0.05)
                continue
            try:
                await self._sync_replicas(smap)
                pulled = await self._router(p.ReplPull(_TAKE_LIMIT))
                if pulled["overflow"]:
                    log.warning("too many keys written before they could be streamed; copying every slot again")
                    self.synced.clear()
                await self._stream(smap, pulled)
            except (TimeoutError, SharddError) as exc:
                log.warning("replication step failed (%s); retrying", exc)
                self.synced.clear()  # the replica may have missed some: copy again
                await asyncio.sleep(_RETRY_S)
                continue
            if not pulled["entries"] and not pulled["deleted"]:
                await asyncio.sleep(_REPL_IDLE_S)

    async def _sync_replicas(self, smap: SlotMap) -> None:
        wanted = self._replicated(smap)
        for slot in [slot for slot in self.synced if slot not in wanted]:
            del self.synced[slot]
        stale: dict[tuple[str, int, str], list[int]] = {}
        for slot, replica in wanted.items():
            if self.synced.get(slot) != replica[:2]:
                stale.setdefault(replica, []).append(slot)
        for (node_id, lease, endpoint), slots in stale.items():
            peer = self._peer(endpoint)
            copied = 0
            for at in range(0, len(slots), _CHUNK):
                chunk = slots[at:at + _CHUNK]
                await peer._call(p.SlotImport(chunk, [], False), _identity)  # empty its old copy
                while True:
                    part = await self._router(p.SlotCopy(chunk, _TAKE_LIMIT))
                    entries = [tuple(entry) for entry in part["entries"]]
                    if entries:
                        await peer._call(p.ReplApply(entries, []), _identity)
                        copied += len(entries)
                    if not part["more"]:
                        break
                for slot in chunk:
                    self.synced[slot] = (node_id, lease)
            log.info("replica %s has a copy of %d slots (%d keys)", node_id, len(slots), copied)

    async def _stream(self, smap: SlotMap, pulled: dict[str, Any]) -> None:
        """Send each pulled key's state to its slot's replica (slots not copied yet are skipped:
        their copy, made after this read, carries it)."""
        by_peer: dict[str, tuple[list[Any], list[bytes]]] = {}
        for entry in pulled["entries"]:
            target = self._replica_endpoint(smap, entry[0])
            if target is not None:
                by_peer.setdefault(target, ([], []))[0].append(tuple(entry))
        for key in pulled["deleted"]:
            target = self._replica_endpoint(smap, key)
            if target is not None:
                by_peer.setdefault(target, ([], []))[1].append(key)
        for endpoint, (entries, deleted) in by_peer.items():
            await self._peer(endpoint)._call(p.ReplApply(entries, deleted), _identity)

    def _replica_endpoint(self, smap: SlotMap, key: bytes) -> str | None:
        slot = slot_of(key)
        if slot not in self.synced:
            return None
        replica = smap.replicas[slot]
        return smap.nodes[replica].endpoint if replica >= 0 else None

    # --- leaving ----------------------------------------------------------------------

    def _has_slots(self) -> bool:
        smap = self.map
        if smap is None:
            return False
        me = smap.index_of(self.node_id)
        return me >= 0 and (me in smap.owners or me in smap.handoff.values())

    def _others_live(self) -> bool:
        return any(member.state == "up" for node_id, member in self._members().items() if node_id != self.node_id)

    async def _leave(self) -> None:
        self.state = "leaving"
        log.warning("leaving the cluster: handing this node's slots to the other members")
        deadline = time.monotonic() + self.config.cluster_leave_timeout
        while time.monotonic() < deadline:
            try:
                if self.lease:
                    await self.coord.put(f"members/{self.node_id}", self._member(), lease=True)
                    break
            except SharddError as exc:
                log.warning("cannot mark this node leaving: %s", exc)
            await asyncio.sleep(_RETRY_S)
        while time.monotonic() < deadline and self._has_slots() and self._others_live():
            await asyncio.sleep(0.05)
        if self._has_slots() and self._others_live():
            log.error("leave timed out after %.0f s with slots still here; their keys are lost",
                      self.config.cluster_leave_timeout)
        with contextlib.suppress(SharddError):
            await self.coord.revoke()
        log.info("left the cluster")

    # --- the process --------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.leaving.set)
        loop.add_signal_handler(signal.SIGINT, lambda: None)  # the supervisor orders the stop
        while True:  # a node whose etcd is down serves nothing ("cluster: no slot map yet") and waits
            try:
                await self.coord.connect()
                break
            except SharddError as exc:
                log.warning("cannot reach etcd (%s); retrying", exc)
                try:
                    await asyncio.wait_for(self.leaving.wait(), _RETRY_S * 4)
                    return ExitCode.OK  # asked to leave a cluster it never reached
                except TimeoutError:
                    pass
        jobs = (self._keep_lease, self._watch, self._react, self._hand_off, self._replicate)
        tasks = [asyncio.create_task(job()) for job in jobs]
        leave = asyncio.create_task(self.leaving.wait())
        done, _ = await asyncio.wait([*tasks, leave], return_when=asyncio.FIRST_COMPLETED)
        code = ExitCode.OK
        for task in done:
            if task is not leave and task.exception() is not None:
                log.error("cluster agent failed: %r", task.exception())
                code = ExitCode.CHILD_FAILED
        if leave in done:
            await self._leave()
        for task in [*tasks, leave]:
            task.cancel()
        with contextlib.suppress(Exception):
            await self.coord.close()
        for client in [self.router, *self.peers.values()]:
            with contextlib.suppress(Exception):
                await client.aclose()
        return code


def run_agent(config: Config) -> int:
    """The cluster agent process's entry point (the supervisor starts it in cluster mode)."""
    setup_logging(config.log_level, "cluster")
    try:
        agent = Agent(config)
    except SharddError as exc:
        log.error("%s", exc)
        return ExitCode.CONFIG
    log.info("cluster agent for node %s (cluster %s, etcd %s, pid %d)", agent.node_id, config.cluster_name,
             ", ".join(config.cluster_etcd), os.getpid())
    return asyncio.run(agent.run())
