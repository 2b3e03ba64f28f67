"""The docs point at things that exist and agree with each other.

Links and paths: every relative Markdown link (and #anchor) in the docs resolves, and every
repository path the README names in backticks exists. bench/README.md: every command that
drives a daemon uses a port that one of its `shardd serve` commands serves, and the option
table lists every option of bench/loadgen.py. No doc or comment cites a document or issue
tracker that is not in the repository. (The README's Python example is run against a real
daemon in tests/integration/test_readme_example.py.)
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = ["README.md", "bench/README.md", "bench/RESULTS.md", "docs/design.md", "docs/protocol.md", "docs/resp.md",
        "docs/near-cache.md"]
DEFAULT_PORT = 7400


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve(doc):
    src = REPO / doc
    broken = []
    for link in _links(src):
        if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        dest = (src.parent / target).resolve() if target else src
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in _anchors(dest)):
            broken.append(link)
    assert not broken, f"{doc}: broken links {broken}"


def test_paths_named_in_the_readme_exist():
    text = (REPO / "README.md").read_text()
    paths = set(re.findall(r"`((?:bench|configs|docs|shardd|systemd|tests)/[\w./-]+?\.(?:py|md|toml|service|sh))`",
                           text))
    paths |= set(re.findall(r"\b((?:bench|tests|systemd)/[\w/-]+\.(?:py|sh))\b", text))
    assert paths, "the pattern found nothing: update the test"
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, f"README.md names files that do not exist: {missing}"


def _commands(text: str) -> list[str]:
    """Shell commands in ```sh blocks, continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = cmd.split("#", 1)[0].strip()
            if cmd:
                out.append(cmd)
    return out


def _port(cmd: str, option: str) -> int | None:
    m = re.search(rf"{option}[ =]tcp://[^:\s]+:(\d+)", cmd)
    return int(m.group(1)) if m else None


def _serves_and_clients(text: str) -> tuple[set[int], list[str]]:
    """Ports that the section's `shardd serve` commands serve, and its commands driving a daemon."""
    serves = [c for c in _commands(text) if c.startswith("shardd serve")]
    serves += re.findall(r"`(shardd serve[^`]*)`", text)
    clients = [c for c in _commands(text)
               if re.match(r"python3? bench/(loadgen|chaos|soak)\.py", c) and "--help" not in c]
    clients += re.findall(r"`(python3? bench/(?:loadgen|chaos|soak)\.py[^`]*)`", text)
    return {_port(c, "--bind") or DEFAULT_PORT for c in serves}, clients


def test_bench_readme_drives_the_ports_it_serves():
    text = (REPO / "bench" / "README.md").read_text()
    served, clients = _serves_and_clients(text)
    assert served and clients, "no `shardd serve` or load command found: update the test"
    unserved = [c for c in clients if (_port(c, "--endpoint") or DEFAULT_PORT) not in served]
    assert not unserved, f"served ports {sorted(served)}; these commands drive another: {unserved}"
    # Within a section, a daemon it starts on a port of its own is one its commands drive.
    for section in re.split(r"\n(?=## )", text):
        served, clients = _serves_and_clients(section)
        driven = {_port(c, "--endpoint") or DEFAULT_PORT for c in clients}
        title = section.splitlines()[0]
        assert served - {DEFAULT_PORT} <= driven, f"{title}: serves {sorted(served)}, drives {sorted(driven)}"


def test_bench_readme_lists_every_loadgen_option():
    r = subprocess.run([sys.executable, str(REPO / "bench" / "loadgen.py"), "--help"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    options = set(re.findall(r"(--[a-z][a-z-]+)", r.stdout)) - {"--help"}
    text = (REPO / "bench" / "README.md").read_text()
    table = text[text.index("| option |"):]
    table = table[:table.index("\n\n")]
    missing = sorted(o for o in options if f"`{o}" not in table)
    assert not missing, f"bench/README.md's loadgen option table lacks {missing}"


def test_no_citations_of_documents_outside_the_repo():
    files = [REPO / d for d in DOCS] + [REPO / "configs" / "shardd.toml", REPO / "systemd" / "shardd.service"]
    files += sorted((REPO / "shardd").glob("*.py")) + sorted((REPO / "bench").glob("*.py"))
    pattern = re.compile(r"DESIGN\.md|STYLE\.md|\bthe ADR\b|ADR's|\b[Ii]ssue #\d+")
    found = [f"{f.relative_to(REPO)}:{n}: {line.strip()}"
             for f in files for n, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, "cite docs/design.md (or say it in place) instead:\n" + "\n".join(found)
