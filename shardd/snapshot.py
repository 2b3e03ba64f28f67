"""Warm-restart snapshots: the file format, and writing it safely.

A snapshot is a *generation*: one file per shard of the run that wrote it, in
``<state_dir>/snapshots/<generation>/``, made current by atomically replacing
``<state_dir>/snapshots/CURRENT`` with the generation's name. The format does not depend on
the shard count: every worker of the next run reads every file of the current generation and
keeps the keys that ``shard_for`` gives it, so a restart with another ``--shards`` still
loads every key into its new owner.

File layout (all integers big-endian)::

    b"SHRDSNP1"                      magic and format version
    u32 header length, header        msgpack map: created_ms, shard, shards, entries
    body                             msgpack array of [key, value, expires_at_ms, version]
    u64 xxh3_64(header + body)       checksum

``expires_at_ms`` is wall-clock (Unix) milliseconds, 0 for "no TTL": monotonic clocks do not
survive a reboot, so TTLs are carried across a restart by wall-clock time and entries that
expired while the daemon was down are dropped on load.

Rules:
1. A file is written to a temporary name, fsynced, renamed, and its directory fsynced; CURRENT
   likewise. A crash at any point leaves either the old generation or the new one current.
2. A truncated, corrupt or unknown-version file raises SnapshotError naming the problem; the
   caller logs it and starts without it. Nothing half-loaded is served.
3. Loading consumes the generation (CURRENT is removed once the daemon is ready), so a later
   crash cannot bring back data that was deleted or overwritten since (stale cache entries are
   worse than a cold cache). Periodic snapshots (``snapshot_interval``) are the opt-in way to
   keep a recent generation on disk while serving.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import time
from collections.abc import Iterable
from typing import Any

import msgspec
import xxhash

MAGIC = b"SHRDSNP1"
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

Entry = tuple[bytes, bytes, int, int]  # key, value, expires_at wall ms (0 = none), version


class SnapshotError(Exception):
    """Raised when a snapshot file is missing, truncated, corrupt or of an unknown format."""


class _Header(msgspec.Struct, frozen=True):
    created_ms: int
    shard: int
    shards: int
    entries: int


_body_decoder = msgspec.msgpack.Decoder(list[tuple[bytes, bytes, int, int]])
_header_decoder = msgspec.msgpack.Decoder(_Header)


def encode(entries: list[Entry], shard: int, shards: int, created_ms: int) -> bytes:
    """The bytes of one shard's snapshot file."""
    header = msgspec.msgpack.encode(_Header(created_ms, shard, shards, len(entries)))
    body = msgspec.msgpack.encode(entries)
    checksum = xxhash.xxh3_64_intdigest(header + body)
    return b"".join((MAGIC, _U32.pack(len(header)), header, body, _U64.pack(checksum)))


def peek_header(data: bytes, name: str = "snapshot") -> dict[str, Any]:
    """The header of a snapshot file without decoding (or checking) its body."""
    if len(data) < len(MAGIC) + _U32.size or data[: len(MAGIC)] != MAGIC:
        raise SnapshotError(f"{name}: not a shardd snapshot (or truncated)")
    (header_len,) = _U32.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _U32.size
    try:
        return msgspec.structs.asdict(_header_decoder.decode(data[start : start + header_len]))
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SnapshotError(f"{name}: undecodable header ({exc})") from None


def decode(data: bytes, name: str = "snapshot") -> tuple[dict[str, Any], list[Entry]]:
    """Verify and decode a snapshot file's bytes; raises SnapshotError saying what is wrong."""
    if len(data) < len(MAGIC) + _U32.size + _U64.size:
        raise SnapshotError(f"{name}: truncated ({len(data)} bytes)")
    if data[: len(MAGIC)] != MAGIC:
        raise SnapshotError(f"{name}: not a shardd snapshot (or an unknown format version)")
    (header_len,) = _U32.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _U32.size
    end = len(data) - _U64.size
    if start + header_len > end:
        raise SnapshotError(f"{name}: truncated header")
    (checksum,) = _U64.unpack_from(data, end)
    if xxhash.xxh3_64_intdigest(data[start:end]) != checksum:
        raise SnapshotError(f"{name}: checksum mismatch (truncated or corrupt)")
    try:
        header = _header_decoder.decode(data[start : start + header_len])
        entries = _body_decoder.decode(data[start + header_len : end])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SnapshotError(f"{name}: undecodable ({exc})") from None
    if len(entries) != header.entries:
        raise SnapshotError(f"{name}: header says {header.entries} entries, body has {len(entries)}")
    return msgspec.structs.asdict(header), entries


# --- files ------------------------------------------------------------------------------


def snapshots_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "snapshots")


def shard_file(generation_dir: str, shard: int) -> str:
    return os.path.join(generation_dir, f"shard-{shard}.snap")


def write_atomic(path: str, data: bytes) -> None:
    """Rule 1: temp file, fsync, rename, fsync the directory."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def new_generation(state_dir: str) -> str:
    """Create and return an empty directory for a new generation."""
    base = snapshots_dir(state_dir)
    os.makedirs(base, mode=0o700, exist_ok=True)
    name = f"gen-{time.time_ns()}"
    path = os.path.join(base, name)
    os.mkdir(path, 0o700)
    return path


def commit(state_dir: str, generation_dir: str) -> None:
    """Make ``generation_dir`` current and remove every other generation."""
    base = snapshots_dir(state_dir)
    write_atomic(os.path.join(base, "CURRENT"), os.path.basename(generation_dir).encode())
    for name in os.listdir(base):
        path = os.path.join(base, name)
        if name.startswith("gen-") and path != generation_dir:
            shutil.rmtree(path, ignore_errors=True)


def current(state_dir: str) -> str | None:
    """The current generation's directory, or None if there is none."""
    base = snapshots_dir(state_dir)
    try:
        with open(os.path.join(base, "CURRENT"), "rb") as f:
            name = f.read().decode().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    path = os.path.join(base, name)
    return path if name.startswith("gen-") and os.path.isdir(path) else None


def consume(state_dir: str) -> None:
    """Rule 3: forget the current generation once it has been loaded."""
    base = snapshots_dir(state_dir)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(base, "CURRENT"))
        _fsync_dir(base)
    for name in os.listdir(base) if os.path.isdir(base) else []:
        if name.startswith("gen-"):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)


def read_generation(generation_dir: str) -> Iterable[tuple[str, bytes]]:
    """(file name, bytes) of every shard file in a generation, in name order."""
    for name in sorted(os.listdir(generation_dir)):
        if name.endswith(".snap"):
            with open(os.path.join(generation_dir, name), "rb") as f:
                yield name, f.read()


def _fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
