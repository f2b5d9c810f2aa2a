"""The ```bash blocks of README.md and docs/*.md, with their readme-test markers: what
tests/integration/test_readme.py runs, and tests/unit/test_readme_markers.py checks."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!--\s*readme-test:\s*(?P<mode>\w+)\s*(?:[—–-]+\s*(?P<reason>.*?))?\s*-->")
# skip: not run (a reason is required); scratch: run in a clone; last: run in the checkout
# after every other block (it changes what the others start from, e.g. commits new params)
MODES = {"skip", "scratch", "last"}
FENCE = re.compile(r"^(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")


@dataclass(frozen=True)
class Block:
    doc: str  # path relative to the project root
    line: int  # 1-based line of the opening fence
    heading: str  # the nearest heading above it
    text: str
    mode: str  # "run", "scratch", "last" or "skip"
    reason: str

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def documents(root: Path = ROOT) -> list[Path]:
    """The README, then every page under docs/ (subfolders included), in path order."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def shell_blocks(path: Path, root: Path = ROOT) -> list[Block]:
    """The ```bash blocks of a Markdown file, each with the readme-test marker (if any)
    on the last non-blank line above its fence."""
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    heading, previous, index = "", "", 0
    while index < len(lines):
        line = lines[index]
        opened = FENCE.match(line)
        if not opened:
            if re.match(r"#{1,6} ", line):
                heading = line
            if line.strip():
                previous = line
            index += 1
            continue
        end = next(
            (i for i in range(index + 1, len(lines)) if lines[i].startswith(opened["fence"])),
            len(lines),
        )
        if opened["lang"] in ("bash", "sh", "shell"):
            marker = MARKER.fullmatch(previous.strip())
            mode, reason = (marker["mode"], marker["reason"] or "") if marker else ("run", "")
            text = "\n".join(lines[index + 1 : end]) + "\n"
            doc = path.relative_to(root).as_posix()
            blocks.append(Block(doc, index + 1, heading, text, mode, reason))
        previous, index = "", end + 1
    return blocks


def all_blocks() -> list[Block]:
    """In document order, the `last` blocks after the others (in their own order)."""
    blocks = [block for path in documents() for block in shell_blocks(path)]
    return sorted(blocks, key=lambda block: block.mode == "last")


def markers(path: Path) -> Iterator[tuple[int, str]]:
    """HTML comments that mention readme-test (prose that quotes a marker is not one)."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("<!--") and "readme-test" in line:
            yield number, line.strip()
