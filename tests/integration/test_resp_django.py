"""Django's built-in RedisCache backend against shardd's RESP endpoint, configured as a user would:
``CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION":
"redis://127.0.0.1:PORT"}}``, nothing else changed."""

from __future__ import annotations

from collections.abc import Iterator

import django
import pytest
from django.conf import settings
from django.core.cache import caches
from django.core.cache.backends.base import BaseCache
from django.test.utils import override_settings

from tests.helpers import wait_until
from tests.resp_clients_support import MISSING_OPS, NEEDS_OPS_REASON, start_resp_daemon, stop_daemon

needs_ops = pytest.mark.skipif(bool(MISSING_OPS), reason=NEEDS_OPS_REASON)  # touch: EXPIRE, PERSIST


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BaseCache]:
    d, port = start_resp_daemon(tmp_path_factory.mktemp("resp-django"), shards=2)
    try:
        caches_setting = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                      "LOCATION": f"redis://127.0.0.1:{port}"}}
        if not settings.configured:
            settings.configure(CACHES=caches_setting)
            django.setup()
        with override_settings(CACHES=caches_setting):  # also when another module configured Django first
            yield caches["default"]
            caches["default"].close()
    finally:
        stop_daemon(d)


@pytest.fixture
def c(cache: BaseCache) -> BaseCache:
    cache.clear()
    return cache


def test_set_get_add_delete(c: BaseCache) -> None:
    c.set("k", "v")
    assert c.get("k") == "v"
    assert c.get("missing") is None and c.get("missing", "default") == "default"
    c.set("obj", {"a": [1, 2.5, None], "b": ("t",)})  # pickled by the backend
    assert c.get("obj") == {"a": [1, 2.5, None], "b": ("t",)}
    c.set("n", 42)
    assert c.get("n") == 42  # integers are stored as integers, so INCR works on them
    assert c.add("k", "other") is False and c.get("k") == "v"
    assert c.add("new", "x") is True and c.get("new") == "x"
    assert c.delete("k") is True and c.delete("k") is False
    assert c.has_key("new") and not c.has_key("k")
    c.set("big", "x" * 100_000)
    assert c.get("big") == "x" * 100_000


def test_incr_decr(c: BaseCache) -> None:
    c.set("n", 1)
    assert c.incr("n") == 2 and c.incr("n", 10) == 12 and c.decr("n") == 11 and c.decr("n", 5) == 6
    assert c.get("n") == 6
    with pytest.raises(ValueError):
        c.incr("missing")


def test_get_many_delete_many(c: BaseCache) -> None:
    data = {f"key{i}": i for i in range(50)} | {"text": "t", "list": [1, 2]}
    for key, value in data.items():
        c.set(key, value)
    assert c.get_many([*data, "missing"]) == data
    c.delete_many([f"key{i}" for i in range(0, 50, 2)])
    assert c.get_many([f"key{i}" for i in range(50)]) == {f"key{i}": i for i in range(1, 50, 2)}


def test_set_many(c: BaseCache) -> None:
    # Django's set_many is MSET plus one EXPIRE per key, in redis-py's default pipeline: a
    # MULTI/EXEC transaction.
    data = {f"key{i}": i for i in range(50)} | {"text": "t", "list": [1, 2]}
    assert c.set_many(data) == []
    assert c.get_many([*data, "missing"]) == data
    c.set_many({"t1": 1, "t2": 2}, timeout=None)
    assert all(c.has_key(k) for k in ("t1", "t2"))


def test_expiry(c: BaseCache) -> None:
    c.set("short", "v", timeout=1)
    assert c.get("short") in ("v", None)  # gone after a second; a busy machine may already be past it
    wait_until(lambda: c.get("short") is None, what="a 1 s key expiring")
    assert not c.has_key("short")
    c.set("never", "v", timeout=0)  # Django: timeout 0 expires at once
    assert c.get("never") is None
    c.set("kept", "v", timeout=None)
    assert c.get("kept") == "v"


@needs_ops
def test_touch(c: BaseCache) -> None:
    c.set("t", "v", timeout=1000)
    assert c.touch("t", timeout=None) is True  # no expiry any more
    assert c.touch("missing", 10) is False
    c.set("gone", "v", timeout=1000)
    assert c.touch("gone", timeout=1) is True
    wait_until(lambda: c.get("gone") is None, what="a key touched to 1 s expiring")
    assert c.get("t") == "v"


def test_get_or_set_and_clear(c: BaseCache) -> None:
    assert c.get_or_set("g", "first") == "first"
    assert c.get_or_set("g", "second") == "first"
    assert c.get_or_set("h", lambda: "called") == "called"
    for i in range(20):
        c.set(f"x{i}", i)
    c.clear()
    assert c.get_many([f"x{i}" for i in range(20)] + ["g", "h"]) == {}
