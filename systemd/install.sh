#!/bin/sh
# Install shardd as a systemd service: README.md, "Run it under systemd".
#
#   sudo systemd/install.sh              # install or upgrade, then (re)start the service
#   sudo systemd/install.sh --no-start   # everything but starting it
#   DESTDIR=/tmp/root systemd/install.sh # stage the files under /tmp/root only (tests)
#
# Every step is skipped when it is already done, so running it again upgrades shardd in place
# and keeps an edited /etc/shardd/shardd.toml.
#
# Environment: PREFIX (default /opt/shardd: outside /home and /root, which the unit's
# ProtectHome= hides), PYTHON (default python3, 3.11+), DESTDIR (default empty; when set,
# files go under it and users, apt and systemctl are left alone; the venv's scripts then
# point into DESTDIR, so a staged tree is for testing, not for copying elsewhere).
set -eu

PREFIX=${PREFIX:-/opt/shardd}
PYTHON=${PYTHON:-python3}
DESTDIR=${DESTDIR:-}
START=yes
for arg in "$@"; do
    case $arg in
        --no-start) START=no ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done

SRC=$(cd "$(dirname "$0")/.." && pwd)
ROOT=$DESTDIR
say() { echo "install.sh: $*"; }

if [ -z "$DESTDIR" ] && [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (sudo), or set DESTDIR to stage the files elsewhere" >&2
    exit 1
fi

# 1. A virtualenv for shardd and its dependencies. Debian's python3 refuses `pip install`
#    into the system (externally-managed-environment, PEP 668) and ships venv separately
#    (python3-venv): without it `python3 -m venv` fails for want of ensurepip.
if [ ! -x "$ROOT$PREFIX/bin/pip" ]; then
    say "creating the virtualenv $ROOT$PREFIX"
    if ! "$PYTHON" -m venv "$ROOT$PREFIX"; then
        if [ -z "$DESTDIR" ] && command -v apt-get >/dev/null 2>&1; then
            say "installing python3-venv (apt-get) and trying again"
            apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
            "$PYTHON" -m venv "$ROOT$PREFIX"
        else
            echo "install.sh: $PYTHON cannot create a virtualenv; install python3-venv" >&2
            exit 1
        fi
    fi
fi
say "installing shardd from $SRC into $ROOT$PREFIX"
"$ROOT$PREFIX/bin/python" -m pip install --quiet --upgrade "$SRC"
"$ROOT$PREFIX/bin/shardd" --help >/dev/null

# 2. The documentation the unit's Documentation= points at.
install -d -m 0755 "$ROOT$PREFIX/share/doc/shardd"
install -m 0644 "$SRC/README.md" "$SRC"/docs/*.md "$SRC/configs/shardd.toml" "$ROOT$PREFIX/share/doc/shardd/"

# 3. The service's user and group. The unit says DynamicUser=yes with User=shardd and
#    Group=shardd: with a static user and group of that name systemd uses them (and keeps
#    the sandboxing DynamicUser implies), so local users can be given access to an ipc
#    endpoint by joining the group (usermod -aG shardd NAME).
if [ -z "$DESTDIR" ]; then
    if ! getent group shardd >/dev/null; then
        say "creating the system group shardd"
        groupadd --system shardd
    fi
    if ! getent passwd shardd >/dev/null; then
        say "creating the system user shardd"
        useradd --system --gid shardd --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin --comment "shardd cache daemon" shardd
    fi
fi

# 4. The configuration: installed once; an existing file is the operator's and is kept.
if [ -e "$ROOT/etc/shardd/shardd.toml" ]; then
    say "keeping the existing /etc/shardd/shardd.toml"
else
    install -D -m 0644 "$SRC/configs/shardd.toml" "$ROOT/etc/shardd/shardd.toml"
fi
"$ROOT$PREFIX/bin/shardd" check-config "$ROOT/etc/shardd/shardd.toml" >/dev/null

# 5. The unit, as shipped (ExecStart and Documentation name /opt/shardd; another PREFIX is
#    substituted in).
install -d -m 0755 "$ROOT/etc/systemd/system"
sed "s#/opt/shardd/#$PREFIX/#g" "$SRC/systemd/shardd.service" > "$ROOT/etc/systemd/system/shardd.service.tmp"
chmod 0644 "$ROOT/etc/systemd/system/shardd.service.tmp"
mv "$ROOT/etc/systemd/system/shardd.service.tmp" "$ROOT/etc/systemd/system/shardd.service"

if [ -n "$DESTDIR" ]; then
    say "staged under $DESTDIR; systemd and users left alone"
    exit 0
fi
systemctl daemon-reload
systemctl enable shardd
if [ "$START" = yes ]; then
    systemctl restart shardd  # starts it, or restarts an upgraded one (warm: snapshot on stop)
    say "started; systemctl status shardd"
else
    say "installed; start with: systemctl start shardd"
fi
