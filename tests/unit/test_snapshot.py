"""Snapshot file format and generation bookkeeping (no daemon)."""

from __future__ import annotations

import os

import pytest

from shardd import snapshot

ENTRIES = [(b"a", b"1", 0, 1), (b"b", b"\x00" * 1000, 1_900_000_000_000, 7), (b"", b"", 0, 2**63)]


def test_round_trip():
    data = snapshot.encode(ENTRIES, shard=1, shards=3, created_ms=123)
    header, entries = snapshot.decode(data)
    assert header == {"created_ms": 123, "shard": 1, "shards": 3, "entries": 3}
    assert entries == ENTRIES


@pytest.mark.parametrize("damage", [
    lambda d: d[:-1],                       # truncated trailer
    lambda d: d[: len(d) // 2],             # truncated body
    lambda d: d[:10],                       # truncated header
    lambda d: d[:40] + bytes([d[40] ^ 1]) + d[41:],   # one bit flipped in the body
    lambda d: b"NOTSNAP!" + d[8:],          # wrong magic / format version
    lambda d: b"",
])
def test_damaged_files_are_refused_with_a_reason(damage):
    data = damage(snapshot.encode(ENTRIES, 0, 1, 0))
    with pytest.raises(snapshot.SnapshotError) as err:
        snapshot.decode(data, "shard-0.snap")
    assert "shard-0.snap" in str(err.value)


def test_generations_commit_current_consume(tmp_path):
    state = str(tmp_path)
    assert snapshot.current(state) is None
    first = snapshot.new_generation(state)
    snapshot.write_atomic(snapshot.shard_file(first, 0), snapshot.encode(ENTRIES, 0, 1, 0))
    snapshot.commit(state, first)
    assert snapshot.current(state) == first
    second = snapshot.new_generation(state)
    snapshot.commit(state, second)
    assert snapshot.current(state) == second
    assert not os.path.exists(first)  # older generations are removed on commit
    assert [name for name, _ in snapshot.read_generation(first if os.path.exists(first) else second)] == []
    snapshot.consume(state)
    assert snapshot.current(state) is None
    assert os.listdir(snapshot.snapshots_dir(state)) == []


def test_write_atomic_leaves_no_temp_file(tmp_path):
    path = str(tmp_path / "f.snap")
    snapshot.write_atomic(path, b"x")
    snapshot.write_atomic(path, b"y")
    with open(path, "rb") as f:
        assert f.read() == b"y"
    assert os.listdir(tmp_path) == ["f.snap"]
