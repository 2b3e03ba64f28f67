"""Serializers: how a client turns Python values into the bytes the daemon stores, and back.

Values are opaque bytes on the wire and in the store (docs/design.md, decision 7); a serde
is a client-side collaborator, passed as ``Client(serde=...)`` the way pymemcache takes
``HashClient(serde=...)``. Every value a command sends (set, cas, set_many, append) goes
through ``dumps``; every value a command returns (get, gets, getdel, get_many) through
``loads``. Keys, counters (incr/decr) and admin replies never do.

Invariants
----------
1. ``loads(dumps(v)) == v`` for every value the serde accepts; ``dumps`` raises TypeError
   for one it does not, before anything is sent.
2. Without a serde (the default) a client sends and returns bytes exactly as before:
   bytes, bytearray or memoryview in, bytes out, nothing else accepted. That path calls no
   serde at all, so it costs nothing.
3. No pickle: a value read from a shared cache must not be able to run code.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

__all__ = ["MsgpackSerde", "Serde", "Utf8Serde"]


class Serde(Protocol):
    """What a client needs of a serializer."""

    def dumps(self, value: Any) -> bytes:
        """The bytes to store for ``value``; TypeError if it cannot be serialized."""
        ...

    def loads(self, data: bytes) -> Any:
        """The value that ``data`` (bytes this serde produced) stands for."""
        ...


class MsgpackSerde:
    """Any msgpack-able value (None, bool, int, float, str, bytes, list, dict) via msgspec."""

    __slots__ = ("_decode", "_encode")

    def __init__(self) -> None:
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder().decode

    def dumps(self, value: Any) -> bytes:
        try:
            return self._encode(value)
        except (TypeError, msgspec.EncodeError) as exc:
            raise TypeError(f"cannot serialize a {type(value).__name__} as msgpack: {exc}") from None

    def loads(self, data: bytes) -> Any:
        return self._decode(data)


class Utf8Serde:
    """str values, stored as UTF-8 (as redis-py's ``decode_responses=True``)."""

    __slots__ = ()

    def dumps(self, value: Any) -> bytes:
        if not isinstance(value, str):
            raise TypeError(f"value must be a str for Utf8Serde, not {type(value).__name__}")
        return value.encode()

    def loads(self, data: bytes) -> Any:
        return data.decode()
