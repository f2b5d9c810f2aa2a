"""pytest's settings for the whole checkout (tests/conftest.py holds the tests' helpers).

- Doctests: `--doctest-modules` (pyproject) runs the examples in the project's packages.
  A module is collected only when it holds an example (`>>>`), so collecting them does
  not import every module; the modules listed in NOT_IMPORTABLE are never imported here.
- `--reverse`: the collected order backwards within each tier (unit, then integration),
  with `-p no:randomly`. Otherwise pytest-randomly orders each run at random and prints
  its seed in the header (`--randomly-seed=N` repeats that order).
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent

# Importing these has side effects, so no doctest can live in them: the service loads the
# Bento's model at import (it needs a built Bento), the UI is a Streamlit script.
NOT_IMPORTABLE = {ROOT / "serving" / "service.py", ROOT / "ui" / "app.py"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reverse",
        action="store_true",
        help="run the tests in the reverse of the collected order (with -p no:randomly)",
    )


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    path = Path(collection_path)
    if path.suffix != ".py" or ROOT / "tests" in path.parents or path.name == "conftest.py":
        return None
    if path in NOT_IMPORTABLE:
        return True
    try:
        return ">>>" not in path.read_text(errors="replace")
    except OSError:
        return None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # tests/conftest.py has put the unit tier first (random order within each tier when
    # pytest-randomly is on); --reverse turns each tier around.
    if config.getoption("reverse"):
        tiers: dict[bool, list[pytest.Item]] = {}
        for item in items:
            tiers.setdefault("integration" in item.keywords, []).append(item)
        items[:] = [item for tier in sorted(tiers) for item in reversed(tiers[tier])]
