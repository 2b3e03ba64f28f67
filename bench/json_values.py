"""JSON documents as cache values: the compressible-values workload of ``bench/compare.py``.

A cached API response or serialised object is the typical large value in a cache. These are
built like one: a page of customer records with the same field names in every record, small
vocabularies (statuses, cities, tags, products), ids, timestamps and prices, closed by a
``"pad"`` string of words that makes each document exactly ``size`` bytes of valid JSON. zstd
level 1 compresses a 4 KiB one about 3.2:1 (``zstd_ratio``; the unit tests hold it above 2.5),
within the range real JSON payloads show (2.5 to 5:1), so a store that compresses has something
to gain and nothing is flattered by padding made of one repeated byte.

Pure: the standard library only; ``zstd_ratio`` imports ``zstandard`` when called.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

FIRST = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory",
         "niaj", "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter", "yusuf")
CITIES = ("Berlin", "Lisbon", "Osaka", "Toronto", "Nairobi", "Lima", "Oslo", "Austin", "Pune", "Lyon",
          "Perth", "Quito")
STATUS = ("active", "pending", "suspended", "closed")
TAGS = ("new", "vip", "beta", "churn-risk", "newsletter", "mobile", "desktop", "trial", "annual", "monthly",
        "gift", "referral")
PRODUCTS = ("keyboard", "mouse", "monitor", "cable", "dock", "headset", "webcam", "laptop stand", "charger",
            "backpack")
WORDS = ("order", "shipped", "delayed", "returned", "invoice", "payment", "refund", "customer", "address",
         "update", "please", "thanks", "received", "support", "ticket", "priority")
_COMPACT = (",", ":")
MIN_PAD = 16  # the closing "pad" string gets at least this many characters


def _record(rng: random.Random) -> dict[str, object]:
    return {
        "id": rng.randrange(10**6, 10**7),
        "user": f"{rng.choice(FIRST)}_{rng.randrange(1000)}",
        "email": f"{rng.choice(FIRST)}.{rng.randrange(100)}@example.com",
        "status": rng.choice(STATUS),
        "city": rng.choice(CITIES),
        "created": f"2026-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}T"
                   f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}Z",
        "score": round(rng.uniform(0, 100), 2),
        "tags": rng.sample(TAGS, rng.randrange(0, 4)),
        "orders": [{"sku": f"SKU-{rng.randrange(10000):04d}", "product": rng.choice(PRODUCTS),
                    "qty": rng.randrange(1, 5), "price": round(rng.uniform(5, 300), 2)}
                   for _ in range(rng.randrange(1, 4))],
        "note": " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 10))),
    }


def json_document(rng: random.Random, size: int = 4096) -> bytes:
    """One compact JSON object of exactly ``size`` bytes (ASCII): ``{"page":N,"items":[...],"pad":"..."}``."""
    head = f'{{"page":{rng.randrange(1, 100)},"items":['
    tail_fixed = '],"pad":"' + '"}'
    if size < len(head) + len(tail_fixed) + MIN_PAD:
        raise ValueError(f"a JSON document needs at least {len(head) + len(tail_fixed) + MIN_PAD} bytes, got {size}")
    records: list[str] = []
    used = len(head) + len(tail_fixed)
    while True:
        text = json.dumps(_record(rng), separators=_COMPACT)
        extra = len(text) + (1 if records else 0)  # the comma before it
        if used + extra + MIN_PAD > size:
            break
        records.append(text)
        used += extra
    room = size - used
    words: list[str] = []
    n = -1  # " ".join adds len(words) - 1 spaces
    while n < room:
        word = rng.choice(WORDS)
        words.append(word)
        n += len(word) + 1
    out = (head + ",".join(records) + '],"pad":"' + " ".join(words)[:room] + '"}').encode()
    assert len(out) == size, (len(out), size)
    return out


def json_documents(seed: int, count: int, size: int = 4096) -> list[bytes]:
    """``count`` distinct documents of ``size`` bytes, the same for the same seed."""
    rng = random.Random(seed * 7919 + size)
    return [json_document(rng, size) for _ in range(count)]


def zstd_ratio(values: Sequence[bytes], level: int = 1) -> float | None:
    """Raw bytes / zstd-compressed bytes, each value compressed on its own (as a store would);
    None when the ``zstandard`` module is not installed."""
    try:
        import zstandard
    except ImportError:
        return None
    compressor = zstandard.ZstdCompressor(level=level)
    raw = sum(len(v) for v in values)
    packed = sum(len(compressor.compress(v)) for v in values)
    return raw / packed if packed else None
