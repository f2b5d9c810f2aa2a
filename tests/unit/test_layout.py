"""One installable project, one place for each fact: checked over the repository's own
Python files (git ls-files), so a new edit of the import path or a second copy fails here."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()


def python_files() -> dict[str, str]:
    names = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "*.py"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return {n: (ROOT / n).read_text() for n in names if n != THIS and (ROOT / n).is_file()}


def where(pattern: str) -> list[str]:
    found = re.compile(pattern)
    return sorted(name for name, text in python_files().items() if found.search(text))


# Spelt apart, so that a grep of the checkout for them finds no file at all, this one included.
IMPORT_PATH = "sys" + r"\.path\b"
FILE_IMPORTS = "|".join(
    ("spec_from_" + "file_location", "Source" + "FileLoader", "imp" + r"\.load_source")
)


def test_no_import_path_edit_or_path_based_import() -> None:
    assert where(IMPORT_PATH) == []
    assert where(FILE_IMPORTS) == []


@pytest.mark.parametrize(
    ("pattern", "home"),
    [
        (r"InferenceSession\(", ["serving/runtime.py"]),  # the one ONNX session factory
        (r'"DVC_NO_ANALYTICS"|"MLFLOW_DISABLE_TELEMETRY"', ["stages/lib/environment.py"]),
        (r"class \w+\(BaseSettings\)", ["serving/settings.py"]),
        (r"\(0\.0, 1e-4, 3e-4", ["serving/contract.py"]),  # the score's bins
        (r"CONTRACT_VERSION = ", ["serving/contract.py"]),
        # one start/wait/stop helper (test_kill kills a dvc run on purpose)
        (r"os\.killpg\(", ["stages/lib/servers.py", "tests/integration/test_kill.py"]),
    ],
)
def test_one_place_for_each_fact(pattern: str, home: list[str]) -> None:
    assert where(pattern) == home


def test_every_folder_of_code_is_a_package() -> None:
    for folder in (
        "stages",
        "stages/lib",
        "serving",
        "batch",
        "monitoring",
        "deploy",
        "ui",
        "bench",
    ):
        assert (ROOT / folder / "__init__.py").is_file(), folder
