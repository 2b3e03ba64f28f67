"""docs/protocol.md agrees with shardd/protocol.py on the edges a client author trips over.

The behaviour itself is tested in test_protocol.py and tests/integration/test_protocol_edges.py;
these check that the document says the same, so a client written from the doc alone works.
"""

from __future__ import annotations

import re
from pathlib import Path

from shardd import protocol as p

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "protocol.md").read_text()
SOURCE = (REPO / "shardd" / "protocol.py").read_text()


def test_error_values_are_str_except_moved_said_in_one_place() -> None:
    # The doc used to say "On any error status, `value` is a str" while MOVED's value is a map.
    assert "On any error status, `value` is a str." not in DOC
    assert "one exception: MOVED (10)" in DOC
    assert '`{"epoch": int, "shard": int}`' in DOC


def test_the_ttl_limit_is_documented_with_its_value() -> None:
    assert str(p.MAX_TTL_MS) in DOC and "2^53\u22121" in DOC
    assert "(integer, 1 \u2026 2^64\u22121)" not in DOC  # the old, unbounded TTL range


def test_ids_and_versions_are_documented_as_u64_bigint_in_javascript() -> None:
    assert "u64" in DOC and "BigInt" in DOC


def test_the_documented_nil_rule_covers_every_optional_argument() -> None:
    assert "both mean the argument's default, for every optional argument of every op" in DOC


def test_ping_on_a_worker_endpoint_and_id_zero_are_documented() -> None:
    assert "A worker's own endpoint (direct mode) answers **1**" in DOC
    assert "**Id 0** is accepted" in DOC
    assert "Id 0 is\n  reserved" not in DOC


def test_no_citations_of_documents_outside_the_repository() -> None:
    # DESIGN.md, "the ADR" and issue numbers are not in this repository; a reader cannot follow them.
    for name, text in (("docs/protocol.md", DOC), ("shardd/protocol.py", SOURCE)):
        assert "DESIGN.md" not in text, name
        assert not re.search(r"\bADR\b|\bthe ADR\b", text), name
        assert not re.search(r"\bissue\s*#?\d+|#\d{1,4}\b", text, re.IGNORECASE), name
