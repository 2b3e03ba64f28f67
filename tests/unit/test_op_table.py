"""The op table (shardd.protocol.OPS): every op has a spec, and each flag does what it promises.

Walks every op of the ``Op`` union through a Router with fake channels (the router's checks and
dispatch) and through a real Shard over a real Store (the worker's), so an op added without a
spec, or with a flag its behaviour does not match, fails here.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from shardd import protocol as p
from shardd.config import build_config
from shardd.hashing import shard_for
from shardd.router import Router
from shardd.shard_link import ShardLink
from shardd.store import Store
from shardd.worker import Shard

ALL_OPS: list[type] = list(p.Op.__args__)  # type: ignore[attr-defined]

# One valid request of every op. For an op with a ``query`` spec this is an instance that is not a
# query (it writes / needs admin); QUERIES holds one that is.
SAMPLES: dict[type, Any] = {
    p.Get: p.Get(b"k"), p.Set: p.Set(b"k", b"v"), p.Delete: p.Delete(b"k"), p.Exists: p.Exists(b"k"),
    p.Expire: p.Expire(b"k", 1000), p.Ttl: p.Ttl(b"k"), p.Persist: p.Persist(b"k"), p.Incr: p.Incr(b"k"),
    p.Append: p.Append(b"k", b"v"), p.GetDel: p.GetDel(b"k"), p.Touch: p.Touch(b"k", 1000),
    p.Gets: p.Gets(b"k"), p.Cas: p.Cas(b"k", b"v", 1),
    p.GetMany: p.GetMany([b"a", b"b", b"c"]), p.SetMany: p.SetMany([(b"a", b"1"), (b"b", b"2")]),
    p.DeleteMany: p.DeleteMany([b"a", b"b"]),
    p.Ping: p.Ping(), p.Stats: p.Stats(), p.Flush: p.Flush(), p.DebugSleep: p.DebugSleep(0, 0),
    p.Maintenance: p.Maintenance(True), p.Health: p.Health(), p.Configure: p.Configure({"log_level": "info"}),
    p.Drain: p.Drain(), p.Snapshot: p.Snapshot("/nonexistent/dir"), p.Hotkeys: p.Hotkeys(),
    p.Tune: p.Tune({"mailbox_limit": 100}), p.Topology: p.Topology(), p.Resize: p.Resize(3),
    p.ResizeStart: p.ResizeStart(3), p.Migrate: p.Migrate(2, 3, 2), p.MigrateOut: p.MigrateOut(),
    p.MigrateIn: p.MigrateIn([]), p.MigrateDone: p.MigrateDone(0), p.SetTopology: p.SetTopology(2, 2),
    p.SetMaintenance: p.SetMaintenance(True), p.Describe: p.Describe(),
    p.ClusterSet: p.ClusterSet(None, 0.0), p.SlotFreeze: p.SlotFreeze([1]), p.SlotGive: p.SlotGive([1]),
    p.SlotTake: p.SlotTake([1]), p.SlotDrop: p.SlotDrop([1]), p.SlotPut: p.SlotPut([(b"k", b"v", 0, 1)]),
    p.SlotImport: p.SlotImport([1], [(b"k", b"v", 0, 1)]), p.Leave: p.Leave(),
    p.SlotCopy: p.SlotCopy([1]), p.ReplPull: p.ReplPull(), p.ReplRead: p.ReplRead([b"k"]),
    p.ReplApply: p.ReplApply([(b"k", b"v", 0, 1)], []), p.SlotStates: p.SlotStates(None, 0.0),
    p.SetGet: p.SetGet(b"k", b"v"), p.ExpireIf: p.ExpireIf(b"k", 1000, p.EXPIRE_XX), p.GetEx: p.GetEx(b"k", 1000),
    p.Strlen: p.Strlen(b"k"),
    p.NearGet: p.NearGet(b"k", 3),
    p.SetManyNx: p.SetManyNx([(b"x", b"1"), (b"y", b"2")]),  # both on shard 0 of 2: the router sends it on
    p.Scan: p.Scan(0),
}
QUERIES: dict[type, Any] = {p.Touch: p.Touch(b"k"), p.Maintenance: p.Maintenance(None), p.GetEx: p.GetEx(b"k")}

# The intended policy, stated here apart from protocol.OPS so that a wrong flag fails: a new op that is
# admin-only, control-only, ... must be added here too. Kind keyed / multi-key and ``write`` need no list:
# they are read from the op's fields and from what it does to a real store.
ADMIN_ONLY = {p.Flush, p.Resize, p.Tune, p.Maintenance, p.DebugSleep, p.SlotImport, p.Leave, p.ReplApply}
CONTROL_ONLY = {p.Configure, p.Drain, p.Snapshot, p.ResizeStart, p.ClusterSet, p.SlotFreeze, p.SlotGive, p.SlotTake,
                p.SlotCopy, p.ReplPull}
INTERNAL = {p.Migrate, p.MigrateOut, p.MigrateIn, p.MigrateDone, p.SetTopology, p.SetMaintenance, p.Describe,
            p.SlotDrop, p.SlotPut, p.ReplRead, p.SlotStates}
ANSWERED_BY_ROUTER = {p.Maintenance, p.Topology, p.Tune, p.Resize, p.ResizeStart, p.Drain, p.Configure,
                      p.DebugSleep, p.ClusterSet, p.SlotFreeze, p.SlotGive, p.SlotImport, p.Leave, p.ReplPull,
                      p.ReplApply, p.SetManyNx, p.Scan}
# Router ops the router sends on to one or every shard as they are (the worker applies them too).
SENT_ON = {p.Configure, p.DebugSleep, p.SetManyNx, p.Scan}
DIRECT_BESIDES_DATA_OPS = {p.Ping, p.DebugSleep}
REFUSED_MID_RESIZE = {p.Flush, p.Resize, p.Snapshot, p.SlotTake, p.SlotImport, p.SlotCopy, p.ReplApply, p.SetManyNx}


class FakeChannel:
    """A shard channel or client inbox that accepts every send."""

    def send(self, *frames: Any) -> bool:
        return True


class RouterUnderTest:
    """A Router over fake channels that records the status of every reply it sends."""

    def __init__(self, shards: int = 2) -> None:
        config = build_config({"shards": shards, "runtime_dir": "/nonexistent", "enable_debug_ops": True})
        links = [ShardLink(i, FakeChannel()) for i in range(shards)]
        for link in links:
            link.up = True
        self.router = Router(config, FakeChannel(), links, FakeChannel())
        self.router.notify_supervisor = lambda: None  # type: ignore[method-assign]
        self.replies: list[p.Reply] = []
        self.router.send_to = lambda peer, frame: self.replies.append(p.decode_reply(frame))  # type: ignore[method-assign]

    def route(self, op: Any, privileged: bool = False) -> p.Reply | None:
        """Route one request; its reply if the router answered at once, else None (queued to shards)."""
        self.replies.clear()
        for link in self.router.links:
            link.out_frames.clear()
            link.out_targets.clear()
        self.router.route(b"peer", p.encode_request(7, op), privileged)
        assert len(self.replies) <= 1
        return self.replies[0] if self.replies else None

    def queued(self) -> list[list[bytes]]:
        """The frames queued to each shard, by shard."""
        return [list(link.out_frames) for link in self.router.links]

    def all_queued(self) -> list[bytes]:
        return [frame for link in self.router.links for frame in link.out_frames]


def shard_under_test(shards: int = 1, shard_id: int = 0) -> Shard:
    config = build_config({"shards": shards, "runtime_dir": "/nonexistent", "enable_debug_ops": True})
    return Shard(Store(lambda: 1000), config, shard_id, None)


def apply(shard: Shard, op: Any, direct: bool = False) -> p.Reply:
    return p.decode_reply(shard.apply(p.encode_request(7, op), direct))


def status(reply: p.Reply | None) -> int | None:
    return None if reply is None else reply.status


def is_query(op: Any) -> bool:
    spec = p.OPS[type(op)]
    return spec.query is not None and spec.query(op)


# --- (a) every op has a spec, and a sample here ------------------------------------------------


def test_every_op_of_the_union_has_a_spec_and_nothing_else_has_one() -> None:
    assert set(p.OPS) == set(ALL_OPS), "every op in protocol.Op needs an OpSpec in protocol.OPS"


def test_every_op_has_a_sample_here() -> None:
    missing = set(ALL_OPS) - set(SAMPLES)
    assert not missing, f"add a sample request of {missing} to SAMPLES (and check its flags below)"
    for cls, op in SAMPLES.items():
        assert type(op) is cls
        assert not isinstance(p.decode_envelope(p.encode_request(1, op), p.Limits()), bytes), cls


@pytest.mark.parametrize("cls", ALL_OPS, ids=lambda c: c.__struct_config__.tag)
def test_a_query_spec_is_only_on_ops_that_may_ask(cls: type) -> None:
    spec = p.OPS[cls]
    assert (spec.query is not None) == (cls in QUERIES)
    if spec.query is not None:
        assert spec.query(QUERIES[cls]) and not spec.query(SAMPLES[cls])


# --- (b) each flag is the intended one ----------------------------------------------------------

OPS = pytest.mark.parametrize("cls", ALL_OPS, ids=lambda c: c.__struct_config__.tag)


@OPS
def test_flags_are_the_intended_policy(cls: type) -> None:
    spec = p.OPS[cls]
    fields = set(cls.__struct_fields__)
    # (set_many_nx has items but is not split: all or nothing, it goes whole to one shard)
    kind = (p.KEYED if "key" in fields else p.ROUTER if cls in ANSWERED_BY_ROUTER
            else p.MULTI if fields & {"keys", "items"} else p.INTERNAL if cls in INTERNAL else p.FANOUT)
    assert spec.kind == kind, cls
    assert spec.admin is (cls in ADMIN_ONLY), cls
    assert spec.control is (cls in CONTROL_ONLY), cls
    assert spec.direct is (kind in (p.KEYED, p.MULTI) or cls in DIRECT_BESIDES_DATA_OPS), cls
    assert (spec.resize == p.REFUSE) is (cls in REFUSED_MID_RESIZE), cls


def seeded_shard() -> Shard:
    """A shard whose store holds every key the samples name, so each write visibly changes it."""
    shard = shard_under_test()
    shard.store.set(b"k", b"1", ttl_ms=5000)  # version 1: Cas(b"k", b"v", 1) stores
    shard.store.set_many([(b"a", b"x"), (b"b", b"y")])
    return shard


@OPS
def test_write_flag_is_set_exactly_on_ops_that_change_data(cls: type) -> None:
    if p.OPS[cls].kind == p.INTERNAL:
        return  # resize traffic moves data between shards; no client sends it
    for op in (SAMPLES[cls], QUERIES.get(cls)):
        if op is None:
            continue
        shard = seeded_shard()
        before = sorted(shard.store.export())  # (key, value, deadline, version) of every key
        apply(shard, op)
        changed = sorted(shard.store.export()) != before
        assert changed is (p.OPS[cls].write and not is_query(op)), (op, "changed data" if changed else "did not")


# --- (c) router and worker do what each flag promises --------------------------------------------


@OPS
def test_write_flag_means_refused_in_maintenance(cls: type) -> None:
    r = RouterUnderTest()
    r.router.maintenance = True
    for op in (SAMPLES[cls], QUERIES.get(cls)):
        if op is None:
            continue
        got = status(r.route(op, privileged=True))
        if p.OPS[cls].write and not is_query(op):
            assert got == p.MAINTENANCE, f"{cls.__name__} is a write: refused while maintenance is on"
        else:
            assert got != p.MAINTENANCE, f"{cls.__name__} is not a write: served in maintenance"


@OPS
def test_write_flag_means_refused_in_maintenance_on_a_workers_own_endpoint(cls: type) -> None:
    if not p.OPS[cls].direct:
        return  # refused there whatever the mode (test_direct_flag_means_accepted_on_a_workers_own_endpoint)
    for op in (SAMPLES[cls], QUERIES.get(cls)):
        if op is None:
            continue
        shard = shard_under_test()
        apply(shard, p.SetMaintenance(True))
        got = apply(shard, op, direct=True).status
        assert (got == p.MAINTENANCE) is (p.OPS[cls].write and not is_query(op)), (op, got)


@OPS
def test_admin_flag_means_forbidden_without_an_admin_key(cls: type) -> None:
    r = RouterUnderTest()
    r.router.admin_ids = frozenset({"admin-key"})
    op = SAMPLES[cls]
    spec = p.OPS[cls]
    r.router.caller_is_admin = False
    got = status(r.route(op, privileged=False))
    if spec.admin:
        assert got == p.FORBIDDEN, f"{cls.__name__} is admin-only: a client key gets FORBIDDEN"
    else:
        assert got != p.FORBIDDEN, f"{cls.__name__} is not admin-only"
    r.router.caller_is_admin = True
    assert status(r.route(op, privileged=False)) != p.FORBIDDEN
    r.router.caller_is_admin = False
    assert status(r.route(op, privileged=True)) != p.FORBIDDEN  # the control endpoint is the supervisor
    if cls in QUERIES:
        assert status(r.route(QUERIES[cls], privileged=False)) != p.FORBIDDEN


def refused_here(reply: p.Reply | None) -> bool:
    """Whether the router refused the request for the endpoint it came in on."""
    return (reply is not None and reply.status == p.BAD_REQUEST
            and ("control endpoint only" in reply.value or "never by a client" in reply.value))


@OPS
def test_control_flag_and_internal_kind_mean_refused_on_the_public_endpoint(cls: type) -> None:
    spec = p.OPS[cls]
    public = RouterUnderTest().route(SAMPLES[cls], privileged=False)
    assert refused_here(public) is (spec.control or spec.kind == p.INTERNAL), (cls, public)
    control = RouterUnderTest().route(SAMPLES[cls], privileged=True)
    assert refused_here(control) is (spec.kind == p.INTERNAL), (cls, control)  # internal: router → worker only


@OPS
def test_direct_flag_means_accepted_on_a_workers_own_endpoint(cls: type) -> None:
    shard = shard_under_test()  # one shard: it owns every key, so a direct op is never MOVED
    reply = apply(shard, SAMPLES[cls], direct=True)
    refused = reply.status == p.BAD_REQUEST and "not to a shard's own endpoint" in str(reply.value)
    assert refused is not p.OPS[cls].direct, (cls, reply)


@OPS
def test_keyed_ops_answer_moved_mid_resize_and_no_other_op_does(cls: type) -> None:
    shard = shard_under_test(shards=2, shard_id=0)
    apply(shard, p.Migrate(2, 3, 2))  # resizing 2 → 3 shards
    key = next(b"k%d" % i for i in range(1000) if shard_for(b"k%d" % i, 3) == 1)  # moves to shard 1
    op = SAMPLES[cls]
    if hasattr(op, "key"):
        op = msgspec.structs.replace(op, key=key)
    reply = apply(shard, op)
    if p.OPS[cls].resize == p.MOVES:
        assert reply.status == p.MOVED and reply.value == {"epoch": 2, "shard": 1}, (cls, reply)
    else:
        assert reply.status != p.MOVED, (cls, reply)


@OPS
def test_resize_flag_refuse_split_or_serve_in_the_router(cls: type, monkeypatch: pytest.MonkeyPatch) -> None:
    r = RouterUnderTest()
    monkeypatch.setattr(Router, "migration", property(lambda self: object()))  # a resize is moving keys
    spec = p.OPS[cls]
    reply = r.route(SAMPLES[cls], privileged=True)
    if spec.resize == p.REFUSE:
        assert status(reply) == p.BUSY and "resize" in str(reply.value), (cls, reply)
        return
    assert status(reply) != p.BUSY, (cls, reply)
    if spec.resize == p.SPLIT:  # one single-key sub-op per key, each of which can be re-routed on MOVED
        subs = [p.decode_envelope(f, p.Limits()).op for f in r.all_queued()]
        assert len(subs) == len(getattr(SAMPLES[cls], "keys", None) or SAMPLES[cls].items)
        assert all(p.OPS[type(sub)].kind == p.KEYED for sub in subs), subs


@OPS
def test_kind_says_where_the_router_sends_it(cls: type) -> None:
    spec = p.OPS[cls]
    r = RouterUnderTest()
    frame = p.encode_request(7, SAMPLES[cls])
    reply = r.route(SAMPLES[cls], privileged=True)
    queued = r.queued()
    if spec.kind == p.KEYED:  # the client's frame, untouched, to the key's owner only
        owner = shard_for(SAMPLES[cls].key, 2)
        assert reply is None and queued[owner] == [frame] and queued[1 - owner] == []
    elif spec.kind == p.MULTI:  # split: sub-ops, not the client's frame
        assert reply is None and any(queued) and frame not in r.all_queued()
    elif spec.kind == p.FANOUT:
        assert reply is None and all(len(q) == 1 for q in queued)
    elif spec.kind == p.INTERNAL:
        assert status(reply) == p.BAD_REQUEST and not any(queued)
    else:
        assert spec.kind == p.ROUTER
        assert frame not in r.all_queued()
        if cls in SENT_ON - {p.Configure}:  # to one shard: the op itself, re-framed with the router's id
            sent = [p.decode_envelope(f, p.Limits()).op for f in r.all_queued()]
            assert reply is None and sent == [SAMPLES[cls]], (cls, reply, sent)


@OPS
def test_workers_apply_every_op_the_router_sends_them(cls: type) -> None:
    spec = p.OPS[cls]
    reply = apply(shard_under_test(), SAMPLES[cls])
    routers_only = reply.status == p.BAD_REQUEST and "answered by the router" in str(reply.value)
    assert routers_only is (spec.kind == p.ROUTER and cls not in SENT_ON), (cls, reply)


def test_a_wrong_spec_is_refused_at_import() -> None:
    with pytest.raises(ValueError):
        p.OpSpec(p.KEYED)  # a keyed op must answer MOVED mid-resize
    with pytest.raises(ValueError):
        p.OpSpec(p.FANOUT, resize=p.SPLIT)  # only multi-key ops split
