"""shardd: a shard-per-core cache daemon, and its client library."""

from shardd.errors import (
    BadRequest,
    Busy,
    ConfigError,
    ConnectionClosed,
    Forbidden,
    InternalError,
    Maintenance,
    Moved,
    NotInteger,
    OutOfMemory,
    ProtocolError,
    ServerError,
    SharddError,
    Timeout,
    TooLarge,
    TryAgain,
    Unavailable,
    UnsupportedVersion,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient", "AsyncClusterClient", "BadRequest", "Busy", "Client", "ClusterClient", "ConfigError",
    "ConnectionClosed", "Forbidden", "InternalError", "Maintenance", "Moved", "NotInteger", "OutOfMemory",
    "ProtocolError", "ServerError", "SharddError", "Timeout", "TooLarge", "TryAgain", "Unavailable",
    "UnsupportedVersion", "__version__", "load_curve",
]


def __getattr__(name: str):  # lazy, so `import shardd` in the daemon does not load client code
    if name == "Client":
        from shardd.client import Client
        return Client
    if name == "AsyncClient":
        from shardd.aclient import AsyncClient
        return AsyncClient
    if name in ("ClusterClient", "AsyncClusterClient"):
        from shardd import cluster_client
        return getattr(cluster_client, name)
    if name == "load_curve":  # CURVE keys for Client(curve=...), from an auth_dir
        from shardd.transport_client import load_curve
        return load_curve
    raise AttributeError(name)
