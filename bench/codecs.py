"""Which codec for large values: ratio and time per 4 KiB JSON-like document, lz4 vs zstd vs zlib.

    python bench/codecs.py [--docs 200] [--size 4096]

Prints, per codec: compression ratio, microseconds per compress and per decompress (mean over
20 passes). shardd/codec.py cites this run for its choice of zstd level 1.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import zlib
from collections.abc import Callable


def json_documents(count: int, size: int, seed: int = 1) -> list[bytes]:
    """JSON objects of about ``size`` bytes: repeated field names, small vocabularies, numbers."""
    rng = random.Random(seed)
    words = ["user", "id", "name", "email", "created_at", "status", "active", "items", "price",
             "qty", "sku", "tags", "address", "city", "zip"]
    docs = []
    for _ in range(count):
        doc: dict[str, object] = {}
        while len(json.dumps(doc)) < size:
            doc[f"{rng.choice(words)}_{rng.randrange(50)}"] = rng.choice(
                [rng.randrange(10**6), rng.choice(words) * rng.randrange(1, 3), rng.random(), True, None])
        docs.append(json.dumps(doc).encode()[:size])
    return docs


def measure(docs: list[bytes], compress: Callable[[bytes], bytes],
            decompress: Callable[[bytes], bytes], passes: int = 20) -> tuple[float, float, float]:
    packed = [compress(d) for d in docs]
    assert [decompress(p) for p in packed] == docs
    t = time.perf_counter()
    for _ in range(passes):
        for d in docs:
            compress(d)
    per_compress = (time.perf_counter() - t) / (passes * len(docs))
    t = time.perf_counter()
    for _ in range(passes):
        for p in packed:
            decompress(p)
    per_decompress = (time.perf_counter() - t) / (passes * len(docs))
    return sum(map(len, docs)) / sum(map(len, packed)), per_compress * 1e6, per_decompress * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    docs = json_documents(args.docs, args.size)
    codecs: dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]] = {
        "zlib-1": (lambda d: zlib.compress(d, 1), zlib.decompress)}
    try:
        import zstandard
        for level in (1, 3):
            codecs[f"zstd-{level}"] = (zstandard.ZstdCompressor(level=level).compress,
                                       zstandard.ZstdDecompressor().decompress)
    except ImportError:
        print("zstandard not installed: pip install zstandard")
    try:
        import lz4.block
        codecs["lz4-block"] = (lz4.block.compress, lz4.block.decompress)
    except ImportError:
        print("lz4 not installed (optional): pip install lz4")
    print(f"{args.docs} documents of {args.size} bytes")
    for name, (compress, decompress) in codecs.items():
        ratio, c_us, d_us = measure(docs, compress, decompress)
        print(f"{name:10} ratio {ratio:5.2f}   compress {c_us:6.1f} us   decompress {d_us:6.1f} us")


if __name__ == "__main__":
    main()
