"""The vectorised multi-key paths agree with the per-key code they replace.

get_many / set_many / delete_many place, split, gather and convert their keys with C-level passes
(hashing.shards_for, group_positions, the client's keys_bytes and get_many conversion, the
router's split_multi, the direct client's split_by_shard / merge_split). Each is checked here
against the plain per-key definition, on golden and random inputs.
"""

from __future__ import annotations

import random

import pytest

from shardd import protocol as p
from shardd.commands import Codec, _pairs_bytes, keys_bytes, value_bytes
from shardd.errors import ProtocolError
from shardd.hashing import group_positions, shard_for, shards_for
from shardd.placement import merge_split, split_by_shard
from shardd.router_types import split_multi
from shardd.serde import Utf8Serde

KEYS = [b"", b"a", b"foo", b"hello", "ключ".encode(), *(b"key:%d" % i for i in range(3000)),
        *(random.Random(7).randbytes(random.Random(i).randrange(1, 40)) for i in range(2000))]


@pytest.mark.parametrize("shards", [1, 2, 3, 4, 5, 8, 57, 64, 1000, 1024])
def test_shards_for_is_shard_for_of_every_key(shards: int) -> None:
    assert shards_for(KEYS, shards) == [shard_for(key, shards) for key in KEYS]
    assert shards_for([], shards) == []


def test_shards_for_two_shards_closed_form_on_many_keys() -> None:
    keys = [b"x%d" % i for i in range(100_000)]
    assert shards_for(keys, 2) == [shard_for(key, 2) for key in keys]


@pytest.mark.parametrize("shards", [0, -1])
def test_shards_for_rejects_non_positive_shard_counts(shards: int) -> None:
    with pytest.raises(ValueError):
        shards_for([b"k"], shards)


def test_group_positions_keeps_first_seen_order_and_every_position() -> None:
    owners = [2, 0, 2, 1, 0, 2]
    assert group_positions(owners) == {2: [0, 2, 5], 0: [1, 4], 1: [3]}
    assert list(group_positions(owners)) == [2, 0, 1]
    assert group_positions([]) == {}


def test_keys_bytes_matches_key_by_key_conversion() -> None:
    class B(bytes):
        pass

    assert keys_bytes([b"a", b"b"]) == [b"a", b"b"]
    assert keys_bytes(["a", "ключ"]) == [b"a", "ключ".encode()]
    mixed = keys_bytes([b"a", "b", B(b"c")])
    assert mixed == [b"a", b"b", b"c"] and all(type(k) is bytes for k in mixed)
    with pytest.raises(TypeError, match="key must be bytes or str"):
        keys_bytes([b"a", 1])


def test_set_many_pairs_from_a_mapping_pairs_or_anything_iterable() -> None:
    want = [(b"a", b"1"), (b"b", b"2")]
    assert _pairs_bytes({"a": b"1", b"b": b"2"}, value_bytes) == want
    assert _pairs_bytes([("a", b"1"), [b"b", bytearray(b"2")]], value_bytes) == want
    assert _pairs_bytes(iter([("a", memoryview(b"1")), ("b", b"2")]), value_bytes) == want
    assert _pairs_bytes([], value_bytes) == []
    assert _pairs_bytes({"a": "x"}, Codec(Utf8Serde()).dumps) == [(b"a", b"x")]
    for bad in ([("a", b"1", b"extra")], [("a",)], [1]):
        with pytest.raises(TypeError, match="set_many wants"):
            _pairs_bytes(bad, value_bytes)
    with pytest.raises(TypeError, match="key must be bytes or str"):
        _pairs_bytes([b"ab"], value_bytes)  # unpacks into two ints, as it always did
    with pytest.raises(TypeError, match="value must be bytes"):
        _pairs_bytes({"a": "not bytes"}, value_bytes)


def test_get_many_conversion_keeps_found_keys_in_order_and_checks_the_values() -> None:
    convert = Codec().many(["a", b"b", "c", "a"])
    assert convert([b"1", None, b"", b"4"]) == {"a": b"4", "c": b""}
    assert list(convert([b"1", b"2", b"3", None])) == ["a", b"b", "c"]
    with pytest.raises(ProtocolError, match="bytes or nil"):
        convert([b"1", 2, None, None])
    with pytest.raises(ProtocolError, match="a list of 4 values"):
        convert([b"1"])
    assert Codec(Utf8Serde()).many(["k", "m"])([b"v", None]) == {"k": "v"}


@pytest.mark.parametrize("shards", [1, 2, 3, 8])
def test_router_split_and_gather_put_every_value_back_in_key_order(shards: int) -> None:
    keys = [b"key:%d" % i for i in range(40)] + [b"key:3"]  # a duplicate too
    parts, combine, empty = split_multi(p.GetMany(keys), shards, per_key=False)
    assert empty == []
    answers = [(shard, context, [b"v" + k for k in sub.keys]) for shard, sub, context in parts]
    assert all(shard_for(k, shards) == shard for shard, sub, _ in parts for k in sub.keys)
    assert combine(answers) == [b"v" + k for k in keys]
    if len(parts) > 1:
        shard, context, values = answers[0]
        with pytest.raises(ValueError):
            combine([(shard, context, values[:-1]), *answers[1:]])
    else:
        with pytest.raises(ValueError):
            combine([(answers[0][0], answers[0][1], answers[0][2][:-1])])


def test_router_split_of_set_many_keeps_pairs_and_ttl() -> None:
    items = [(b"k%d" % i, b"%d" % i) for i in range(30)]
    parts, combine, empty = split_multi(p.SetMany(items, 5000), 3, per_key=False)
    assert empty == 0
    assert sorted(pair for _, sub, _ in parts for pair in sub.items) == sorted(items)
    assert all(sub.ttl_ms == 5000 for _, sub, _ in parts)
    assert combine([(shard, ctx, len(sub.items)) for shard, sub, ctx in parts]) == 30
    per_key, _, _ = split_multi(p.SetMany(items, 5000), 3, per_key=True)
    assert [(shard, sub) for shard, sub, _ in per_key] == [(shard_for(k, 3), p.Set(k, v, 5000)) for k, v in items]


def test_direct_split_and_merge_round_trip_and_reject_a_short_part() -> None:
    keys = [b"key:%d" % i for i in range(50)]
    op = p.GetMany(keys)
    parts = split_by_shard(op, 2)
    results = {shard: ([b"v" + k for k in sub.keys], positions) for shard, (sub, positions) in parts.items()}
    assert merge_split(op, results).value == [b"v" + k for k in keys]
    shard, (values, positions) = next(iter(results.items()))
    with pytest.raises(ProtocolError):
        merge_split(op, {**results, shard: (values[:-1], positions)})
    one = split_by_shard(op, 1)
    assert list(one) == [0] and one[0][0] is op
    assert merge_split(op, {0: ([b"x"] * 50, one[0][1])}).value == [b"x"] * 50
