"""Daemon configuration: one frozen, typed, validated object, built once.

Sources, later wins: built-in defaults < the TOML file (``--config``) < CLI flags. Every
default is justified in ``configs/shardd.toml``. The object is cheap and picklable, so the
supervisor hands it to each child; children derive paths from it but acquire nothing at
import time.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from shardd.errors import ConfigError
from shardd.hashing import MAX_SHARDS
from shardd.protocol import TUNABLE, Limits

LogLevel = Literal["debug", "info", "warning", "error"]
EvictionPolicy = Literal["allkeys-lru", "allkeys-lfu", "volatile-ttl", "allkeys-random", "noeviction"]
Compression = Literal["zstd", "off"]
RespFront = Literal["workers", "router"]

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")
SIZE_KEYS = ("max_key_bytes", "max_value_bytes", "max_message_bytes", "max_memory")
_ENDPOINT_RE = re.compile(r"^(tcp://[^\s]+:\d+|ipc://\S+)$")
_HOST_PORT_RE = re.compile(r"^(\[[0-9a-fA-F:]+\]|[^\s:\[\]]+):(\d{1,5})$")


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Every setting of the daemon. See configs/shardd.toml for why each default is what it is."""

    bind: str = "tcp://127.0.0.1:7400"
    shards: int = 0
    runtime_dir: str = ""
    mailbox_limit: int = 1024
    max_key_bytes: int = 1024
    max_value_bytes: int = 1024 * 1024
    max_message_bytes: int = 16 * 1024 * 1024
    expiry_interval_ms: int = 100
    expiry_budget_ms: int = 5
    pin_cpus: bool = True
    stop_timeout: float = 5.0
    ready_timeout: float = 15.0
    log_level: LogLevel = "info"
    enable_debug_ops: bool = False
    max_memory: int = 1024**3
    eviction_policy: EvictionPolicy = "allkeys-lru"
    compression: Compression = "zstd"
    compression_min_bytes: int = 1024
    compression_min_saving: float = 0.1
    imbalance_threshold: float = 1.5
    imbalance_check_s: float = 10.0
    hotkeys_capacity: int = 256
    metrics_bind: str = ""
    state_dir: str = ""
    direct: bool = True
    snapshot_on_stop: bool = True
    snapshot_interval: float = 0.0
    snapshot_timeout: float = 60.0
    allow_remote_without_auth: bool = False
    auth_dir: str = ""
    # Cluster mode (docs/cluster.md): on when cluster_etcd names at least one etcd endpoint.
    cluster_etcd: list[str] = msgspec.field(default_factory=list)
    cluster_name: str = "shardd"
    cluster_node_id: str = ""       # "": the advertised endpoint
    cluster_advertise: str = ""     # "": bind (which must then not be a wildcard or ipc)
    cluster_lease_ttl: int = 5
    cluster_leave_timeout: float = 60.0
    cluster_replicas: int = 0       # 1: each slot's writes stream to a second node, promoted if the owner dies
    # The Redis-protocol endpoint (docs/resp.md): off unless resp_bind is set.
    resp_bind: str = ""             # e.g. "tcp://127.0.0.1:6380"
    resp_password: str = ""         # Redis requirepass: the "default" user's password
    resp_admin_password: str = ""   # the "admin" user's; when set, FLUSHALL/FLUSHDB need it
    resp_max_clients: int = 10000   # Redis maxclients (per process serving the endpoint)
    resp_front: RespFront = "router"  # who serves RESP connections: the router's loop, or every worker
    # Near caches (docs/near-cache.md): each worker marks its hot keys and publishes their invalidations.
    near_cache: bool = True
    hot_key_share: float = 0.005    # marked hot at >= this share of its shard's served ops (unmarked below half)
    # ...and at >= this many accesses per second (an idle shard marks nothing). At 200/s a 2-core machine serving
    # ~4k ops/s marked only its top 2-3 Zipf keys (bench/RESULTS.md, "Near caches").
    hot_key_min_rate: float = 10.0
    hot_keys_max: int = 64          # at most this many keys marked per shard; 0: none
    # How long a client may keep a hot value, counted from its read. Gaps, heartbeats, a lost connection and
    # the 0.5 s silence rule catch lost messages first; the lease is the last resort, and sets how often
    # every client re-reads every hot key (a 1 s lease cost shard 0 41% of its remaining work in the bench).
    near_cache_lease_ms: int = 5000

    def __post_init__(self) -> None:
        if not _ENDPOINT_RE.match(self.bind):
            raise ValueError(f"must be tcp://HOST:PORT or ipc://PATH, got {self.bind!r} - at `$.bind`")
        if not self.auth_dir and not self.allow_remote_without_auth and not is_local_endpoint(self.bind):
            # Protected mode (Redis's precedent): an unauthenticated cache reachable from other
            # hosts is an open door to every service's data, so serving one must be explicit.
            raise ValueError(f"{self.bind} is reachable from other hosts and shardd has no authentication; "
                             f"bind loopback or ipc, set auth_dir (CURVE keys: shardd keys generate), "
                             f"or set allow_remote_without_auth = true - at `$.bind`")
        if self.resp_bind:
            if not re.match(r"^tcp://(\[[0-9a-fA-F:]+\]|[^\s:\[\]/]+):\d{1,5}$", self.resp_bind):
                raise ValueError(f"must be tcp://HOST:PORT, got {self.resp_bind!r} - at `$.resp_bind`")
            if not (self.resp_password or self.allow_remote_without_auth or is_local_endpoint(self.resp_bind)):
                # Redis's protected mode: no password and reachable from other hosts is refused.
                raise ValueError(f"{self.resp_bind} is reachable from other hosts and the RESP endpoint has no "
                                 f"password; bind loopback, set resp_password, or set allow_remote_without_auth "
                                 f"= true - at `$.resp_bind`")
            if self.cluster_etcd:
                raise ValueError("the RESP endpoint is not available in cluster mode yet (Redis clients cannot "
                                 "follow shardd's slot map); unset resp_bind or cluster_etcd - at `$.resp_bind`")
        checks: list[tuple[str, bool, str]] = [
            ("shards", 0 <= self.shards <= MAX_SHARDS, f"between 0 (one per CPU) and {MAX_SHARDS}"),
            ("mailbox_limit", 1 <= self.mailbox_limit <= 10_000_000, "between 1 and 10000000"),
            ("max_key_bytes", 1 <= self.max_key_bytes <= 65536, "between 1 and 65536"),
            ("max_value_bytes", 1 <= self.max_value_bytes <= 512 * 1024**2, "between 1 and 512MiB"),
            ("max_message_bytes", self.max_message_bytes >= self.max_value_bytes + self.max_key_bytes + 64,
             "at least max_value_bytes + max_key_bytes + 64, so one largest SET fits"),
            ("max_message_bytes", self.max_message_bytes <= 1024**3, "at most 1GiB"),
            ("expiry_interval_ms", 1 <= self.expiry_interval_ms <= 60_000, "between 1 and 60000"),
            ("expiry_budget_ms", 0 < self.expiry_budget_ms <= self.expiry_interval_ms,
             "positive and at most expiry_interval_ms"),
            ("stop_timeout", 0 < self.stop_timeout <= 600, "between 0 and 600 seconds"),
            ("ready_timeout", 0 < self.ready_timeout <= 600, "between 0 and 600 seconds"),
            ("snapshot_interval", self.snapshot_interval == 0 or 1 <= self.snapshot_interval <= 86400,
             "0 (off) or between 1 and 86400 seconds"),
            ("snapshot_timeout", 0 < self.snapshot_timeout <= 3600, "between 0 and 3600 seconds"),
            ("max_memory", 1024**2 <= self.max_memory <= 1 << 50, "between 1MiB and 1PiB"),
            ("imbalance_threshold", 1.0 < self.imbalance_threshold <= 1000, "a ratio above 1.0"),
            ("imbalance_check_s", 0.1 <= self.imbalance_check_s <= 3600, "between 0.1 and 3600 seconds"),
            ("compression_min_bytes", 64 <= self.compression_min_bytes <= 512 * 1024**2,
             "between 64 and 512MiB (values shorter than that are never compressed)"),
            ("compression_min_saving", 0.0 <= self.compression_min_saving < 1.0,
             "a fraction in [0, 1): a compressed value is kept only if it saves at least this much"),
            ("hotkeys_capacity", 0 <= self.hotkeys_capacity <= 100_000, "between 0 (off) and 100000"),
            ("resp_max_clients", 1 <= self.resp_max_clients <= 1_000_000, "between 1 and 1000000"),
            ("hot_key_share", 0.0 < self.hot_key_share <= 1.0, "a fraction in (0, 1]"),
            ("hot_key_min_rate", 0.0 <= self.hot_key_min_rate <= 1e9, "between 0 and 1e9 accesses per second"),
            ("hot_keys_max", 0 <= self.hot_keys_max <= 10_000, "between 0 (none) and 10000"),
            ("near_cache_lease_ms", 1 <= self.near_cache_lease_ms <= 60_000, "between 1 and 60000"),
            ("metrics_bind", self.metrics_bind == "" or _HOST_PORT_RE.match(self.metrics_bind) is not None,
             '"" (off) or HOST:PORT, e.g. "127.0.0.1:9400"'),
        ]
        if self.cluster_etcd:
            checks += [
                ("cluster_etcd", all(re.match(r"^https?://[^\s/]+:\d+$", e) for e in self.cluster_etcd),
                 'a list of etcd client URLs like ["http://127.0.0.1:2379"]'),
                ("cluster_name", re.match(r"^[A-Za-z0-9_.-]{1,64}$", self.cluster_name) is not None,
                 "1-64 letters, digits, '.', '_' or '-'"),
                ("cluster_advertise", _advertisable(self.advertised_endpoint()),
                 "tcp://HOST:PORT other nodes and clients can reach (bind is a wildcard or ipc: set it)"),
                ("cluster_lease_ttl", 2 <= self.cluster_lease_ttl <= 300,
                 "between 2 (etcd's shortest lease) and 300 seconds"),
                ("cluster_leave_timeout", 0 < self.cluster_leave_timeout <= 3600, "between 0 and 3600 seconds"),
                ("cluster_replicas", self.cluster_replicas in (0, 1), "0 (off) or 1"),
            ]
        for key, ok, expected in checks:
            if not ok:
                raise ValueError(f"must be {expected}, got {getattr(self, key)!r} - at `$.{key}`")

    @property
    def limits(self) -> Limits:
        return Limits(self.max_key_bytes, self.max_value_bytes, self.max_message_bytes)

    def shard_max_bytes(self, shards: int) -> int:
        """One shard's share of ``max_memory``: split evenly, as jump hashing spreads keys evenly."""
        return self.max_memory // max(1, shards)

    def metrics_address(self) -> tuple[str, int] | None:
        """``metrics_bind`` as (host, port), or None when the metrics endpoint is off."""
        m = _HOST_PORT_RE.match(self.metrics_bind)
        return (m.group(1).strip("[]"), int(m.group(2))) if m else None

    @property
    def clustered(self) -> bool:
        return bool(self.cluster_etcd)

    def advertised_endpoint(self) -> str:
        """The public endpoint other nodes and clients are told about (cluster mode)."""
        return self.cluster_advertise or self.bind

    def node_id(self) -> str:
        """This node's id in the cluster: as configured, else its advertised endpoint."""
        return self.cluster_node_id or self.advertised_endpoint()

    def cluster_prefix(self) -> str:
        """Where this cluster's keys live in etcd."""
        return f"/shardd/{self.cluster_name}/"

    def agent_endpoint(self) -> str:
        """The cluster agent's local endpoint (the supervisor asks it to leave)."""
        return f"ipc://{os.path.join(self.runtime_dir, 'agent.ipc')}"

    def shard_count(self) -> int:
        """The number of shards: as configured, or one per CPU this process may run on."""
        return self.shards or len(allowed_cpus())

    def direct_host(self) -> str:
        """Where workers bind their direct-mode endpoints: the public endpoint's host (tcp), else loopback."""
        if self.bind.startswith("tcp://"):
            host = self.bind.removeprefix("tcp://").rsplit(":", 1)[0]
            return "127.0.0.1" if host in ("*", "0.0.0.0", "localhost") else host
        return "127.0.0.1"

    def worker_endpoint(self, shard: int) -> str:
        return f"ipc://{os.path.join(self.runtime_dir, f'shard-{shard}.ipc')}"

    def control_endpoint(self) -> str:
        """A second, local-only endpoint of the router, used by the supervisor's readiness check."""
        return f"ipc://{os.path.join(self.runtime_dir, 'router.ipc')}"


# --- which settings apply live, and who applies them ----------------------------------
#
# The one place that says it. A setting is either RESTART (it shapes processes and sockets made
# at start-up: a SIGHUP that changes it logs that a restart is needed) or live, applied by the
# roles listed when the supervisor sends it on (SIGHUP → configure) or an operator tunes it
# (protocol.TUNABLE: the keys the tune op accepts, which must be live). The router and the
# workers take live values only from their validated ``config`` (``configure``).

SUPERVISOR, ROUTER, WORKER = "supervisor", "router", "worker"
RESTART: frozenset[str] = frozenset()


class Setting(msgspec.Struct, frozen=True):
    """``applied_by``: the roles that apply a new value live; empty: restart-only."""

    applied_by: frozenset[str]


SETTINGS: dict[str, Setting] = {
    "bind": Setting(RESTART),
    "shards": Setting(RESTART),  # changed live by the resize op, never by configuration
    "runtime_dir": Setting(RESTART),
    "pin_cpus": Setting(RESTART),
    "enable_debug_ops": Setting(RESTART),
    "metrics_bind": Setting(RESTART),
    "direct": Setting(RESTART),
    "state_dir": Setting(RESTART),
    "allow_remote_without_auth": Setting(RESTART),
    "auth_dir": Setting(RESTART),
    "cluster_etcd": Setting(RESTART),
    "cluster_name": Setting(RESTART),
    "cluster_node_id": Setting(RESTART),
    "cluster_advertise": Setting(RESTART),
    "cluster_lease_ttl": Setting(RESTART),
    "cluster_leave_timeout": Setting(RESTART),
    "cluster_replicas": Setting(RESTART),
    "resp_bind": Setting(RESTART),
    "resp_password": Setting(RESTART),
    "resp_admin_password": Setting(RESTART),
    "resp_max_clients": Setting(RESTART),
    "resp_front": Setting(RESTART),
    "near_cache": Setting(RESTART),  # the invalidation feed's socket is bound at start
    "hot_key_share": Setting(frozenset({WORKER})),
    "hot_key_min_rate": Setting(frozenset({WORKER})),
    "hot_keys_max": Setting(frozenset({WORKER})),
    "near_cache_lease_ms": Setting(frozenset({WORKER})),
    "mailbox_limit": Setting(frozenset({ROUTER, WORKER})),  # workers: direct clients' bound
    "max_memory": Setting(frozenset({WORKER})),
    "eviction_policy": Setting(frozenset({WORKER})),
    # Live for values written from then on; stored values are read whichever way they were kept.
    "compression": Setting(frozenset({WORKER})),
    "compression_min_bytes": Setting(frozenset({WORKER})),
    "compression_min_saving": Setting(frozenset({WORKER})),
    # Live up to twice the value at start: the sockets' MAXMSGSIZE is set once, at that.
    "max_message_bytes": Setting(frozenset({ROUTER, WORKER})),
    "max_key_bytes": Setting(frozenset({ROUTER, WORKER})),
    "max_value_bytes": Setting(frozenset({ROUTER, WORKER})),
    "expiry_interval_ms": Setting(frozenset({WORKER})),
    "expiry_budget_ms": Setting(frozenset({WORKER})),
    "hotkeys_capacity": Setting(frozenset({WORKER})),
    "log_level": Setting(frozenset({SUPERVISOR, ROUTER, WORKER})),
    "imbalance_threshold": Setting(frozenset({ROUTER})),
    "imbalance_check_s": Setting(frozenset({ROUTER})),
    "stop_timeout": Setting(frozenset({SUPERVISOR, ROUTER})),
    "ready_timeout": Setting(frozenset({SUPERVISOR})),
    "snapshot_on_stop": Setting(frozenset({SUPERVISOR})),
    "snapshot_interval": Setting(frozenset({SUPERVISOR})),
    "snapshot_timeout": Setting(frozenset({SUPERVISOR})),
}
if set(SETTINGS) != set(Config.__struct_fields__):
    raise ImportError(f"config keys not classified in SETTINGS: {set(SETTINGS) ^ set(Config.__struct_fields__)}")
if not all(SETTINGS[k].applied_by & {ROUTER, WORKER} for k in TUNABLE):
    raise ImportError("protocol.TUNABLE names a setting the router and workers do not apply live")

# Views of SETTINGS.
RESTART_KEYS = frozenset(k for k, s in SETTINGS.items() if not s.applied_by)
ROUTER_LIVE = frozenset(k for k, s in SETTINGS.items() if ROUTER in s.applied_by)
WORKER_LIVE = frozenset(k for k, s in SETTINGS.items() if WORKER in s.applied_by)


def is_local_endpoint(endpoint: str) -> bool:
    """True for ipc:// and for tcp:// on a loopback address (127.0.0.0/8, ::1, localhost).

    Anything else counts as remote: wildcards (``*``, ``0.0.0.0``, ``::``), interface names
    and host names, which are not resolved here (validation does no I/O).
    """
    if endpoint.startswith("ipc://"):
        return True
    host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _advertisable(endpoint: str) -> bool:
    if not endpoint.startswith("tcp://") or not _ENDPOINT_RE.match(endpoint):
        return False
    host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0]
    return host not in ("*", "0.0.0.0", "[::]", "::")


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask), in ascending order."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def parse_size(value: Any, key: str) -> int:
    """``1048576``, ``"1MiB"``, ``"512 KiB"``, ``"16MB"`` → bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size like 1048576 or \"1MiB\", got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    raise ConfigError(f"{key}: expected a size like 1048576 or \"1MiB\", got {value!r}")


def build_config(file_values: Mapping[str, Any] | None = None,
                 overrides: Mapping[str, Any] | None = None) -> Config:
    """Merge file values and overrides (None values ignored) into a validated Config."""
    raw: dict[str, Any] = dict(file_values or {})
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    for key in SIZE_KEYS:
        if key in raw:
            raw[key] = parse_size(raw[key], key)
    try:
        return msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(_friendly(str(exc))) from None


def read_config_file(path: str) -> dict[str, Any]:
    """Read a TOML file into a dict, turning every failure into a one-line ConfigError."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}); TOML must be UTF-8") from None
    return data


def load_config(path: str | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults < file at ``path`` (if given) < overrides."""
    file_values = read_config_file(path) if path else {}
    try:
        return build_config(file_values, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None


def _friendly(message: str) -> str:
    """msgspec says '... - at `$.shards`'; put the key first: 'shards: ...'."""
    m = re.search(r" - at `\$\.([A-Za-z_]+)[^`]*`$", message)
    if m:
        return f"{m.group(1)}: {message[: m.start()]}"
    m = re.match(r"Object contains unknown field `([^`]+)`", message)
    if m:
        return f"{m.group(1)}: unknown key (see configs/shardd.toml for the valid ones)"
    return message
