"""cluster_view: the per-slot states a node serves by, step by step (docs/cluster.md)."""

from __future__ import annotations

from shardd import protocol as p
from shardd.cluster_view import ASK, FROZEN, MOVED, NOBODY, SERVE, ClusterView
from shardd.slots import SLOTS, Node, SlotMap, slot_of

A, B = Node("a", "tcp://127.0.0.1:1", 2), Node("b", "tcp://127.0.0.1:2", 2)


def key_in(slot: int) -> bytes:
    i = 0
    while slot_of(f"k{i}".encode()) != slot:
        i += 1
    return f"k{i}".encode()


def only_a(epoch: int = 1) -> SlotMap:
    return SlotMap(epoch, [A], [0] * SLOTS, {})


def split(epoch: int, handoff: dict[int, int] | None = None) -> SlotMap:
    """Slots below 2048 on a, the rest on b."""
    return SlotMap(epoch, [A, B], [0] * 2048 + [1] * 2048, handoff or {})


def view(node: str = "a", smap: SlotMap | None = None) -> ClusterView:
    v = ClusterView("c", node)
    v.valid_until = 100.0
    if smap is not None:
        v.install(smap)
    return v


def test_serves_nothing_before_a_map_or_after_the_lease() -> None:
    v = ClusterView("c", "a")
    status, text = v.refusal(b"k", 1.0)  # type: ignore[misc]
    assert status == p.UNAVAILABLE and text.startswith("cluster:")
    v.install(only_a())
    assert v.refusal(b"k", 1.0) is not None  # still no lease
    v.valid_until = 10.0
    assert v.refusal(b"k", 1.0) is None
    assert v.refusal(b"k", 10.0)[0] == p.UNAVAILABLE  # type: ignore[index]
    assert v.refusal_many([b"a", b"b"], 10.0)[0] == p.UNAVAILABLE  # type: ignore[index]


def test_moved_names_the_owner_and_the_epoch() -> None:
    v = view("a", split(3))
    key = key_in(3000)
    status, value = v.refusal(key, 1.0)  # type: ignore[misc]
    assert status == p.MOVED
    assert value == {"epoch": 3, "slot": 3000, "node": "b", "endpoint": "tcp://127.0.0.1:2"}
    assert v.refusal(key_in(5), 1.0) is None
    assert v.refusal_many([key_in(5), key], 1.0)[0] == p.MOVED  # type: ignore[index]
    assert v.refusal_many([key_in(5), key_in(6)], 1.0) is None


def test_a_lower_epoch_is_ignored() -> None:
    v = view("a", split(5))
    assert v.install(only_a(4)) == []
    assert v.map is not None and v.map.epoch == 5 and v.state[3000] == MOVED


def test_first_map_purges_what_is_not_served_and_keeps_what_is() -> None:
    v = ClusterView("c", "a")
    purge = v.install(split(1))
    assert purge == list(range(2048, SLOTS))


def test_gaining_a_slot_without_a_handoff_purges_it() -> None:
    v = view("a", split(1))
    purge = v.install(only_a(2))  # b died: its slots come to a, empty
    assert purge == list(range(2048, SLOTS))
    assert v.install(only_a(3)) == []  # nothing new


def test_a_handoff_source_serves_then_freezes_then_gives() -> None:
    # epoch 2: slot 10 moves from a (source) to b (owner)
    owners = [0] * 2048 + [1] * 2048
    owners[10] = 1
    smap = SlotMap(2, [A, B], owners, {10: 0})
    src = view("a", split(1))
    assert src.install(smap) == []
    assert src.state[10] == SERVE
    assert src.freeze([10, 11, 3000]) == [10]  # only slots it hands over
    assert src.refusal(key_in(10), 1.0)[0] == p.TRYAGAIN  # type: ignore[index]
    assert src.give([10]) == [10]
    status, value = src.refusal(key_in(10), 1.0)  # type: ignore[misc]
    assert status == p.MOVED and value["node"] == "b" and "ask" not in value
    # the new owner asks the source until it adopts
    dst = view("b", split(1))
    dst.install(smap)
    status, value = dst.refusal(key_in(10), 1.0)  # type: ignore[misc]
    assert status == p.MOVED and value["ask"] is True and value["node"] == "a"
    assert dst.adopt([10]) == [10]
    assert dst.refusal(key_in(10), 1.0) is None
    # the controller finalizes: no purge at b (it adopted), a keeps answering MOVED
    final = SlotMap(3, [A, B], owners, {})
    assert 10 not in dst.install(final)
    assert dst.state[10] == SERVE
    src.install(final)
    assert src.state[10] == MOVED


def test_a_map_that_changes_the_pair_resets_the_local_steps() -> None:
    owners = [0] * 2048 + [1] * 2048
    owners[10] = 1
    src = view("a", split(1))
    src.install(SlotMap(2, [A, B], owners, {10: 0}))
    src.freeze([10])
    assert src.state[10] == FROZEN
    # b died before adopting: 10 goes back to a with no handoff: a serves it, from empty
    purge = src.install(only_a(3))
    assert src.state[10] == SERVE and 10 in purge and not src.frozen


def test_no_owner_is_unavailable() -> None:
    v = view("a", SlotMap(1, [], [-1] * SLOTS, {}))
    assert v.state[0] == NOBODY
    assert v.refusal(b"k", 1.0)[0] == p.UNAVAILABLE  # type: ignore[index]
    assert v.counts()["nobody"] == SLOTS


def test_adopt_only_takes_slots_the_map_gives_us() -> None:
    v = view("b", split(1))
    assert v.adopt([10]) == []  # a owns 10
    assert v.state[10] == MOVED
    assert ASK not in v.state


def test_a_cluster_nodes_stats_become_prometheus_gauges() -> None:
    from shardd.metrics import families

    v = view("a", split(4))
    stats = {"router": {"requests": 1, "cluster": v.stats(50.0)}, "shards": [], "imbalance": {}}
    by_name = {family.name: family for family in families(stats)}
    assert by_name["shardd_cluster_epoch"].samples[0].value == 4
    assert by_name["shardd_cluster_lease_seconds"].samples[0].value == 50.0
    slots = {sample.labels["state"]: sample.value for sample in by_name["shardd_cluster_slots"].samples}
    assert slots["serve"] == 2048 and slots["moved"] == 2048
