"""The shardd wire protocol, sans-IO: bytes in, typed messages out, no socket in sight.

Theory of operation
-------------------
A client sends one ZeroMQ frame per request; the frame is a msgpack array
``[version, id, op]`` (an :class:`Envelope`) whose ``op`` is itself an array
``[name, arg...]`` (one of the tagged Structs below). The daemon answers each request
with one frame ``[id, status, value]`` (a :class:`Reply`). Ids are chosen by the client
and echoed back, so a client may pipeline many requests on one socket and match replies
by id. docs/protocol.md is the full, language-neutral description; this module is the
reference implementation and must agree with it.

Inside the daemon, the router forwards requests to a worker in a :class:`Batch`
``[seq, [envelope...]]`` and the worker answers with one :class:`BatchReply`
``[seq, [reply...]]`` whose replies are in the same order. The router forwards a
client's envelope bytes untouched and relays the worker's reply bytes untouched, so a
single-key request is decoded once by the router (to place it) and once by the worker.

Rules
-----
Rule 1: decoding never raises to the caller's loop. ``decode_envelope`` returns either an
        Envelope or a ready-to-send error Reply that names the problem.
Rule 2: a request that fails validation changes nothing.
Rule 3: keys and values are msgpack ``bin`` (bytes). Str keys are a client-side
        convenience; on the wire they are already UTF-8 bytes.
Rule 4: statuses and their meaning never change within a protocol version; new ops and
        new statuses may be added, and a peer must treat an unknown status as an error.
Rule 5: every op of the ``Op`` union has one entry in the op table ``OPS`` saying what it is
        (kind, write, admin-only, direct, control-only, what it does during a resize); the
        router, the workers, authentication and maintenance mode decide from that entry alone.
        An op without one fails at import.

Why this module is over 500 lines: the wire Structs, their op table and the frame checks are
one contract, and docs/protocol.md is checked against this one file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec

from shardd.errors import (
    BadRequest,
    Busy,
    Forbidden,
    InternalError,
    Moved,
    NotInteger,
    OutOfMemory,
    TooLarge,
    TryAgain,
    Unavailable,
    UnsupportedVersion,
)
from shardd.errors import Maintenance as MaintenanceError
from shardd.hashing import MAX_SHARDS

PROTOCOL_VERSION = 1

# Wire status codes. OK is the only success; the rest mirror shardd.errors.
OK = 0
BAD_REQUEST = BadRequest.status
UNSUPPORTED_VERSION = UnsupportedVersion.status
TOO_LARGE = TooLarge.status
BUSY = Busy.status
UNAVAILABLE = Unavailable.status
NOT_INTEGER = NotInteger.status
INTERNAL_ERROR = InternalError.status
OUT_OF_MEMORY = OutOfMemory.status
MAINTENANCE = MaintenanceError.status
MOVED = Moved.status
FORBIDDEN = Forbidden.status
TRYAGAIN = TryAgain.status

# SET conditions (memcached add/replace, Redis NX/XX).
ALWAYS = 0
IF_ABSENT = 1
IF_PRESENT = 2

SetCondition = Literal[0, 1, 2]

# expire_if conditions (Redis EXPIRE NX / XX / GT / LT). A key without a TTL has an infinite
# deadline: GT never applies to it, LT always does (as in Redis).
EXPIRE_ALWAYS = 0
EXPIRE_NX = 1  # only if the key has no TTL
EXPIRE_XX = 2  # only if it has one
EXPIRE_GT = 3  # only if the new deadline is later than the current one
EXPIRE_LT = 4  # only if it is earlier
EXPIRE_XX_LT = 5  # only if it has one and the new deadline is earlier (Redis EXPIRE ... XX LT)

# The longest TTL a request may ask for: 2**53 - 1 ms (~285,000 years). It keeps ``ttl``
# replies and expiry times far inside int64, and exact as a double (JavaScript's
# Number.MAX_SAFE_INTEGER), so no client needs a big integer type for a TTL.
MAX_TTL_MS = (1 << 53) - 1

_force_setattr = msgspec.structs.force_setattr  # for __post_init__ of frozen ops: nil → default


class _Op(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """Base of every op: an array whose first element is the op name.

    Extra trailing arguments are rejected, not ignored: a server that does not know a newer
    optional argument must say so rather than silently drop it.

    Optional arguments may be left out or sent as nil, and both mean the default (clients in
    typed languages send fixed-arity arrays with nil placeholders). Where the default is not
    nil itself, the field is typed ``X | None`` and ``__post_init__`` (which msgspec runs on
    decode and on construction) puts the default in place of nil, so no consumer ever sees
    None there. Only ops that have such a field pay for it (~60 ns per decode).
    """


# --- single-key ops -----------------------------------------------------------------


class Get(_Op, tag="get"):
    key: bytes


class Set(_Op, tag="set"):
    key: bytes
    value: bytes
    ttl_ms: int | None = None
    cond: SetCondition | None = ALWAYS  # nil on the wire: ALWAYS (see _Op)

    def __post_init__(self) -> None:
        if self.cond is None:
            _force_setattr(self, "cond", ALWAYS)


class Delete(_Op, tag="delete"):
    key: bytes


class Exists(_Op, tag="exists"):
    key: bytes


class Expire(_Op, tag="expire"):
    key: bytes
    ttl_ms: int


class Ttl(_Op, tag="ttl"):
    key: bytes


class Persist(_Op, tag="persist"):
    key: bytes


class Incr(_Op, tag="incr"):
    key: bytes
    delta: int | None = 1  # nil on the wire: 1

    def __post_init__(self) -> None:
        if self.delta is None:
            _force_setattr(self, "delta", 1)


class Append(_Op, tag="append"):
    """Append ``value`` to the value at ``key`` (a missing key is created, as Redis APPEND); the new length."""

    key: bytes
    value: bytes


class GetDel(_Op, tag="getdel"):
    """The value at ``key`` (nil if missing), deleting it in the same step (Redis GETDEL)."""

    key: bytes


class Touch(_Op, tag="touch"):
    """Whether ``key`` exists; counts as an access (LRU/LFU), and with ``ttl_ms`` also sets its TTL
    (memcached touch). nil or absent ``ttl_ms``: the TTL is left as it is."""

    key: bytes
    ttl_ms: int | None = None


class Gets(_Op, tag="gets"):
    key: bytes


class Cas(_Op, tag="cas"):
    key: bytes
    value: bytes
    version: int
    ttl_ms: int | None = None


# Redis-exact variants (for a RESP endpoint): each is one atomic step on the key's owner.


class SetGet(_Op, tag="setget"):
    """``set`` under ``cond`` that answers the value it replaced, nil if the key was missing, whether
    or not it stored (Redis ``SET … [NX|XX] GET``, ``GETSET``). ``keep_ttl``: the key keeps its TTL
    (``KEEPTTL``; only with ``ttl_ms`` nil); otherwise no ``ttl_ms`` clears it, as ``set`` does."""

    key: bytes
    value: bytes
    ttl_ms: int | None = None
    cond: SetCondition | None = ALWAYS  # nil on the wire: ALWAYS
    keep_ttl: bool | None = False  # nil on the wire: false

    def __post_init__(self) -> None:
        if self.cond is None:
            _force_setattr(self, "cond", ALWAYS)
        if self.keep_ttl is None:
            _force_setattr(self, "keep_ttl", False)


class ExpireIf(_Op, tag="expire_if"):
    """Give ``key`` a TTL of ``ttl_ms`` if ``when`` (EXPIRE_*) allows it; whether it did. ``ttl_ms`` <= 0
    deletes the key when the condition holds (Redis EXPIRE with a time in the past)."""

    key: bytes
    ttl_ms: int
    when: int | None = EXPIRE_ALWAYS  # nil on the wire: EXPIRE_ALWAYS

    def __post_init__(self) -> None:
        if self.when is None:
            _force_setattr(self, "when", EXPIRE_ALWAYS)


class GetEx(_Op, tag="getex"):
    """The value at ``key`` (nil if missing), with its TTL changed in the same step (Redis GETEX):
    ``ttl_ms`` > 0 from now, <= 0 deletes the key after reading it, ``persist`` removes the TTL."""

    key: bytes
    ttl_ms: int | None = None
    persist: bool | None = False  # nil on the wire: false

    def __post_init__(self) -> None:
        if self.persist is None:
            _force_setattr(self, "persist", False)


class Strlen(_Op, tag="strlen"):
    """The length of the value at ``key`` as written, 0 if missing (Redis STRLEN)."""

    key: bytes


class NearGet(_Op, tag="near_get"):
    """A GET from a client with a near cache (docs/near-cache.md). The reply's value is
    ``[value, lease_ms, shard, incarnation, seq]``: ``lease_ms`` > 0 says the key is hot and the
    client may keep the value that long unless an invalidation from ``shard`` (publisher
    ``incarnation``) with a sequence number above ``seq`` names it first; 0: do not keep it.
    ``hits``: how many reads of ``key`` the client answered from its copy since it last asked,
    so the shard counts the key's real demand (a cached hot key must not look cold)."""

    key: bytes
    hits: int | None = 0  # nil on the wire: 0

    def __post_init__(self) -> None:
        if self.hits is None:
            _force_setattr(self, "hits", 0)


# --- multi-key ops (split per shard by the router) --------------------------------


class GetMany(_Op, tag="get_many"):
    keys: list[bytes]


class SetMany(_Op, tag="set_many"):
    items: list[tuple[bytes, bytes]]
    ttl_ms: int | None = None


class DeleteMany(_Op, tag="delete_many"):
    keys: list[bytes]


class SetManyNx(_Op, tag="set_many_nx"):
    """Store every pair only if none of the keys is live, all or nothing (Redis MSETNX); whether it
    stored. Not split: every key must be on one shard (BAD_REQUEST otherwise), where it is one step."""

    items: list[tuple[bytes, bytes]]
    ttl_ms: int | None = None


class Scan(_Op, tag="scan"):
    """Shard ``shard``'s keys, a few at a time (keyscan): ``[next_cursor (0: done), [key, ...]]``.
    ``cursor`` 0 starts; each call examines up to ``count`` keys and answers those live that match
    the Redis glob ``match`` (nil: all)."""

    shard: int
    cursor: int | None = 0  # nil on the wire: 0
    count: int | None = 10  # nil on the wire: 10 (Redis SCAN's COUNT default)
    match: bytes | None = None

    def __post_init__(self) -> None:
        if self.cursor is None:
            _force_setattr(self, "cursor", 0)
        if self.count is None:
            _force_setattr(self, "count", 10)


# --- admin ops (fanned out to every shard) -----------------------------------------


class Ping(_Op, tag="ping"):
    pass


class Stats(_Op, tag="stats"):
    pass


class Flush(_Op, tag="flush"):
    pass


class Maintenance(_Op, tag="maintenance"):
    """Turn maintenance mode on or off (nil: just report it); writes are refused while on."""

    on: bool | None = None


class Health(_Op, tag="health"):
    """Ping every shard; the router answers within ``deadline_ms`` with each shard's state."""

    deadline_ms: int | None = 1000  # nil on the wire: 1000

    def __post_init__(self) -> None:
        if self.deadline_ms is None:
            _force_setattr(self, "deadline_ms", 1000)


class Configure(_Op, tag="configure"):
    """Apply live settings (config keys → values). Accepted on the control endpoint only."""

    settings: dict[str, Any]


class Topology(_Op, tag="topology"):
    """The placement a client needs: epoch, shard count, hash spec, worker endpoints."""


class Resize(_Op, tag="resize"):
    """Change the number of shards while serving; answered when every moving key has moved."""

    shards: int


class ResizeStart(_Op, tag="resize_start"):
    """Control only (supervisor → router): the workers for ``shards`` are running; migrate."""

    shards: int


class Migrate(_Op, tag="migrate"):
    """Router → every worker: a resize from ``shards`` to ``new_shards`` has begun. Until it ends, a key
    this shard does not hold and will not own is answered MOVED (its new owner has it, or nobody does),
    and on its own endpoint a key it will own but does not hold yet is answered TRYAGAIN until every
    shard that may be sending it has sent its ``migrate_done``."""

    epoch: int
    new_shards: int
    shards: int


class MigrateOut(_Op, tag="migrate_out"):
    """Router → worker: remove and return up to ``limit`` entries that move, scanning at most ``scan`` keys."""

    limit: int | None = 200  # nil on the wire: 200
    scan: int | None = 1000  # nil on the wire: 1000

    def __post_init__(self) -> None:
        if self.limit is None:
            _force_setattr(self, "limit", 200)
        if self.scan is None:
            _force_setattr(self, "scan", 1000)


class MigrateIn(_Op, tag="migrate_in"):
    """Router → worker: adopt entries [key, value, expires_at_ms (monotonic), version] moved from another shard."""

    entries: list[tuple[bytes, bytes, int, int]]


class MigrateDone(_Op, tag="migrate_done"):
    """Router → worker: every entry moving from shard ``source`` to this one has been sent ahead of this."""

    source: int


class SetTopology(_Op, tag="set_topology"):
    """Router → worker: the resize is over; the daemon now has ``shards`` shards at ``epoch``."""

    epoch: int
    shards: int


class SetMaintenance(_Op, tag="set_maintenance"):
    """Router → worker: maintenance mode is ``on`` (or off); a worker's own endpoint then refuses writes too."""

    on: bool


class Describe(_Op, tag="describe"):
    """Router → worker: the worker's own client endpoint (direct mode), pid and shard."""


class Hotkeys(_Op, tag="hotkeys"):
    """The ``top`` most accessed keys of each shard (Space-Saving estimates), merged by the router."""

    top: int | None = 10  # nil on the wire: 10

    def __post_init__(self) -> None:
        if self.top is None:
            _force_setattr(self, "top", 10)


class Tune(_Op, tag="tune"):
    """Change live settings of every shard now: ``mailbox_limit``, ``max_memory``, ``eviction_policy``.

    Values are validated like the config file's; the reply is the settings as applied.
    """

    settings: dict[str, Any]


class Drain(_Op, tag="drain"):
    """Control only: refuse new client requests; answered once nothing is in flight."""


class Snapshot(_Op, tag="snapshot"):
    """Control only: every shard writes its keys to ``directory`` (see shardd.snapshot)."""

    directory: str


# --- cluster ops (docs/cluster.md, "Node-to-node and agent ops") ---------------------


class ClusterSet(_Op, tag="cluster_set"):
    """Control only (the node's cluster agent): install a slot map (``shardd.slots.SlotMap`` as
    builtins) and/or extend the lease: serve nothing at or after ``valid_until`` (monotonic seconds
    on this machine) until the next ``cluster_set``."""

    map: dict[str, Any] | None
    valid_until: float


class SlotFreeze(_Op, tag="slot_freeze"):
    """Control only: answer TRYAGAIN for these slots (a handoff is about to take their entries)."""

    slots: list[int]


class SlotGive(_Op, tag="slot_give"):
    """Control only: these slots were handed to their map owner; answer MOVED for them."""

    slots: list[int]


class SlotTake(_Op, tag="slot_take"):
    """Control only, fanned out: every shard removes and returns up to ``limit`` entries of these
    slots as ``[key, value, ttl_ms (0: none), version]``, with ``more`` when some are left."""

    slots: list[int]
    limit: int | None = 1000  # nil on the wire: 1000

    def __post_init__(self) -> None:
        if self.limit is None:
            _force_setattr(self, "limit", 1000)


class SlotDrop(_Op, tag="slot_drop"):
    """Router → worker: delete every entry of these slots (a slot about to be served from empty)."""

    slots: list[int]


class SlotPut(_Op, tag="slot_put"):
    """Router → worker: store entries handed over by another node: ``[key, value, ttl_ms, version]``,
    and delete the ``deleted`` keys (replication)."""

    entries: list[tuple[bytes, bytes, int, int]]
    deleted: list[bytes] | None = None  # nil on the wire: []

    def __post_init__(self) -> None:
        if self.deleted is None:
            _force_setattr(self, "deleted", [])


class SlotStates(_Op, tag="slot_states"):
    """Router → worker (cluster mode): what the node serves, slot by slot (``ClusterView.export``;
    nil: unchanged) and until when (``valid_until``), so the worker's own endpoint answers as
    the router does."""

    states: dict[str, Any] | None
    valid_until: float


class SlotCopy(_Op, tag="slot_copy"):
    """Control only, fanned out: like ``slot_take`` without removing anything (a replica's first sync)."""

    slots: list[int]
    limit: int | None = 1000  # nil on the wire: 1000

    def __post_init__(self) -> None:
        if self.limit is None:
            _force_setattr(self, "limit", 1000)


class ReplPull(_Op, tag="repl_pull"):
    """Control only: up to ``limit`` keys written since the last pull, as they are now:
    ``{"entries": [[key, value, ttl_ms, version]], "deleted": [key], "overflow": bool}``."""

    limit: int | None = 2000  # nil on the wire: 2000

    def __post_init__(self) -> None:
        if self.limit is None:
            _force_setattr(self, "limit", 2000)


class ReplRead(_Op, tag="repl_read"):
    """Router → worker: these keys as they are now (``repl_pull``)."""

    written: list[bytes]


class ReplApply(_Op, tag="repl_apply"):
    """Node → node (admin): store these entries and delete these keys (this node is their slots' replica)."""

    entries: list[tuple[bytes, bytes, int, int]]
    deleted: list[bytes]


class SlotImport(_Op, tag="slot_import"):
    """Node → node (admin): ``slots`` and not ``adopt``: delete what this node holds for them, then
    store ``entries``; ``adopt``: serve ``slots`` from now on (every entry has been sent)."""

    slots: list[int]
    entries: list[tuple[bytes, bytes, int, int]]
    adopt: bool | None = False  # nil on the wire: false

    def __post_init__(self) -> None:
        if self.adopt is None:
            _force_setattr(self, "adopt", False)


class Leave(_Op, tag="leave"):
    """Admin: hand this node's slots to the other members, then shut the node down (SIGTERM)."""


class DebugSleep(_Op, tag="debug_sleep"):
    """Test-only: make one shard sleep ``ms`` milliseconds. Refused unless enabled in config."""

    shard: int
    ms: int


Op = (
    Get | Set | Delete | Exists | Expire | Ttl | Persist | Incr | Append | GetDel | Touch | Gets | Cas
    | GetMany | SetMany | DeleteMany | Ping | Stats | Flush | DebugSleep | Maintenance | Health | Configure
    | Drain | Snapshot | Hotkeys | Tune | Topology | Resize | ResizeStart | Migrate | MigrateOut | MigrateIn
    | MigrateDone | SetTopology | SetMaintenance | Describe | ClusterSet | SlotFreeze | SlotGive | SlotTake | SlotDrop
    | SlotPut | SlotImport | Leave | SlotCopy | ReplPull | ReplRead | ReplApply | SlotStates | SetGet | ExpireIf
    | GetEx | Strlen | SetManyNx | Scan | NearGet
)


# --- the op table: what each op is, in one place ---------------------------------------
#
# Router, worker, auth and maintenance mode read only this table; nothing else lists ops by
# kind. An op missing from it fails at import (see the check below) and in
# tests/unit/test_op_table.py, which also checks the behaviour each flag promises.

KEYED = "keyed"        # one key: the router sends it to the key's owner; workers apply it
MULTI = "multi"        # several keys: the router splits it per shard and gathers the replies
FANOUT = "fanout"      # every shard applies it; the router gathers the replies
ROUTER = "router"      # the router answers it itself (it may send ops to shards on the way)
INTERNAL = "internal"  # router → worker only: refused from any client, even on the control endpoint

# What an op does while a resize runs (see shardd.migration).
SERVE = "serve"    # nothing special
MOVES = "moves"    # keyed: a shard that no longer holds the key answers MOVED (the router re-routes)
SPLIT = "split"    # multi-key: the router sends one sub-op per key, so each one can move
REFUSE = "refuse"  # cannot be made consistent with entries in transit: BUSY


@dataclass(frozen=True, slots=True)
class OpSpec:
    """What one op is. Checks run in this order, whatever the op: ``internal`` kind,
    ``control``, ``admin``, ``write``, ``resize`` (Router.route).

    kind:    KEYED, MULTI, FANOUT, ROUTER or INTERNAL (above).
    write:   changes data: refused with MAINTENANCE while maintenance mode is on.
    admin:   with authentication on, only admin keys may send it (FORBIDDEN otherwise).
    direct:  a worker's own endpoint (direct mode) accepts it; elsewhere it is BAD_REQUEST there.
    control: accepted on the router's control endpoint only (the supervisor's ops).
    resize:  SERVE, MOVES (every KEYED op), SPLIT (every MULTI op) or REFUSE.
    query:   for an op whose instances may only ask (``maintenance`` with nil, ``touch`` without a
             TTL): true when this instance only reads, and then ``write`` and ``admin`` do not apply.
    """

    kind: str
    write: bool = False
    admin: bool = False
    direct: bool = False
    control: bool = False
    resize: str = SERVE
    query: Callable[[Any], bool] | None = None
    # Derived: a check other than ``write`` applies. The router checks a request only if its op is
    # guarded, or is a write while maintenance mode is on; reads and writes skip the checks otherwise.
    guarded: bool = field(init=False)

    def __post_init__(self) -> None:
        guarded = self.kind == INTERNAL or self.admin or self.control or self.resize == REFUSE
        object.__setattr__(self, "guarded", guarded)
        if self.kind not in (KEYED, MULTI, FANOUT, ROUTER, INTERNAL) or self.resize not in (SERVE, MOVES, SPLIT,
                                                                                           REFUSE):
            raise ValueError(f"bad op spec {self}")
        if (self.kind == KEYED) != (self.resize == MOVES) or (self.kind == MULTI) != (self.resize == SPLIT):
            raise ValueError(f"keyed ops, and only they, answer MOVED mid-resize; multi-key ops, and only they, "
                             f"split: {self}")


_READ = OpSpec(KEYED, direct=True, resize=MOVES)
_WRITE = OpSpec(KEYED, write=True, direct=True, resize=MOVES)

OPS: dict[type, OpSpec] = {
    Get: _READ,
    Exists: _READ,
    Ttl: _READ,
    Gets: _READ,
    Set: _WRITE,
    Delete: _WRITE,
    Expire: _WRITE,
    Persist: _WRITE,
    Incr: _WRITE,
    Cas: _WRITE,
    Append: _WRITE,
    GetDel: _WRITE,
    # touch only refreshes the access time without a TTL (a read); with one it is an expire.
    Touch: OpSpec(KEYED, write=True, direct=True, resize=MOVES, query=lambda op: op.ttl_ms is None),
    SetGet: _WRITE,
    ExpireIf: _WRITE,
    # getex without ttl_ms or persist is a GET with another name.
    GetEx: OpSpec(KEYED, write=True, direct=True, resize=MOVES, query=lambda op: op.ttl_ms is None and not op.persist),
    Strlen: _READ,
    NearGet: _READ,
    GetMany: OpSpec(MULTI, direct=True, resize=SPLIT),
    SetMany: OpSpec(MULTI, write=True, direct=True, resize=SPLIT),
    DeleteMany: OpSpec(MULTI, write=True, direct=True, resize=SPLIT),
    # All or nothing, so never split: the router sends it whole to the one shard of all its keys. Keys in
    # transit mid-resize could be checked on one shard and written on another: refused then.
    SetManyNx: OpSpec(ROUTER, write=True, resize=REFUSE),
    # One shard's keys, by number: the router sends it on (a worker's endpoint has no notion of the number).
    Scan: OpSpec(ROUTER),
    Ping: OpSpec(FANOUT, direct=True),  # a worker's own endpoint answers 1: the one shard behind it
    Stats: OpSpec(FANOUT),
    Health: OpSpec(FANOUT),
    Hotkeys: OpSpec(FANOUT),
    Flush: OpSpec(FANOUT, write=True, admin=True, resize=REFUSE),
    Snapshot: OpSpec(FANOUT, control=True, resize=REFUSE),
    Maintenance: OpSpec(ROUTER, admin=True, query=lambda op: op.on is None),
    Topology: OpSpec(ROUTER),
    Tune: OpSpec(ROUTER, admin=True),
    Resize: OpSpec(ROUTER, admin=True, resize=REFUSE),
    # Test-only, and gated by enable_debug_ops: a worker's own endpoint has no notion of admin keys.
    DebugSleep: OpSpec(ROUTER, admin=True, direct=True),
    Configure: OpSpec(ROUTER, control=True),
    Drain: OpSpec(ROUTER, control=True),
    ResizeStart: OpSpec(ROUTER, control=True),
    Migrate: OpSpec(INTERNAL),
    MigrateOut: OpSpec(INTERNAL),
    MigrateIn: OpSpec(INTERNAL),
    MigrateDone: OpSpec(INTERNAL),
    SetMaintenance: OpSpec(INTERNAL),
    SetTopology: OpSpec(INTERNAL),
    Describe: OpSpec(INTERNAL),
    ClusterSet: OpSpec(ROUTER, control=True),
    SlotFreeze: OpSpec(ROUTER, control=True),
    SlotGive: OpSpec(ROUTER, control=True),
    SlotTake: OpSpec(FANOUT, control=True, resize=REFUSE),
    SlotImport: OpSpec(ROUTER, admin=True, resize=REFUSE),
    Leave: OpSpec(ROUTER, admin=True),
    SlotDrop: OpSpec(INTERNAL),
    SlotPut: OpSpec(INTERNAL),
    SlotCopy: OpSpec(FANOUT, control=True, resize=REFUSE),
    ReplPull: OpSpec(ROUTER, control=True),
    ReplRead: OpSpec(INTERNAL),
    SlotStates: OpSpec(INTERNAL),
    ReplApply: OpSpec(ROUTER, admin=True, resize=REFUSE),
}
if set(OPS) != set(Op.__args__):  # type: ignore[attr-defined]
    raise ImportError(f"ops without a spec in protocol.OPS: {set(Op.__args__) ^ set(OPS)}")  # type: ignore[attr-defined]


def is_write(spec: OpSpec, op: Op) -> bool:
    """Whether this request changes data (what maintenance mode refuses): the op's ``write`` flag,
    unless this instance only asks (``query``)."""
    return spec.write and not (spec.query is not None and spec.query(op))


def ops_where(**flags: Any) -> frozenset[type]:
    """The op classes whose spec has every given field value, e.g. ``ops_where(kind=KEYED)``: a view of OPS."""
    return frozenset(cls for cls, spec in OPS.items() if all(getattr(spec, k) == v for k, v in flags.items()))


# Views of the table for the client library, which places ops before sending them.
SINGLE_KEY_OPS = tuple(cls for cls in OPS if OPS[cls].kind == KEYED)
MULTI_KEY_OPS = tuple(cls for cls in OPS if OPS[cls].kind == MULTI)


# The settings the ``tune`` op accepts: part of the wire contract (docs/protocol.md). Whether a setting
# applies live, and who applies it, is config.SETTINGS, which checks at import that these all do.
TUNABLE = ("mailbox_limit", "max_memory", "eviction_policy")

RequestId = Annotated[int, msgspec.Meta(ge=0)]  # msgpack ints stop at 2**64-1 anyway


class Envelope(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """One request: ``[version, id, op]``; ``id`` is an unsigned 64-bit integer.

    Id 0 is accepted like any other, but it is also the id of an error reply to a request
    whose id could not be read (see :func:`salvage_id`), so a client cannot tell the two
    apart: clients should number from 1. The router's own sub-requests to workers use 0.
    """

    version: int
    id: RequestId
    op: Op


class Reply(msgspec.Struct, array_like=True, frozen=True):
    """One answer: ``[id, status, value]``; on an error status ``value`` is the message (a str).

    The one exception is MOVED, whose value is the map ``{"epoch": int, "shard": int}``.
    """

    id: int
    status: int
    value: Any = None


class Limits(msgspec.Struct, frozen=True):
    """Size limits a request must respect; the daemon's config supplies the values."""

    max_key_bytes: int = 1024
    max_value_bytes: int = 1024 * 1024
    max_message_bytes: int = 16 * 1024 * 1024


class Batch(msgspec.Struct, array_like=True, frozen=True):
    """Router → worker: several envelopes to apply in order, answered by one BatchReply."""

    seq: int
    ops: list[msgspec.Raw]


class BatchReply(msgspec.Struct, array_like=True, frozen=True):
    """Worker → router: the replies to one Batch, in the same order."""

    seq: int
    replies: list[msgspec.Raw]


class Invalidation(msgspec.Struct, array_like=True, frozen=True):
    """Worker → near-cache clients, on its invalidation feed (docs/near-cache.md):
    ``[shard, incarnation, seq, kind, keys]``. ``seq`` counts KEYS and RESET messages of this
    publisher (incarnation: one per worker process); HEARTBEAT repeats the last one, so a client
    that sees a number jump knows it missed something."""

    shard: int
    incarnation: int
    seq: int
    kind: int
    keys: list[bytes] = []


INVALIDATE_KEYS = 0   # drop these keys
INVALIDATE_ALL = 1    # drop every key of this shard (flush, resize, feature off)
HEARTBEAT = 2         # nothing changed; sent periodically and to every new subscriber


# Encoders and decoders are reused: building them is the expensive part.
_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_batch_decoder = msgspec.msgpack.Decoder(Batch)
_batch_reply_decoder = msgspec.msgpack.Decoder(BatchReply)
_loose_decoder = msgspec.msgpack.Decoder()
_invalidation_decoder = msgspec.msgpack.Decoder(Invalidation)
decode_invalidation = _invalidation_decoder.decode

_U64 = (1 << 64) - 1


def encode_request(request_id: int, op: Op) -> bytes:
    """The frame a client sends for ``op``."""
    return _encoder.encode(Envelope(PROTOCOL_VERSION, request_id, op))


def encode_reply(request_id: int, status: int, value: Any = None) -> bytes:
    return _encoder.encode(Reply(request_id, status, value))


def error_reply(request_id: int, exc: BaseException) -> bytes:
    """An error Reply for a shardd ServerError (its status) or any other exception (INTERNAL)."""
    status = getattr(exc, "status", INTERNAL_ERROR)
    return encode_reply(request_id, status if status > 0 else INTERNAL_ERROR, str(exc))


def decode_reply(frame: bytes) -> Reply:
    """Decode a reply frame; raises msgspec.DecodeError/ValidationError if it is not one."""
    return _reply_decoder.decode(frame)


def decode_batch(frame: bytes) -> Batch:
    return _batch_decoder.decode(frame)


def decode_batch_reply(frame: bytes) -> BatchReply:
    return _batch_reply_decoder.decode(frame)


def encode_batch(seq: int, frames: list[bytes]) -> bytes:
    return _encoder.encode(Batch(seq, [msgspec.Raw(f) for f in frames]))


def encode_batch_reply(seq: int, frames: list[bytes]) -> bytes:
    return _encoder.encode(BatchReply(seq, [msgspec.Raw(f) for f in frames]))


def decode_envelope(frame: bytes, limits: Limits) -> Envelope | bytes:
    """Decode and validate one request frame.

    Returns the Envelope, or (Rule 1) the encoded error Reply to send instead. The error
    path is allowed to be slow; the success path is one msgspec decode plus size checks.
    """
    if len(frame) > limits.max_message_bytes:
        return encode_reply(
            salvage_id(frame, limits.max_message_bytes), TOO_LARGE,
            f"message is {len(frame)} bytes; the limit is {limits.max_message_bytes} (max_message_bytes)",
        )
    try:
        env = _envelope_decoder.decode(frame)
    except Exception as exc:  # Rule 1. Not only DecodeError: bad UTF-8 raises UnicodeDecodeError.
        return _explain_bad_frame(frame, exc)
    if env.version != PROTOCOL_VERSION:
        return encode_reply(
            env.id, UNSUPPORTED_VERSION,
            f"protocol version {env.version} is not supported; this server speaks {PROTOCOL_VERSION}",
        )
    problem = check_op(env.op, limits)
    if problem is not None:
        return encode_reply(env.id, problem[0], problem[1])
    return env


CLUSTER_SLOTS = 4096  # shardd.slots.SLOTS (protocol may not import it: same layer, kept equal by a test)
_SLOT_OPS = (SlotFreeze, SlotGive, SlotTake, SlotDrop, SlotImport, SlotCopy)


def check_op(op: Op, limits: Limits) -> tuple[int, str] | None:
    """Return (status, message) if ``op`` breaks a size limit or has a bad argument, else None."""
    max_key = limits.max_key_bytes
    key = getattr(op, "key", None)
    if key is not None and len(key) > max_key:
        return TOO_LARGE, f"key is {len(key)} bytes; the limit is {max_key} (max_key_bytes)"
    value = getattr(op, "value", None)
    if value is not None and len(value) > limits.max_value_bytes:
        return TOO_LARGE, (
            f"value is {len(value)} bytes; the limit is {limits.max_value_bytes} (max_value_bytes)"
        )
    ttl = getattr(op, "ttl_ms", None)
    cls = type(op)
    if ttl is not None and not 0 < ttl <= MAX_TTL_MS:
        if cls is not ExpireIf and cls is not GetEx:
            return BAD_REQUEST, (f"ttl_ms must be between 1 and {MAX_TTL_MS} milliseconds (MAX_TTL_MS = 2**53-1), "
                                 f"got {ttl}")
        if not -MAX_TTL_MS <= ttl <= MAX_TTL_MS:  # here <= 0 means "delete it now" (a deadline in the past)
            return BAD_REQUEST, (f"{cls.__struct_config__.tag} ttl_ms must be between -{MAX_TTL_MS} and {MAX_TTL_MS} "
                                 f"milliseconds (MAX_TTL_MS = 2**53-1), got {ttl}")
    # Multi-key ops: one C-level pass over the lengths; the loops only name the first culprit.
    if cls is GetMany or cls is DeleteMany:
        for k in op.keys if op.keys and max(map(len, op.keys)) > max_key else ():
            if len(k) > max_key:
                return TOO_LARGE, f"a key is {len(k)} bytes; the limit is {max_key} (max_key_bytes)"
    elif cls is SetMany:
        keys, values = zip(*op.items, strict=True) if op.items else ((), ())
        over = keys and (max(map(len, keys)) > max_key or max(map(len, values)) > limits.max_value_bytes)
        for k, v in op.items if over else ():
            if len(k) > max_key:
                return TOO_LARGE, f"a key is {len(k)} bytes; the limit is {max_key} (max_key_bytes)"
            if len(v) > limits.max_value_bytes:
                return TOO_LARGE, (
                    f"a value is {len(v)} bytes; the limit is {limits.max_value_bytes} (max_value_bytes)"
                )
    elif cls is Incr and not -(1 << 63) <= op.delta < (1 << 63):
        return BAD_REQUEST, f"delta must fit in a signed 64-bit integer, got {op.delta}"
    elif cls is Cas and not 0 <= op.version <= _U64:
        return BAD_REQUEST, f"version must be an unsigned 64-bit integer, got {op.version}"
    elif cls is DebugSleep and not 0 <= op.ms <= 60_000:
        return BAD_REQUEST, f"debug_sleep ms must be in [0, 60000], got {op.ms}"
    elif cls is NearGet and not 0 <= op.hits <= _U64:
        return BAD_REQUEST, f"near_get hits must be an unsigned 64-bit integer, got {op.hits}"
    elif cls is Hotkeys and not 1 <= op.top <= 10_000:
        return BAD_REQUEST, f"hotkeys top must be in [1, 10000], got {op.top}"
    elif (cls is Resize or cls is ResizeStart or cls is SetTopology) and not 1 <= op.shards <= MAX_SHARDS:
        return BAD_REQUEST, f"shards must be between 1 and {MAX_SHARDS}, got {op.shards}"
    elif cls is Migrate and not (1 <= op.new_shards <= MAX_SHARDS and 1 <= op.shards <= MAX_SHARDS):
        return BAD_REQUEST, (f"shards and new_shards must be between 1 and {MAX_SHARDS}, "
                             f"got {op.shards}, {op.new_shards}")
    elif cls is MigrateOut and not (1 <= op.limit <= 100_000 and 1 <= op.scan <= 1_000_000):
        return BAD_REQUEST, f"migrate_out limit/scan out of range: {op.limit}/{op.scan}"
    elif cls is Health and not 1 <= op.deadline_ms <= 60_000:
        return BAD_REQUEST, f"health deadline_ms must be in [1, 60000], got {op.deadline_ms}"
    elif cls in _SLOT_OPS:
        if op.slots and not (min(op.slots) >= 0 and max(op.slots) < CLUSTER_SLOTS):
            return BAD_REQUEST, f"slots must be in [0, {CLUSTER_SLOTS}); got {min(op.slots)}..{max(op.slots)}"
        if (cls is SlotTake or cls is SlotCopy) and not 1 <= op.limit <= 100_000:
            return BAD_REQUEST, f"{cls.__struct_config__.tag} limit must be in [1, 100000], got {op.limit}"
    elif cls is ReplPull and not 1 <= op.limit <= 100_000:
        return BAD_REQUEST, f"repl_pull limit must be in [1, 100000], got {op.limit}"
    elif cls in _REDIS_VARIANT_CHECKS:  # one lookup for all of them: every other op's path stays as it was
        return _REDIS_VARIANT_CHECKS[cls](op, limits)
    return None


def _check_setget(op: SetGet, limits: Limits) -> tuple[int, str] | None:
    if op.keep_ttl and op.ttl_ms is not None:
        return BAD_REQUEST, "setget: keep_ttl keeps the key's TTL, so ttl_ms must be nil with it"
    return None


def _check_expire_if(op: ExpireIf, limits: Limits) -> tuple[int, str] | None:
    if not EXPIRE_ALWAYS <= op.when <= EXPIRE_XX_LT:
        return BAD_REQUEST, (f"expire_if when must be 0 (always), 1 (NX), 2 (XX), 3 (GT), 4 (LT) or 5 (XX and LT), "
                             f"got {op.when}")
    return None


def _check_getex(op: GetEx, limits: Limits) -> tuple[int, str] | None:
    if op.persist and op.ttl_ms is not None:
        return BAD_REQUEST, "getex: ttl_ms and persist exclude each other (set a TTL, or remove it)"
    return None


def _check_set_many_nx(op: SetManyNx, limits: Limits) -> tuple[int, str] | None:
    if not op.items:
        return BAD_REQUEST, "set_many_nx needs at least one [key, value] pair"
    return check_op(SetMany(op.items), limits)  # the sizes, checked as set_many's (its ttl_ms is checked already)


# A worker's scan cursors stay below this (shardd.keyscan), so a caller may fold a shard number into one
# (cursor * 1024 + shard) and stay inside u64, and inside i64 too.
SCAN_CURSOR_LIMIT = 1 << 48


def _check_scan(op: Scan, limits: Limits) -> tuple[int, str] | None:
    if not 0 <= op.shard < MAX_SHARDS:
        return BAD_REQUEST, f"scan shard must be between 0 and {MAX_SHARDS - 1}, got {op.shard}"
    if not 0 <= op.cursor < SCAN_CURSOR_LIMIT:
        return BAD_REQUEST, f"scan cursor must be in [0, 2**48), got {op.cursor}"
    if not 1 <= op.count <= 100_000:
        return BAD_REQUEST, f"scan count must be in [1, 100000], got {op.count}"
    # A pattern is compiled and cached per worker: bound it by what could match a key (escapes and classes
    # make a pattern longer than the keys it matches).
    if op.match is not None and len(op.match) > 4 * limits.max_key_bytes:
        return TOO_LARGE, (f"scan match is {len(op.match)} bytes; the limit is 4 x max_key_bytes "
                           f"({4 * limits.max_key_bytes})")
    return None


_REDIS_VARIANT_CHECKS: dict[type, Callable[[Any, Limits], tuple[int, str] | None]] = {
    SetGet: _check_setget, ExpireIf: _check_expire_if, GetEx: _check_getex, SetManyNx: _check_set_many_nx,
    Scan: _check_scan,
}


def salvage_id(frame: bytes, limit: int | None = None) -> int:
    """Best-effort request id of a frame that failed to decode, so the error reaches its caller.

    Only the first few bytes are needed: msgpack arrays put version and id first.
    """
    head = frame[:32] if limit is not None else frame
    try:
        obj = _loose_decoder.decode(head)
    except Exception:
        obj = _partial_prefix(head)
    if isinstance(obj, list) and len(obj) >= 2 and type(obj[1]) is int and 0 <= obj[1] <= _U64:
        return obj[1]
    return 0


def _partial_prefix(head: bytes) -> list[Any] | None:
    """Decode ``[version, id, ...`` from a truncated frame (array header plus two ints)."""
    if not head:
        return None
    first = head[0]
    if 0x90 <= first <= 0x9F:
        pos = 1
    elif first == 0xDC:
        pos = 3
    elif first == 0xDD:
        pos = 5
    else:
        return None
    items: list[Any] = []
    for _ in range(2):
        for end in range(pos + 1, min(len(head), pos + 9) + 1):
            try:
                items.append(_loose_decoder.decode(head[pos:end]))
            except Exception:
                continue
            pos = end
            break
        else:
            return None
    return items


def _explain_bad_frame(frame: bytes, exc: Exception) -> bytes:
    """Turn a decode failure into an error Reply that names the problem."""
    request_id = salvage_id(frame)
    try:
        obj = _loose_decoder.decode(frame)
    except Exception as loose_exc:
        return encode_reply(request_id, BAD_REQUEST, f"malformed request: not valid msgpack ({loose_exc})")
    # The version comes first: any version but the int 1, of any type ("1", 1.0, true), is
    # UNSUPPORTED_VERSION, in a request of this version's shape or, if it is an int, of any
    # length of 2 or more (a later version may change the shape).
    version = obj[0] if isinstance(obj, list) and obj else None
    if (isinstance(obj, list) and (type(version) is not int or version != PROTOCOL_VERSION)
            and (len(obj) == 3 or (type(version) is int and len(obj) >= 2))):
        return encode_reply(
            request_id, UNSUPPORTED_VERSION,
            f"protocol version {version!r} is not supported; this server speaks {PROTOCOL_VERSION}",
        )
    if not isinstance(obj, list) or len(obj) != 3:
        return encode_reply(
            request_id, BAD_REQUEST,
            "malformed request: expected a msgpack array [version, id, [op, args...]]",
        )
    op = obj[2]
    if isinstance(op, list) and op and isinstance(op[0], str) and op[0] not in OP_NAMES:
        return encode_reply(request_id, BAD_REQUEST, f"unknown op {op[0]!r}")
    return encode_reply(request_id, BAD_REQUEST, f"malformed request: {exc}")


OP_NAMES = frozenset(cls.__struct_config__.tag for cls in Op.__args__)  # type: ignore[attr-defined]
