"""The shipped unit file: the directives operators rely on, and `systemd-analyze verify`."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "shardd.service"


def _service() -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keep directive case
    parser.read(UNIT)
    return dict(parser["Service"])


def test_unit_has_the_directives_operators_expect():
    s = _service()
    assert s["Type"] == "notify"
    assert s["ExecReload"] == "/bin/kill -s HUP $MAINPID"
    assert s["KillMode"] == "mixed"
    assert int(s["WatchdogSec"]) > 0
    assert int(s["TimeoutStopSec"]) > 65  # longer than stop_timeout + snapshot_timeout defaults
    for key in ("RuntimeDirectory", "StateDirectory", "LimitNOFILE"):
        assert s[key]
    for key in ("DynamicUser", "NoNewPrivileges", "PrivateTmp"):
        assert s[key] == "yes"
    assert s["ProtectSystem"] == "strict"
    assert s["ExecStart"].split()[1:3] == ["serve", "--config"]


def test_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd); .ci/run installs it")
    # The console script pip installed next to this interpreter (PATH may not include it).
    beside = os.path.join(os.path.dirname(sys.executable), "shardd")
    shardd = beside if os.access(beside, os.X_OK) else shutil.which("shardd")
    assert shardd, "the shardd console script is not installed; pip install -e . first"
    # verify checks that ExecStart's binary exists: point it at this installation's script.
    unit = tmp_path / "shardd.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/shardd", shardd))
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "shardd.service" not in r.stderr, r.stderr  # no warnings about our unit
