"""The prepare stage itself, run as DVC runs it: a bad file stops it with the rule's
message and leaves no output behind; the real format is read (the rules in-process:
tests/unit/test_validation.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from stages.lib.schema import COLUMNS

from ..conftest import ROOT

FORMAT_FIXTURE = ROOT / "tests" / "fixtures" / "creditcard_format.csv"


# The stage itself, run as DVC runs it: a bad file stops it and leaves no output behind.
def _run_prepare(workspace: Path, source: str) -> subprocess.CompletedProcess:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["source"] = source
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(ROOT / "dvc.yaml", workspace / "dvc.yaml")  # the stage's declared params
    paths = ["--raw", "data/raw", "--feedback", "data/raw/feedback",
             "--out", "data/prepared/transactions.parquet",
             "--recent", "data/prepared/recent_labelled.parquet"]  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "stages.prepare", *paths, "--report", "metrics/prepare.json"],
        cwd=workspace,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda t: t.replace('"Amount"', '"Amt"', 1),
            "[missing-columns] required columns absent: Amount",
        ),
        (lambda t: t.replace('"1"', '"7"', 1), "[binary-label] column 'Class'"),
        (lambda t: t.split("\n")[0] + "\n", "[empty]"),
    ],
)
def test_prepare_stage_fails_cleanly(tmp_path: Path, edit, expected: str) -> None:
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "bad.csv").write_text(edit(FORMAT_FIXTURE.read_text()))
    result = _run_prepare(tmp_path, "data/raw/bad.csv")
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "prepared").exists() or not any(
        (tmp_path / "data" / "prepared").iterdir()
    )
    assert not (tmp_path / "metrics" / "prepare.json").exists()


def test_prepare_refuses_source_outside_raw(tmp_path: Path) -> None:
    shutil.copy(FORMAT_FIXTURE, tmp_path / "elsewhere.csv")
    result = _run_prepare(tmp_path, "elsewhere.csv")
    assert result.returncode == 1 and "[source]" in result.stderr


def _fixture_days(days: int) -> str:
    """The format fixture's rows repeated on `days` days (Time shifted a day each time),
    still in the real file's quoted format: 40 rows with 4 frauds are too few for prepare
    to accept, since split and train need 6 of each class by default."""
    header, *rows = FORMAT_FIXTURE.read_text().splitlines()
    shifted = [
        f"{int(time) + day * 86_400},{rest}"
        for day in range(days)
        for time, rest in (row.split(",", 1) for row in rows)
    ]
    return "\n".join([header, *shifted]) + "\n"


def test_prepare_reads_real_format(tmp_path: Path) -> None:
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "creditcard.csv").write_text(_fixture_days(3))
    result = _run_prepare(tmp_path, "data/raw/creditcard.csv")
    assert result.returncode == 0, result.stderr
    out = pd.read_parquet(tmp_path / "data" / "prepared" / "transactions.parquet")
    assert len(out) == 120 and list(out.columns) == list(COLUMNS)
    assert out["Class"].sum() == 12
