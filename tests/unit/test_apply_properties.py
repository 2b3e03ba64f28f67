"""Property tests for op application: any request a client can send, applied by a worker's
Shard (store and all, no sockets), gets exactly one reply with its id, never INTERNAL_ERROR.
(The coverage-guided version of this is bench/fuzz_protocol.py.)"""

from __future__ import annotations

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardd import protocol as p
from shardd.config import build_config
from shardd.store import Store
from shardd.worker import Shard

_CONFIG = build_config({"shards": 2, "max_key_bytes": 64, "max_value_bytes": 4096, "max_message_bytes": 65536,
                        "pin_cpus": False, "max_memory": "1MiB"})
_NAMES = sorted(p.OP_NAMES - {"debug_sleep", "snapshot"})  # no sleeping or file writing here

_atoms = st.one_of(
    st.binary(max_size=80),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.none(),
    st.booleans(),
    st.text(max_size=8),
    st.lists(st.tuples(st.binary(max_size=6), st.binary(max_size=40)), max_size=4),
    st.lists(st.binary(max_size=6), max_size=4),
)
_small_ints = st.one_of(st.integers(-3, 5000), st.integers(min_value=-(2**63), max_value=2**64 - 1))
_settings = st.dictionaries(
    st.sampled_from(["mailbox_limit", "log_level", "max_memory", "eviction_policy", "max_key_bytes",
                     "expiry_interval_ms", "expiry_budget_ms", "unknown"]),
    st.one_of(st.integers(-5, 10**7), st.sampled_from(["debug", "loud", "64MiB", "-1", "allkeys-lfu", "nope"])),
    max_size=3)


def _field(annotation: object) -> st.SearchStrategy:
    """A value of roughly the field's type, wrong now and then (strings, out-of-range ints)."""
    text = str(annotation)
    if "dict" in text:
        base = _settings
    elif "list[tuple" in text:
        base = st.lists(st.tuples(st.binary(max_size=8), st.binary(max_size=64)), max_size=6)
    elif "list[bytes]" in text:
        base = st.lists(st.binary(max_size=8), max_size=6)
    elif "bytes" in text:
        base = st.binary(max_size=70)
    elif "bool" in text:
        base = st.one_of(st.booleans(), st.none())
    elif "str" in text:
        base = st.text(max_size=20)
    elif "Literal" in text or "int" in text:
        base = st.one_of(_small_ints, st.none()) if "None" in text else _small_ints
    else:
        base = _atoms
    return st.one_of(base, base, base, _atoms)  # mostly well-typed


def _shaped(cls: type) -> st.SearchStrategy:
    fields = msgspec.structs.fields(cls)
    args = st.tuples(*(_field(f.type) for f in fields)) if fields else st.just(())
    tag = cls.__struct_config__.tag
    # sometimes drop trailing (optional) arguments, sometimes add one too many
    return st.tuples(args, st.integers(0, len(fields)), st.booleans()).map(
        lambda t: [tag, *t[0][: max(t[1], len([f for f in fields if f.required]))], *([7] if t[2] else [])])


_OPS = [cls for cls in p.Op.__args__ if cls.__struct_config__.tag not in ("debug_sleep", "snapshot")]
_requests = st.tuples(
    st.one_of(st.just(1), st.just(1), st.integers(-2, 300)),
    st.integers(min_value=0, max_value=2**64 - 1),
    st.one_of(st.sampled_from(_OPS).flatmap(_shaped),
              st.tuples(st.sampled_from(_NAMES), st.lists(_atoms, max_size=5)).map(lambda t: [t[0], *t[1]])),
)


def _fresh_shard() -> Shard:
    clock = iter(range(0, 10**9, 7))
    return Shard(Store(lambda: next(clock)), _CONFIG, 1, None)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_requests, min_size=1, max_size=12), st.booleans())
def test_every_request_gets_one_reply_with_its_id(requests, direct):
    shard = _fresh_shard()
    for version, request_id, op in requests:
        frame = p.encode([version, request_id, op])
        reply = p.decode_reply(shard.apply(frame, direct))
        assert reply.id in (request_id, 0)
        assert reply.status != p.INTERNAL_ERROR, (op, reply)
        if reply.status != p.OK:
            assert isinstance(reply.value, str | dict)
    assert shard.store.used_bytes >= 0
