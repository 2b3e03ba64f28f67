"""Coverage-guided fuzzing of the wire decoder and of op application, with atheris.

    pip install atheris
    python bench/fuzz_protocol.py -atheris_runs=200000          # or -max_total_time=60
    python bench/fuzz_protocol.py corpus/ -max_total_time=600   # keep a corpus between runs

Each input is one request frame. The target checks the invariants the daemon relies on:
``decode_envelope`` never raises and returns an Envelope or an error Reply; a decoded
request applied to a worker's Shard (store and all, no sockets) always yields exactly one
decodable Reply carrying the request's id; the store's byte accounting never goes negative.
Any exception is a finding: atheris prints the input and writes it to crash-<sha1>.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from shardd import protocol
    from shardd.config import build_config
    from shardd.store import Store
    from shardd.worker import Shard

_LIMITS = protocol.Limits(max_key_bytes=64, max_value_bytes=4096, max_message_bytes=65536)
_CONFIG = build_config({"shards": 1, "max_key_bytes": 64, "max_value_bytes": 4096, "max_message_bytes": 65536,
                        "pin_cpus": False})
_clock = [0]
_shard = Shard(Store(lambda: _clock[0]), _CONFIG, 0, None)


_NAMES = sorted(protocol.OP_NAMES)


def _structured(fdp: atheris.FuzzedDataProvider) -> bytes:
    """A msgpack request built from the input: raw bytes rarely get past msgspec (C code the
    fuzzer cannot see into), so half the inputs are shaped like requests, with fuzzed fields."""
    def atom() -> object:
        kind = fdp.ConsumeIntInRange(0, 5)
        if kind == 0:
            return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 80))
        if kind == 1:
            return fdp.ConsumeIntInRange(-(2**63), 2**64 - 1)
        if kind == 2:
            return None
        if kind == 3:
            return fdp.ConsumeBool()
        if kind == 4:
            return [[fdp.ConsumeBytes(4), fdp.ConsumeBytes(8)] for _ in range(fdp.ConsumeIntInRange(0, 3))]
        return fdp.ConsumeUnicodeNoSurrogates(8)

    name = _NAMES[fdp.ConsumeIntInRange(0, len(_NAMES) - 1)]
    op = [name, *(atom() for _ in range(fdp.ConsumeIntInRange(0, 5)))]
    version = 1 if fdp.ConsumeProbability() < 0.9 else fdp.ConsumeIntInRange(-3, 300)
    return protocol.encode([version, fdp.ConsumeIntInRange(0, 2**64 - 1), op])


def test_one_input(data: bytes) -> None:
    _clock[0] += 7  # time moves, so TTLs expire along the way
    if data[:1] and data[0] & 1:
        data = _structured(atheris.FuzzedDataProvider(data[1:]))
    result = protocol.decode_envelope(data, _LIMITS)
    if isinstance(result, bytes):
        reply = protocol.decode_reply(result)
        assert reply.status != protocol.OK and isinstance(reply.value, str), reply
        return
    assert isinstance(result, protocol.Envelope)
    if isinstance(result.op, protocol.DebugSleep | protocol.Snapshot):
        return  # sleeping or writing files is not what is being fuzzed here
    reply = protocol.decode_reply(_shard.apply(data))
    assert reply.id == result.id, (reply, result)
    assert reply.status != protocol.INTERNAL_ERROR, reply
    assert _shard.store.used_bytes >= 0


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
