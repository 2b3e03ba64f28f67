"""config.SETTINGS: every Config field says whether it applies live and who applies it, and they do."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from shardd import config as c
from shardd import protocol as p
from shardd.store import Store
from shardd.worker import Shard

# A valid value, different from the default, for every live key.
NEW_VALUES: dict[str, Any] = {
    "mailbox_limit": 77, "max_memory": 64 * 1024**2, "eviction_policy": "allkeys-lfu",
    "max_message_bytes": 8 * 1024**2, "max_key_bytes": 512, "max_value_bytes": 4096,
    "expiry_interval_ms": 50, "expiry_budget_ms": 2, "hotkeys_capacity": 32, "log_level": "warning",
    "imbalance_threshold": 3.0, "imbalance_check_s": 5.0, "stop_timeout": 9.0, "ready_timeout": 9.0,
    "snapshot_on_stop": False, "snapshot_interval": 60.0, "snapshot_timeout": 30.0,
    "compression": "zstd", "compression_min_bytes": 200, "compression_min_saving": 0.25,
    "hot_key_share": 0.05, "hot_key_min_rate": 50.0, "hot_keys_max": 8, "near_cache_lease_ms": 250,
}


@pytest.fixture(autouse=True)
def keep_log_level() -> Iterator[None]:
    level = logging.getLogger().level  # configuring log_level sets the root logger's
    yield
    logging.getLogger().setLevel(level)


def test_every_config_field_is_classified() -> None:
    assert set(c.SETTINGS) == set(c.Config.__struct_fields__)
    for key, setting in c.SETTINGS.items():
        assert setting.applied_by <= {c.SUPERVISOR, c.ROUTER, c.WORKER}, key
    for key in p.TUNABLE:  # the tune op's keys are applied live where they matter
        assert c.SETTINGS[key].applied_by & {c.ROUTER, c.WORKER}, key


def test_views_are_the_table() -> None:
    assert {k for k, s in c.SETTINGS.items() if not s.applied_by} == c.RESTART_KEYS
    assert set(NEW_VALUES) == set(c.SETTINGS) - c.RESTART_KEYS  # keep NEW_VALUES complete


def shard() -> Shard:
    config = c.build_config({"shards": 2, "runtime_dir": "/nonexistent"})
    return Shard(Store(lambda: 0), config, 0, None)


def configure(s: Shard, settings: dict[str, Any]) -> p.Reply:
    return p.decode_reply(s.apply(p.encode_request(1, p.Configure(settings))))


def test_a_worker_applies_every_setting_the_table_gives_it() -> None:
    s = shard()
    reply = configure(s, NEW_VALUES)
    assert reply.status == p.OK
    assert set(reply.value) == c.WORKER_LIVE
    assert s.mailbox_limit == 77 and s.limits == c.Limits(512, 4096, 8 * 1024**2)
    assert (s.expiry_interval_ms, s.expiry_budget_ms, s.store.policy) == (50, 2, "allkeys-lfu")
    assert s.store.max_bytes == 32 * 1024**2  # its half of max_memory
    assert s.config == msgspec.structs.replace(s.config, **NEW_VALUES)
    assert s.store.entry(b"x") is None
    assert (s.near.share, s.near.min_rate, s.near.max_keys, s.near.lease_ms) == (0.05, 50.0, 8, 250)
    s.store.set(b"x", b"a" * 300)  # 300 bytes >= 200: compressed now
    assert s.store.entry(b"x")["packed"] and s.store.get(b"x") == b"a" * 300
    assert configure(s, {"compression": "off"}).status == p.OK
    s.store.set(b"y", b"a" * 300)
    assert not s.store.entry(b"y")["packed"] and s.store.get(b"x") == b"a" * 300  # still readable


def test_a_worker_refuses_restart_only_settings_and_changes_nothing() -> None:
    s = shard()
    before = s.config
    reply = configure(s, {"mailbox_limit": 5, "shards": 4})
    assert reply.status == p.BAD_REQUEST and "shards" in reply.value and "restart" in reply.value
    assert s.config == before and s.mailbox_limit == before.mailbox_limit


def test_the_router_applies_its_settings_and_refuses_restart_only_ones() -> None:
    from tests.unit.test_op_table import RouterUnderTest

    r = RouterUnderTest()
    router = r.router
    before = router.config
    reply = r.route(p.Configure({"shards": 4, "mailbox_limit": 5}), privileged=True)
    assert reply is not None and reply.status == p.BAD_REQUEST and "restart" in reply.value
    assert router.config == before and not any(r.queued())
    assert r.route(p.Configure(NEW_VALUES), privileged=True) is None  # validated, applied, sent to every shard
    assert all(len(q) == 1 for q in r.queued())
    assert router.config == msgspec.structs.replace(before, **NEW_VALUES)
    assert router.mailbox_limit == 77 and router.limits == c.Limits(512, 4096, 8 * 1024**2)
    for key in c.ROUTER_LIVE:  # what the router reads live, it reads from its config
        assert getattr(router.config, key) == NEW_VALUES[key]
