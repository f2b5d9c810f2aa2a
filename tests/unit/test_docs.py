"""The README and docs/ as a set of pages: links that resolve, a short front door, and
benchmark tables that exist once.

- Every relative link (and image) of README.md and docs/**/*.md points at a file or
  folder of the project, and a `#anchor` part names a heading of its target, by GitHub's
  slug rules (lowercase; punctuation but `-` and `_` dropped; spaces to `-`; a repeated
  heading gets `-1`, `-2`, ...). Links inside code are not links.
- Every docs page is reachable from the README; the README is at most 250 lines.
- Each bench/*.py writes its rendered table into docs/benchmarks/<name>.md (its `DOC`),
  and nowhere else as Markdown; bench/results/ keeps only the figures (JSON). No table row
  of a docs/benchmarks/ page appears in any other document: a table is never pasted.

Fast: reads files only (the bench scripts through their AST, never imported).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from ..conftest import ROOT
from ..readme_blocks import documents

README_MAX_LINES = 250
FENCE = re.compile(r"^\s*(```+|~~~+)")
CODE_SPAN = re.compile(r"(`+)(?:.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)=\"([^\"]+)\"", re.IGNORECASE)
SCHEME = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)
TABLE_SEPARATOR = re.compile(r"^\|[\s:|-]+\|$")


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based number, line) of the lines outside fenced code blocks."""
    out, fence = [], None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        opened = FENCE.match(line)
        if fence is None and opened:
            fence = opened[1]
        elif fence is not None:
            if line.strip().startswith(fence):
                fence = None
        else:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path):
        found = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not found:
            continue
        base = slug(found[1])
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link and image outside code."""
    out = []
    for number, line in prose_lines(path):
        text = CODE_SPAN.sub("", line)
        out += [(number, target) for target in LINK.findall(text)]
        out += [(number, target) for target in HTML_LINK.findall(text)]
    return out


def resolve(doc: Path, target: str, root: Path = ROOT) -> tuple[Path | None, str]:
    """The file or folder a relative link names (None: the document itself), and its
    anchor ('' when none)."""
    where, _, anchor = target.partition("#")
    return ((doc.parent / where).resolve() if where else None), anchor


def broken_links(docs: list[Path], root: Path = ROOT) -> list[str]:
    problems = []
    for doc in docs:
        name = doc.relative_to(root).as_posix()
        for number, target in links(doc):
            if SCHEME.match(target):
                continue
            path, anchor = resolve(doc, target, root)
            path = path or doc
            if not path.exists():
                problems.append(f"{name}:{number}: {target}: no such file")
            elif root.resolve() not in (path, *path.parents):
                problems.append(f"{name}:{number}: {target}: outside the project")
            elif anchor and (path.suffix != ".md" or anchor not in anchors(path)):
                problems.append(f"{name}:{number}: {target}: no heading #{anchor} there")
    return problems


def test_slugs_follow_github() -> None:
    assert slug("Spark, pandas and the service on one machine") == (
        "spark-pandas-and-the-service-on-one-machine"
    )
    assert slug("MLflow for a team: PostgreSQL and a tracking server") == (
        "mlflow-for-a-team-postgresql-and-a-tracking-server"
    )
    assert slug("The docs' commands run as typed") == "the-docs-commands-run-as-typed"
    assert slug("`make serve` and [its](x.md) FRAUD_* settings") == (
        "make-serve-and-its-fraud_-settings"
    )


def test_checker_finds_broken_links(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "a.md").write_text(
        "# A page\n## Same\n## Same\n```bash\n# not a heading [x](missing.md)\n```\n"
    )
    (root / "README.md").write_text(
        "# R\n[ok](docs/a.md#a-page) [dup](docs/a.md#same-1) [web](https://x.org/y)\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#not-a-heading) `[code](nowhere.md)`\n"
        "[self](#r) [self bad](#nope) ![img](docs/) [up](../outside.md)\n"
    )
    (tmp_path / "outside.md").write_text("")  # exists, but the link leaves the project
    problems = broken_links([root / "README.md", root / "docs" / "a.md"], root)
    assert [problem.split(": ")[:2] for problem in problems] == [
        ["README.md:3", "docs/b.md"],
        ["README.md:3", "docs/a.md#not-a-heading"],
        ["README.md:4", "#nope"],
        ["README.md:4", "../outside.md"],
    ]
    assert problems[-1].endswith("outside the project")


def test_relative_links_resolve() -> None:
    problems = broken_links(documents())
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_a_front_door() -> None:
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"


def test_every_page_is_reachable_from_the_readme() -> None:
    reached, todo = set(), [ROOT / "README.md"]
    while todo:
        doc = todo.pop()
        if doc in reached:
            continue
        reached.add(doc)
        for _, target in links(doc):
            path, _ = resolve(doc, target)
            if not SCHEME.match(target) and path and path.suffix == ".md" and path.is_file():
                todo.append(path)
    orphans = [p.relative_to(ROOT).as_posix() for p in documents() if p not in reached]
    assert not orphans, f"no link from the README leads to {orphans}"


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def doc_target(script: Path) -> tuple[list[str], bool, list[str]]:
    """From a bench script's AST: the string parts of its module-level `DOC`, whether it
    calls `.write_text` on DOC (or on a name bound from it, e.g. `doc = DOC if default else
    out / DOC.name`), and any other path-like `.md` string it holds."""
    tree = ast.parse(script.read_text())
    parts: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and "DOC" in _names(ast.Tuple(node.targets)):
            constants = [c for c in ast.walk(node.value) if isinstance(c, ast.Constant)]
            constants.sort(key=lambda c: (c.lineno, c.col_offset))  # walk is breadth-first
            parts = [c.value for c in constants]
    aliases = {"DOC"} | {
        target.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and "DOC" in _names(node.value)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    written = any(
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "write_text"
        and _names(node.func.value) & aliases
        for node in ast.walk(tree)
    )
    others = [
        c.value
        for c in ast.walk(tree)
        if isinstance(c, ast.Constant)
        and isinstance(c.value, str)
        and re.fullmatch(r"[\w./-]+\.md", c.value)
        and c.value not in parts
    ]
    return parts, written, others


def test_bench_scripts_write_their_tables_into_the_docs() -> None:
    scripts = sorted(p for p in (ROOT / "bench").glob("*.py") if p.name != "__init__.py")
    assert scripts
    for script in scripts:
        name = f"bench/{script.name}"
        parts, written, others = doc_target(script)
        assert parts[-3:] == ["docs", "benchmarks", f"{script.stem}.md"], (
            f"{name}: DOC must be docs/benchmarks/{script.stem}.md, is {parts}"
        )
        assert written, f"{name} never writes DOC"
        assert not others, f"{name} names other Markdown files: {others}"
        page = ROOT / "docs" / "benchmarks" / f"{script.stem}.md"
        assert page.is_file(), f"{name}'s table is missing: run it"
        assert name in page.read_text().splitlines()[0], f"{page.name} is not {name}'s"
    pages = {p.stem for p in (ROOT / "docs" / "benchmarks").glob("*.md")}
    assert pages == {s.stem for s in scripts}, "a docs/benchmarks page without its script"
    assert not list((ROOT / "bench" / "results").glob("*.md")), "tables belong in docs/"


def test_benchmark_tables_are_not_pasted_elsewhere() -> None:
    generated = sorted((ROOT / "docs" / "benchmarks").glob("*.md"))
    rows = {
        line.strip(): page.name
        for page in generated
        for _, line in prose_lines(page)
        if line.startswith("|") and not TABLE_SEPARATOR.match(line.strip())
    }
    pasted = [
        f"{doc.relative_to(ROOT)}:{number}: row of benchmarks/{rows[line.strip()]}"
        for doc in documents()
        if doc not in generated
        for number, line in prose_lines(doc)
        if line.strip() in rows
    ]
    assert not pasted, "link to the table instead:\n" + "\n".join(pasted)
