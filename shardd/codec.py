"""Compression of large values inside the store (docs/design.md: "compression of large values").

The store calls :meth:`ZstdCodec.pack` on every value of at least ``min_bytes`` and keeps the
result only when it saves at least ``min_saving`` of the value's length; reads call
:meth:`ZstdCodec.unpack`. Clients never see compressed bytes (docs/design.md, decision 7).

Why zstd at level 1: measured on this machine (bench/codecs.py) on JSON-like 4 KiB documents,
zstd-1 compressed 2.6-3x at ~24 us per value and decompressed in ~10 us; lz4 (block mode)
compressed only 1.7x, in 10 us / 4 us. A GET round trip is ~100 us, so zstd's extra 6 us on a
read is ~6% of one, and its ratio is what lets a shard hold 2-3x the documents. Higher levels
cost 30% more time for ~3% more ratio. Frames carry their content size, so ``raw_size`` needs
no decompression.
"""

from __future__ import annotations

import functools

import zstandard

LEVEL = 1


class ZstdCodec:
    """zstd level 1, one compressor and decompressor reused (they are not thread-safe; a worker
    is one thread)."""

    def __init__(self, min_bytes: int = 1024, min_saving: float = 0.1) -> None:
        if min_bytes < 1:
            raise ValueError(f"min_bytes must be >= 1, got {min_bytes}")
        if not 0.0 <= min_saving < 1.0:
            raise ValueError(f"min_saving must be in [0, 1), got {min_saving}")
        self.min_bytes = min_bytes
        self.min_saving = min_saving
        self._compress = zstandard.ZstdCompressor(level=LEVEL, write_checksum=False).compress
        self._decompress = zstandard.ZstdDecompressor().decompress

    def pack(self, value: bytes) -> bytes | None:
        """``value`` compressed, or None when that saves less than ``min_saving`` of it."""
        packed = self._compress(value)
        if len(packed) > len(value) * (1.0 - self.min_saving):
            return None
        return packed

    def unpack(self, data: bytes) -> bytes:
        return self._decompress(data)

    def raw_size(self, data: bytes) -> int:
        return zstandard.frame_content_size(data)


@functools.cache
def default_codec() -> ZstdCodec:
    """A codec for reading values stored compressed after compression was switched off."""
    return ZstdCodec()


def codec_for(compression: str, min_bytes: int, min_saving: float) -> ZstdCodec | None:
    """The codec the config names (``compression``: "zstd" or "off")."""
    return ZstdCodec(min_bytes, min_saving) if compression == "zstd" else None
