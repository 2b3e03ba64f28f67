"""The README's Python example runs as written against a real daemon.

Only the endpoint is changed (the test daemon has a port of its own), and the shown results
that the block itself can check are checked.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_example_runs(make_daemon):
    blocks = _python_blocks()
    assert len(blocks) == 1, "one Python example expected: update this test"
    code = blocks[0]
    assert '"tcp://127.0.0.1:7400"' in code
    d = make_daemon(shards=2)
    namespace: dict = {}
    exec(compile(code.replace('"tcp://127.0.0.1:7400"', repr(d.endpoint)), str(README), "exec"), namespace)
    assert namespace["results"] == [True, b"1"]  # as the comment in the README says
    assert namespace["value"] == b"v1"

    import shardd

    with shardd.Client(d.endpoint, timeout=1.0) as cache:
        assert cache.get("cfg") == b"v2"  # the example's CAS stored
        assert cache.get("hits") == b"-1"
