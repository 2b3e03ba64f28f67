"""The shipped unit file and its install script (README.md, "Run it under systemd").

There is no running systemd here, so the install is checked as far as a staging root allows:
`systemd/install.sh` with DESTDIR puts every file where it would put it on a real system, and
`systemd-analyze verify --root=DESTDIR shardd.service` then checks the unit exactly as
installed (verify resolves ExecStart= and the units it depends on inside the root, so the
installed venv's shardd must really be there and executable).
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "shardd.service"
INSTALL = REPO / "systemd" / "install.sh"
EXEC = "/opt/shardd/bin/shardd"


def _section(name: str) -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keep directive case
    parser.read(UNIT)
    return dict(parser[name])


def _analyze() -> str:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd); .ci/run installs it")
    return analyze


def _host_parts(root: Path) -> None:
    """What verify needs from the host inside the root: /bin/kill (ExecReload) and the units
    shardd.service depends on (sysinit.target, multi-user.target, ...). Debian's merged /usr
    layout, with relative symlinks so that they resolve inside the root."""
    (root / "usr" / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(shutil.which("kill") or "/bin/kill", root / "usr" / "bin" / "kill")
    shutil.copytree("/usr/lib/systemd/system", root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    for link, target in (("bin", "usr/bin"), ("lib", "usr/lib")):
        if not (root / link).exists():
            (root / link).symlink_to(target)


def _verify(analyze: str, root: Path) -> None:
    r = subprocess.run([analyze, "verify", f"--root={root}", "shardd.service"], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "shardd.service" not in r.stderr, r.stderr  # no warnings about our unit


def test_unit_has_the_directives_operators_expect():
    s = _section("Service")
    assert s["Type"] == "notify"
    assert s["ExecReload"] == "/bin/kill -s HUP $MAINPID"
    assert s["KillMode"] == "mixed"
    assert int(s["WatchdogSec"]) > 0
    assert int(s["TimeoutStopSec"]) > 65  # longer than stop_timeout + snapshot_timeout defaults
    for key in ("RuntimeDirectory", "StateDirectory", "LimitNOFILE"):
        assert s[key]
    for key in ("DynamicUser", "NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert s[key] == "yes"
    assert s["ProtectSystem"] == "strict"
    assert s["ExecStart"].split() == [EXEC, "serve", "--config", "/etc/shardd/shardd.toml"]


def test_unit_lets_the_shardd_group_reach_an_ipc_endpoint():
    s = _section("Service")
    # The group may enter /run/shardd (a public ipc socket there is 0660); others may not.
    assert (s["User"], s["Group"]) == ("shardd", "shardd")
    assert int(s["RuntimeDirectoryMode"], 8) == 0o750
    assert int(s["StateDirectoryMode"], 8) == 0o700


def test_unit_documentation_is_shardds_own():
    text = UNIT.read_text()
    docs = [line.split("=", 1)[1] for line in text.splitlines() if line.startswith("Documentation=")]
    assert docs and all(d.startswith("file:///opt/shardd/share/doc/shardd/") for d in docs), docs
    # install.sh copies README.md and docs/*.md there.
    names = {d.rsplit("/", 1)[1] for d in docs}
    assert names <= {"README.md"} | {p.name for p in (REPO / "docs").glob("*.md")}


def test_install_script_and_unit_agree_on_the_prefix():
    script = INSTALL.read_text()
    assert "PREFIX=${PREFIX:-/opt/shardd}" in script
    assert os.access(INSTALL, os.X_OK)
    assert "sudo systemd/install.sh" in (REPO / "README.md").read_text()


def test_systemd_analyze_verify_of_the_unit_as_placed(tmp_path):
    """Fast: the unit file unchanged, in /etc/systemd/system of a root whose /opt/shardd/bin/shardd
    is this installation's console script (a real, runnable one)."""
    analyze = _analyze()
    beside = os.path.join(os.path.dirname(sys.executable), "shardd")
    shardd = beside if os.access(beside, os.X_OK) else shutil.which("shardd")
    assert shardd, "the shardd console script is not installed; pip install -e . first"
    root = tmp_path / "root"
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    shutil.copy2(UNIT, root / "etc" / "systemd" / "system" / "shardd.service")
    exe = root / EXEC.lstrip("/")
    exe.parent.mkdir(parents=True)
    shutil.copy2(shardd, exe)
    _host_parts(root)
    _verify(analyze, root)
    # And verify does check ExecStart=: without the executable the same root fails.
    exe.unlink()
    r = subprocess.run([analyze, "verify", f"--root={root}", "shardd.service"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and EXEC in r.stderr, r.stderr


def test_install_script_stages_a_working_install(tmp_path):
    """The documented install, for real, into a staging root: venv + pip install of this repo
    (~35 s, most of it pip), docs, config, unit; then verify, run the installed shardd, and run
    the script again (an upgrade: the operator's config is kept). Needs pip to reach an index."""
    analyze = _analyze()
    root = tmp_path / "root"
    env = {**os.environ, "DESTDIR": str(root), "PYTHON": sys.executable}
    env.pop("VIRTUAL_ENV", None)
    r = subprocess.run([str(INSTALL)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    installed = root / "etc" / "systemd" / "system" / "shardd.service"
    assert installed.read_bytes() == UNIT.read_bytes()  # exactly the shipped file
    config = root / "etc" / "shardd" / "shardd.toml"
    assert config.read_bytes() == (REPO / "configs" / "shardd.toml").read_bytes()
    for doc in ("README.md", "design.md"):
        assert (root / "opt" / "shardd" / "share" / "doc" / "shardd" / doc).is_file()
    exe = root / EXEC.lstrip("/")
    h = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert h.returncode == 0 and "serve" in h.stdout, h.stdout + h.stderr
    c = subprocess.run([str(exe), "check-config", str(config)], capture_output=True, text=True, timeout=60)
    assert c.returncode == 0, c.stdout + c.stderr

    _host_parts(root)
    _verify(analyze, root)

    edited = config.read_text().replace("\nmailbox_limit = 1024\n", "\nmailbox_limit = 512\n")
    assert edited != config.read_text()
    config.write_text(edited)
    r = subprocess.run([str(INSTALL)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert config.read_text() == edited
    assert installed.read_bytes() == UNIT.read_bytes()
