"""The cluster's only link to etcd: leases, keys, compare-and-swap and prefix watches (asyncio).

docs/cluster.md says what the cluster keeps in etcd; this module is the plumbing under it, with
no cluster logic of its own. The cluster agent (one asyncio process per node) holds one
``Coordinator``: it registers its member key on a lease, keeps the lease alive, campaigns for
controller with ``create``, publishes the slot map with ``cas`` and follows members and the map
with ``watch``.

Theory of operation
-------------------
A Coordinator talks to one etcd endpoint at a time through an ``aetcd.Client`` (one gRPC
channel); every key it names is relative to its ``prefix``, which ends with "/" so that one
cluster's prefix never covers another's. It holds at most one lease, its own: ``grant()``
takes one, ``keepalive()`` refreshes it once (the caller paces the refreshes, and learns from
``None`` that the lease is gone), ``revoke()`` ends it, and ``put``/``create`` with
``lease=True`` bind a key to it so that etcd deletes the key when the lease ends.

``watch(sub)`` is a list-then-watch loop, as Kubernetes' reflectors do: list every key under
the prefix at revision R, watch from R + 1 (so no change between the two is missed), apply each
batch of events to the listed snapshot and yield the snapshot again. Each watch has its own
client (gRPC channel): a broken stream (etcd restarted or killed, connection lost) is then
dropped whole, channel and all, and the loop lists and watches again on a fresh one, with a
bounded backoff, until the Coordinator is closed. aetcd's watch stream is shared by all the
watches of a client and its recovery state is internal; one client per watch keeps a failure
of one from touching another, or the lease calls.

Rules
-----
Rule 1: no call waits on etcd longer than ``timeout`` (+ a small grace for the event loop):
        gRPC carries the deadline to etcd, and an asyncio timeout guards the rest (a
        connect, a channel that never answers). Every failure to reach etcd, or an error
        reply, is raised as ``CoordError`` naming the endpoint; nothing from aetcd or gRPC
        leaks to callers.
Rule 2: a watch ends only when the Coordinator is closed or its consumer stops iterating;
        while etcd is unreachable it keeps retrying and yields nothing (the lease, not the
        watch, tells a node it is cut off). Each snapshot is what etcd held under the prefix
        at the revision yielded with it, and one is yielded only when the keys or values
        differ from the last one (events already queued are applied together: one snapshot).
Rule 3: with several endpoints, a call that could not reach etcd moves the Coordinator to
        the next endpoint for the calls after it; the failed call is not retried (a retried
        ``cas`` or ``create`` could report the caller's own success as a conflict). The old
        channel is closed only after calls in flight on it have had their timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from shardd.errors import ConfigError, SharddError

__all__ = ["CoordError", "Coordinator", "LeaseLost"]

log = logging.getLogger("shardd.coord")

T = TypeVar("T")

# The asyncio guard of Rule 1 fires this long after gRPC's own deadline, so that a call etcd
# answers late is reported by gRPC (with etcd's reason) rather than cut by the guard.
_GRACE_S = 0.5
# Watch re-establishment backoff: fast for a blip, capped so that a watch resumes within ~2 s
# of etcd coming back (less than the shortest lease), jittered so nodes do not re-list together.
_BACKOFF_MIN_S = 0.1
_BACKOFF_MAX_S = 2.0
# gRPC channel options. Keepalive pings detect a peer that vanished without closing the TCP
# connection (host down, etcd frozen), which would otherwise leave an idle watch waiting
# forever; etcd refuses pings more often than every 5 s (its --grpc-keepalive-min-time) with
# GOAWAY, hence 10 s. Pings continue on an idle stream (max_pings_without_data 0: no limit).
# Reconnect backoff capped at 1 s: gRPC's default grows to 120 s, far past any lease.
_GRPC_OPTIONS = {
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.max_reconnect_backoff_ms": 1_000,
}
_NEEDS_AETCD = "cluster mode needs the aetcd package: pip install 'shardd[cluster]'"


class CoordError(SharddError):
    """Raised when etcd could not be reached in time, or answered an etcd call with an error.

    The message names the endpoint. Callers retry or give up; the Coordinator stays usable.
    """


class LeaseLost(CoordError):
    """Raised when a key is to be bound to the Coordinator's lease and there is none alive:
    never granted, revoked, or expired in etcd (keepalives came too late). ``grant()`` anew."""


def _import_aetcd() -> Any:
    """aetcd, imported on first use: a single-node daemon or a client never needs it."""
    try:
        import aetcd
    except ImportError as e:
        raise ConfigError(_NEEDS_AETCD) from e
    return aetcd


def _parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``http://host:port`` (or bare ``host:port``) → (host, port); TLS is not supported yet."""
    url = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    if url.scheme != "http":
        raise ConfigError(f"etcd endpoint {endpoint!r}: only http:// endpoints are supported")
    try:
        port = url.port
    except ValueError:
        port = None
    if not url.hostname or port is None or url.path not in ("", "/"):
        raise ConfigError(f"etcd endpoint {endpoint!r}: expected http://HOST:PORT")
    return url.hostname, port


def _prefix_end(prefix: bytes) -> bytes:
    """The range end covering every key that starts with ``prefix`` (etcd's convention)."""
    b = bytearray(prefix)
    for i in reversed(range(len(b))):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\0"  # all 0xff: "every key from prefix on"


class Coordinator:
    """One node's connection to etcd: a lease, keys under ``prefix``, CAS and watches.

    ``endpoints``: etcd client URLs (``http://host:port``), tried in order. ``prefix``: the
    cluster's key prefix, ending with "/" (e.g. ``/shardd/mycluster/``). ``ttl``: the lease
    TTL in seconds (etcd's shortest is 2). ``timeout``: the deadline of every call; default
    ttl/3 within [1, 5] s, because a keepalive slower than a third of the TTL cannot keep a
    lease reliably anyway.
    """

    def __init__(self, endpoints: list[str], prefix: str, ttl: int, timeout: float | None = None) -> None:
        if isinstance(endpoints, str) or not endpoints:
            raise ConfigError("etcd endpoints: expected a non-empty list of http://HOST:PORT")
        self._addrs = [_parse_endpoint(e) for e in endpoints]
        self.endpoints = list(endpoints)
        if not prefix.startswith("/") or not prefix.endswith("/") or prefix == "/":
            raise ConfigError(f"etcd prefix {prefix!r}: expected /NAME/…/, with a leading and trailing '/'")
        if not isinstance(ttl, int) or ttl < 2:
            raise ConfigError(f"lease TTL {ttl!r}: expected an integer of at least 2 s (etcd's shortest lease)")
        self.prefix = prefix
        self.ttl = ttl
        self.timeout = float(timeout) if timeout is not None else min(5.0, max(1.0, ttl / 3))
        if self.timeout <= 0:
            raise ConfigError(f"etcd timeout {timeout!r}: expected a positive number of seconds")
        self._aetcd = _import_aetcd()  # fail at construction, not at the first call
        self._prefix_b = prefix.encode()
        self._index = 0              # the endpoint calls go to (Rule 3)
        self._client: Any = None     # the aetcd.Client of calls; None before connect()
        self._lease_id: int | None = None
        self._closed = False
        self._closing = asyncio.Event()
        self._aux: set[Any] = set()  # watch clients and retired clients, closed by close()
        self._tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references

    # --- connection ------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The endpoint calls go to now."""
        return self.endpoints[self._index]

    @property
    def lease_id(self) -> int | None:
        """The lease this Coordinator holds (as far as it knows), or None."""
        return self._lease_id

    def _new_client(self, index: int) -> Any:
        host, port = self._addrs[index]
        # aetcd's timeout is the gRPC deadline of each call and of a watch's creation.
        return self._aetcd.Client(host, port, timeout=self.timeout, options=dict(_GRPC_OPTIONS))

    async def connect(self) -> None:
        """Reach etcd: the first endpoint that answers a read, in order, becomes current.

        Raises CoordError naming every endpoint if none answers within the timeout.
        """
        if self._closed:
            raise CoordError("etcd coordinator is closed")
        if self._client is not None:
            return
        failures = []
        for step in range(len(self.endpoints)):
            index = (self._index + step) % len(self.endpoints)
            client = self._new_client(index)
            try:
                async with asyncio.timeout(self.timeout + _GRACE_S):
                    await client.get(self._prefix_b)
            except (self._aetcd.ClientError, TimeoutError) as e:
                failures.append(f"{self.endpoints[index]}: {_reason(e)}")
                await _close_quietly(client)
                continue
            self._index, self._client = index, client
            return
        raise CoordError(f"etcd unreachable within {self.timeout:g} s ({'; '.join(failures)})")

    async def close(self) -> None:
        """Close every channel; watches end, later calls raise CoordError. Does not revoke the
        lease: a node that exits without revoking is the case the TTL is for."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        clients = [c for c in (self._client, *self._aux) if c is not None]
        self._client = None
        self._aux.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*(_close_quietly(c) for c in clients))

    async def __aenter__(self) -> Coordinator:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, what: str, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``fn(client)`` under Rule 1's deadline; map every failure to CoordError."""
        if self._closed:
            raise CoordError(f"etcd {what}: the coordinator is closed")
        client = self._client
        if client is None:
            raise CoordError(f"etcd {what}: not connected (call connect() first)")
        endpoint = self.endpoint
        aetcd = self._aetcd
        try:
            async with asyncio.timeout(self.timeout + _GRACE_S):
                return await fn(client)
        except aetcd.ClientError as e:
            if "lease not found" in str(e):
                self._lease_id = None
                raise LeaseLost(f"etcd at {endpoint}: {what}: the lease is gone (expired or revoked)") from e
            if isinstance(e, aetcd.ConnectionFailedError | aetcd.ConnectionTimeoutError):
                self._failover(client)
            raise CoordError(f"etcd at {endpoint}: {what} failed: {_reason(e)}") from e
        except TimeoutError as e:
            self._failover(client)
            raise CoordError(f"etcd at {endpoint}: {what}: no answer within {self.timeout:g} s") from e

    def _failover(self, failed: Any) -> None:
        """Rule 3: later calls go to the next endpoint (one endpoint: gRPC reconnects by itself)."""
        if len(self.endpoints) == 1 or failed is not self._client or self._closed:
            return
        self._index = (self._index + 1) % len(self.endpoints)
        self._client = self._new_client(self._index)  # connects lazily, on its first call
        log.warning("etcd: switching to %s", self.endpoint)
        self._aux.add(failed)

        async def retire() -> None:
            await asyncio.sleep(self.timeout + _GRACE_S)
            if failed in self._aux:
                self._aux.discard(failed)
                await _close_quietly(failed)

        # close() closes `failed` itself if it comes first.
        task = asyncio.get_running_loop().create_task(retire())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _key(self, key: str) -> bytes:
        return self._prefix_b + key.encode()

    def _rel(self, key: bytes) -> str:
        return key[len(self._prefix_b):].decode(errors="surrogateescape")

    def _lease_for(self, lease: bool, what: str) -> int:
        if not lease:
            return 0
        if self._lease_id is None:
            raise LeaseLost(f"etcd {what}: no lease (grant() first)")
        return self._lease_id

    # --- lease -----------------------------------------------------------------------------

    async def grant(self) -> tuple[int, int]:
        """A new lease of ``ttl`` seconds; returns (lease id, TTL etcd granted). It replaces the
        one held before (not revoked: it is presumably gone already, or will expire)."""
        lease = await self._call("lease grant", lambda c: c.lease(self.ttl))
        self._lease_id = lease.id
        return lease.id, lease.ttl

    async def keepalive(self) -> int | None:
        """Refresh the lease once: the TTL it has again, or None if etcd no longer has it
        (expired or revoked). Take the send time before calling: the lease is safe until that
        time + the returned TTL, not until now + TTL."""
        lease_id = self._lease_id
        if lease_id is None:
            return None
        reply = await self._call("lease keepalive", lambda c: c.refresh_lease(lease_id))
        # etcd answers a keepalive for an unknown lease with TTL 0 rather than an error.
        if reply is None or reply.TTL <= 0:
            if self._lease_id == lease_id:
                self._lease_id = None
            return None
        return int(reply.TTL)

    async def revoke(self) -> None:
        """End the lease now: etcd deletes every key bound to it at once. No lease: no-op."""
        lease_id = self._lease_id
        if lease_id is None:
            return
        with contextlib.suppress(LeaseLost):  # already gone is what we wanted
            await self._call("lease revoke", lambda c: c.revoke_lease(lease_id))
        if self._lease_id == lease_id:
            self._lease_id = None

    # --- keys ------------------------------------------------------------------------------

    async def put(self, key: str, value: bytes, lease: bool = False) -> int:
        """Set ``key`` (bound to the lease if ``lease``); returns its new mod revision."""
        lease_id = self._lease_for(lease, f"put {key}")
        reply = await self._call(f"put {key}", lambda c: c.put(self._key(key), value, lease=lease_id))
        return int(reply.header.revision)

    async def delete(self, key: str) -> bool:
        """Delete ``key``; True if it existed."""
        reply = await self._call(f"delete {key}", lambda c: c.delete(self._key(key)))
        return reply is not None

    async def get(self, key: str) -> tuple[bytes, int] | None:
        """(value, mod revision) of ``key``, or None if absent."""
        reply = await self._call(f"get {key}", lambda c: c.get(self._key(key)))
        if reply is None:
            return None
        return bytes(reply.value), int(reply.mod_revision)

    async def cas(self, key: str, value: bytes, mod_revision: int) -> bool:
        """Set ``key`` to ``value`` only if its mod revision is still ``mod_revision`` (0: only
        if it does not exist). True if it was set."""
        return await self._txn(f"cas {key}", key, value, "mod", mod_revision, 0)

    async def create(self, key: str, value: bytes, lease: bool = True) -> bool:
        """Set ``key`` only if it does not exist (bound to the lease by default: campaigning).
        True if this call created it."""
        lease_id = self._lease_for(lease, f"create {key}")
        return await self._txn(f"create {key}", key, value, "create", 0, lease_id)

    async def _txn(self, what: str, key: str, value: bytes, target: str, revision: int, lease_id: int) -> bool:
        k = self._key(key)

        async def txn(c: Any) -> bool:
            t = c.transactions
            # A missing key has create and mod revision 0 in etcd's comparisons, so
            # "mod == 0" and "create == 0" both mean "absent".
            compare = (t.mod(k) == revision) if target == "mod" else (t.create(k) == revision)
            ok, _ = await c.transaction(compare=[compare], success=[t.put(k, value, lease=lease_id)], failure=[])
            return bool(ok)

        return await self._call(what, txn)

    async def get_prefix(self, sub: str = "") -> tuple[dict[str, bytes], int]:
        """Every key under prefix + ``sub`` (named relative to the prefix) with its value, and
        the store revision they were read at."""
        return await self._call(f"list {sub or '/'}", lambda c: self._list(c, sub))

    async def _list(self, client: Any, sub: str) -> tuple[dict[str, bytes], int]:
        start = self._key(sub)
        reply = await client.get_range(start, _prefix_end(start))
        return {self._rel(kv.key): bytes(kv.value) for kv in reply.kvs}, int(reply.header.revision)

    # --- watch -----------------------------------------------------------------------------

    async def watch(self, sub: str = "") -> AsyncIterator[tuple[dict[str, bytes], int]]:
        """Yield (every key under prefix + ``sub`` → value, revision): at once, then after each
        change, across etcd restarts, until the Coordinator is closed (Rule 2). Keys are
        relative to the prefix. Each yield is a fresh dict the consumer may keep."""
        if self._closed:
            raise CoordError("etcd watch: the coordinator is closed")
        start = self._key(sub)
        end = _prefix_end(start)
        index = self._index
        delay, failures = _BACKOFF_MIN_S, 0
        last: dict[str, bytes] | None = None
        while not self._closed:
            client = self._new_client(index)
            self._aux.add(client)
            pump: asyncio.Task[None] | None = None
            try:
                try:
                    async with asyncio.timeout(self.timeout + _GRACE_S):
                        snapshot, revision = await self._list(client, sub)
                        # From R + 1: every change after the listed state, none twice.
                        handle = await client.watch(start, range_end=end, start_revision=revision + 1)
                except Exception as e:  # whatever it was, Rule 2: retry (and say why)
                    # Once per outage at WARNING, not every retry: etcd may be down for long.
                    log.log(logging.WARNING if failures == 0 else logging.DEBUG,
                            "etcd at %s: watch %s not (re)established: %s; retrying every <= %g s",
                            self.endpoints[index], sub or "/", _reason(e), _BACKOFF_MAX_S)
                    failures += 1
                    index = (index + 1) % len(self.endpoints)
                    await self._backoff(delay)
                    delay = min(delay * 2, _BACKOFF_MAX_S)
                    continue
                if failures:
                    log.warning("etcd at %s: watch %s resumed after %d failed attempts",
                                self.endpoints[index], sub or "/", failures)
                delay, failures = _BACKOFF_MIN_S, 0
                events: asyncio.Queue[Any] = asyncio.Queue()
                pump = asyncio.get_running_loop().create_task(_pump(handle, events))
                if snapshot != last:
                    last = dict(snapshot)  # a copy: `snapshot` is updated in place below
                    yield dict(snapshot), revision
                while True:
                    batch = [await events.get()]
                    while not events.empty():  # coalesce what is already queued (Rule 2)
                        batch.append(events.get_nowait())
                    broken: BaseException | None = None
                    for item in batch:
                        if isinstance(item, BaseException):
                            broken = item
                            break
                        name = self._rel(item.kv.key)
                        if item.kind == "PUT":
                            snapshot[name] = bytes(item.kv.value)
                        else:
                            snapshot.pop(name, None)
                        revision = max(revision, int(item.kv.mod_revision))
                    if snapshot != last:
                        last = dict(snapshot)
                        yield dict(snapshot), revision
                    if broken is not None:
                        break
                if self._closed:
                    return
                log.warning("etcd at %s: watch %s broke (%s); listing and watching again",
                            self.endpoints[index], sub or "/", _reason(broken))
                await self._backoff(_BACKOFF_MIN_S)  # etcd may be restarting: no hot loop
            finally:
                if pump is not None:
                    pump.cancel()
                    with contextlib.suppress(BaseException):
                        await pump
                self._aux.discard(client)
                await _close_quietly(client)

    async def _backoff(self, delay: float) -> None:
        """Sleep ``delay`` ± 25 % jitter, or until close()."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay * random.uniform(0.75, 1.25)):
                await self._closing.wait()


class _StreamEnded(Exception):
    """The watch stream ended without an error (its channel was closed)."""


async def _pump(handle: Any, events: asyncio.Queue[Any]) -> None:
    """Move a watch's events to ``events``; its end, error or not, as one exception item."""
    try:
        async for event in handle:
            events.put_nowait(event)
        events.put_nowait(_StreamEnded("the watch stream ended"))
    except asyncio.CancelledError:
        raise
    except Exception as e:
        events.put_nowait(e)


async def _close_quietly(client: Any) -> None:
    """Close an aetcd client, never raising nor hanging (its peer may be gone)."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2.0):
            await client.close()


def _reason(e: BaseException | None) -> str:
    if isinstance(e, TimeoutError) and not str(e):
        return "timed out"
    return str(e) or type(e).__name__
