"""shardd: a shard-per-core cache daemon, and its client library."""

from shardd.errors import (
    BadRequest,
    Busy,
    ConfigError,
    InternalError,
    NotInteger,
    ProtocolError,
    ServerError,
    SharddError,
    Timeout,
    TooLarge,
    Unavailable,
    UnsupportedVersion,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient", "BadRequest", "Busy", "Client", "ConfigError", "InternalError", "NotInteger",
    "ProtocolError", "ServerError", "SharddError", "Timeout", "TooLarge", "Unavailable",
    "UnsupportedVersion", "__version__",
]


def __getattr__(name: str):  # lazy, so `import shardd` in the daemon does not load client code
    if name == "Client":
        from shardd.client import Client
        return Client
    if name == "AsyncClient":
        from shardd.aclient import AsyncClient
        return AsyncClient
    raise AttributeError(name)
