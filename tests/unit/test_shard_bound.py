"""The shard-count bound is one constant (hashing.MAX_SHARDS), and every check of a count uses it."""

from __future__ import annotations

import pytest

from shardd import protocol
from shardd.client import Client
from shardd.config import build_config
from shardd.errors import ConfigError
from shardd.hashing import MAX_SHARDS


def test_config_resize_wire_and_client_all_stop_at_max_shards() -> None:
    assert build_config({"shards": MAX_SHARDS}).shards == MAX_SHARDS
    with pytest.raises(ConfigError, match=f"shards.*{MAX_SHARDS}"):
        build_config({"shards": MAX_SHARDS + 1})
    limits = protocol.Limits()
    for op in (protocol.Resize(MAX_SHARDS + 1), protocol.ResizeStart(MAX_SHARDS + 1),
               protocol.SetTopology(2, MAX_SHARDS + 1), protocol.Migrate(2, MAX_SHARDS + 1, 2)):
        status, message = protocol.check_op(op, limits)
        assert status == protocol.BAD_REQUEST and str(MAX_SHARDS) in message, op
    assert protocol.check_op(protocol.Resize(MAX_SHARDS), limits) is None
    with Client("tcp://127.0.0.1:9", timeout=0.1) as c, pytest.raises(ValueError, match=str(MAX_SHARDS)):
        c.resize(MAX_SHARDS + 1)  # refused before anything is sent
