"""The resize state machine, step by step, with no sockets: replies in, sends out."""

from __future__ import annotations

import pytest

from shardd import protocol as p
from shardd.hashing import shard_for
from shardd.migration import Migration, MigrationStep, Phase, StepKind


def _entries(keys: list[bytes]) -> list[list]:
    return [[key, b"v", 0, 1] for key in keys]


def _keys_moving(old: int, new: int, source: int, count: int) -> list[bytes]:
    """``count`` keys that ``source`` holds under ``old`` shards and another shard owns under ``new``."""
    out, i = [], 0
    while len(out) < count:
        key = b"k%d" % i
        if shard_for(key, old) == source and shard_for(key, new) != source:
            out.append(key)
        i += 1
    return out


def _kinds(sends) -> list[tuple[int, StepKind]]:
    return [(shard, step.kind) for shard, _, step in sends]


def _moving(old: int, new: int) -> tuple[Migration, list]:
    mig = Migration(old, new, epoch=2, waiter=("peer", 7))
    assert mig.phase is Phase.REQUESTED
    assert mig.topology_fields() == {"resizing": None, "pending_resize": new}
    assert list(mig.start()) == list(range(old, max(old, new)))
    assert mig.phase is Phase.CONNECTING and not mig.finished()
    sends = mig.links_up()
    assert mig.phase is Phase.MOVING
    return mig, sends


def test_grow_runs_migrate_out_in_done_then_finishes() -> None:
    mig, sends = _moving(2, 3)
    # Every shard of both layouts learns of the resize, the new one too.
    assert _kinds(sends) == [(0, StepKind.MIGRATE), (1, StepKind.MIGRATE), (2, StepKind.MIGRATE)]
    assert all(op == p.Migrate(2, 3, 2) for _, op, _ in sends)
    assert mig.topology_fields()["resizing"] == {"to": 3, "epoch": 2, "moving": True}
    # Old shards are then scanned; the new one is not.
    assert _kinds(mig.on_reply(sends[0][2], p.OK, 10)) == [(0, StepKind.OUT)]
    assert _kinds(mig.on_reply(sends[1][2], p.OK, 5)) == [(1, StepKind.OUT)]
    assert mig.on_reply(sends[2][2], p.OK, 0) == []
    assert mig.total == 15 and mig.scanning == {0, 1}

    # Shard 0's first batch: imports to the new owners, then the next migrate_out behind them.
    moving = _keys_moving(2, 3, 0, 4)
    out = mig.on_reply(MigrationStep(StepKind.OUT, 0), p.OK, {"entries": _entries(moving), "done": False})
    assert _kinds(out) == [(2, StepKind.IN), (0, StepKind.OUT)]
    imports = out[0]
    assert imports[2].entries == 4 and [e[0] for e in imports[1].entries] == moving
    assert mig.moved == 4 and mig.imports_in_flight == 1

    # Shard 0 scanned to the end: migrate_done(0) to every other shard of the new layout.
    last = mig.on_reply(out[1][2], p.OK, {"entries": [], "done": True})
    assert _kinds(last) == [(1, StepKind.DONE), (2, StepKind.DONE)]
    assert all(op == p.MigrateDone(0) for _, op, _ in last)
    assert mig.scanning == {1} and mig.imports_in_flight == 3

    done1 = mig.on_reply(MigrationStep(StepKind.OUT, 1), p.OK, {"entries": [], "done": True})
    assert _kinds(done1) == [(0, StepKind.DONE), (2, StepKind.DONE)]
    assert mig.imports_in_flight == 5
    for _, _, step in [imports, *last, *done1]:
        assert not mig.finished()
        mig.on_reply(step, p.OK, 4 if step.kind is StepKind.IN else True)
    assert mig.finished() and mig.imports_in_flight == 0

    topology = mig.finish()
    assert _kinds(topology) == [(0, StepKind.TOPOLOGY), (1, StepKind.TOPOLOGY), (2, StepKind.TOPOLOGY)]
    assert all(op == p.SetTopology(2, 3) for _, op, _ in topology)
    status, result = mig.outcome()
    assert status == p.OK and {k: result[k] for k in ("from", "to", "moved", "total", "lost", "epoch")} == {
        "from": 2, "to": 3, "moved": 4, "total": 15, "lost": 0, "epoch": 2}
    assert mig.phase is Phase.DONE and not mig.finished()
    assert mig.on_reply(topology[0][2], p.OK, True) == []  # replies to set_topology change nothing


def test_shrink_scans_the_removed_shard_and_sets_topology_only_on_those_that_stay() -> None:
    mig, sends = _moving(3, 2)
    assert [shard for shard, _ in _kinds(sends)] == [0, 1, 2]
    assert mig.scanning == {0, 1, 2}
    for _, _, step in sends:
        assert _kinds(mig.on_reply(step, p.OK, 1)) == [(step.shard, StepKind.OUT)]
    moving = _keys_moving(3, 2, 2, 3)
    out = mig.on_reply(MigrationStep(StepKind.OUT, 2), p.OK, {"entries": _entries(moving), "done": True})
    owners = sorted({shard_for(key, 2) for key in moving})
    # Imports first, then migrate_done(2) to shards 0 and 1, so on each link it is behind them.
    assert [kind for _, kind in _kinds(out)] == [StepKind.IN] * len(owners) + [StepKind.DONE] * 2
    assert [shard for shard, kind in _kinds(out) if kind is StepKind.DONE] == [0, 1]
    for source in (0, 1):
        done = mig.on_reply(sends[source][2].__class__(StepKind.OUT, source), p.OK, {"entries": [], "done": True})
        assert [shard for shard, _ in _kinds(done)] == [1 - source]  # never to itself, never to removed shard 2
        out += done
    for _, _, step in out:
        assert not mig.finished()
        mig.on_reply(step, p.OK, step.entries if step.kind is StepKind.IN else True)
    assert mig.finished()
    assert [shard for shard, _ in _kinds(mig.finish())] == [0, 1]


def test_a_failed_step_is_recorded_and_never_stalls_the_resize() -> None:
    mig, sends = _moving(2, 3)
    for _, _, step in sends:
        mig.on_reply(step, p.UNAVAILABLE if step.shard == 1 else p.OK, "shard 1 went down" if step.shard == 1 else 0)
    out = []
    for source in (0, 1):  # shard 1's migrate_out fails too: an empty, final batch
        status = p.OK if source == 0 else p.UNAVAILABLE
        value = {"entries": [], "done": True} if source == 0 else "went down"
        out += mig.on_reply(MigrationStep(StepKind.OUT, source), status, value)
    for _, _, step in out:
        mig.on_reply(step, p.UNAVAILABLE, "went down")
    assert mig.finished()
    mig.finish()
    status, message = mig.outcome()
    assert status == p.INTERNAL_ERROR and "went down" in message  # the last failure is reported


def test_entries_a_new_owner_cannot_adopt_are_counted_lost() -> None:
    mig, sends = _moving(1, 2)
    mig.on_reply(sends[0][2], p.OK, 3)
    out = mig.on_reply(MigrationStep(StepKind.OUT, 0), p.OK,
                       {"entries": _entries(_keys_moving(1, 2, 0, 3)), "done": True})
    for _, _, step in out:
        mig.on_reply(step, p.OK, 1 if step.kind is StepKind.IN else True)
    assert mig.finished() and mig.lost == 2


def test_misuse_is_an_error_not_a_silent_state_change() -> None:
    mig = Migration(2, 3, 2, None)
    assert mig.links_up() == []  # not started: nothing to send
    with pytest.raises(RuntimeError):
        mig.finish()
    mig.start()
    with pytest.raises(RuntimeError):
        mig.start()
