"""Protected mode in config validation: remote TCP binds need auth or an explicit opt-in."""

from __future__ import annotations

import pytest

from shardd.config import build_config, is_local_endpoint
from shardd.errors import ConfigError

LOCAL = ["tcp://127.0.0.1:7400", "tcp://127.9.8.7:1", "tcp://[::1]:7400", "tcp://localhost:7400",
         "ipc:///run/shardd/shardd.sock"]
REMOTE = ["tcp://0.0.0.0:7400", "tcp://*:7400", "tcp://[::]:7400", "tcp://10.1.2.3:7400",
          "tcp://cache.example.com:7400", "tcp://eth0:7400"]


@pytest.mark.parametrize("bind", LOCAL)
def test_local_binds_need_nothing(bind):
    assert is_local_endpoint(bind)
    assert build_config({"bind": bind}).bind == bind


@pytest.mark.parametrize("bind", REMOTE)
def test_remote_binds_are_refused_naming_the_key(bind):
    assert not is_local_endpoint(bind)
    with pytest.raises(ConfigError) as err:
        build_config({"bind": bind})
    message = str(err.value)
    assert message.startswith("bind: ") and "allow_remote_without_auth" in message and "\n" not in message
    assert build_config({"bind": bind, "allow_remote_without_auth": True}).bind == bind
