"""The readme-test markers of README.md and docs/*.md, and the block extractor that
tests/integration/test_readme.py runs the blocks with."""

from __future__ import annotations

from pathlib import Path

from ..readme_blocks import MARKER, MODES, ROOT, all_blocks, documents, markers, shell_blocks


def test_markers_are_known_and_explained() -> None:
    """Every marker is well formed, sits right above a shell block, and a skip says why."""
    blocks = {(b.doc, b.line): b for b in all_blocks()}
    for path in documents():
        doc = path.relative_to(ROOT).as_posix()
        lines = path.read_text().splitlines()
        for number, line in markers(path):
            found = MARKER.fullmatch(line)
            assert found and found["mode"] in MODES, f"{doc}:{number}: unknown marker {line!r}"
            below = next(i for i in range(number, len(lines)) if lines[i].strip()) + 1
            assert (doc, below) in blocks, f"{doc}:{number}: marker not above a bash block"
            if found["mode"] == "skip":
                assert len(found["reason"] or "") > 10, f"{doc}:{number}: skip without reason"


def test_extractor_reads_markers_and_fences(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text(
        "# t\n## A\n```bash\necho a\n```\n<!-- readme-test: skip — needs a cluster -->\n\n"
        "```bash\nkubectl apply\n```\n```yaml\nk: v\n```\n### B\n````bash\n```\n````\n"
    )
    blocks = shell_blocks(tmp_path / "README.md", tmp_path)
    assert [(b.line, b.heading, b.mode, b.reason, b.text) for b in blocks] == [
        (3, "## A", "run", "", "echo a\n"),
        (8, "## A", "skip", "needs a cluster", "kubectl apply\n"),
        (15, "### B", "run", "", "```\n"),
    ]
