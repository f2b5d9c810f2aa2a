"""Each data rule: a clear message naming the column, rule and rows, and no output left."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from stages.lib.schema import COLUMNS
from stages.lib.synthetic import generate
from stages.lib.validation import DataValidationError, read_table, validate

from ..conftest import ROOT

FORMAT_FIXTURE = ROOT / "tests" / "fixtures" / "creditcard_format.csv"


@pytest.fixture
def good() -> pd.DataFrame:
    return generate(n_rows=500, fraud_rate=0.02, seed=5)


def test_real_format_fixture_loads() -> None:
    assert FORMAT_FIXTURE.read_text().startswith('"Time","V1","V2"')
    clean, report = validate(read_table(FORMAT_FIXTURE))
    assert list(clean.columns) == list(COLUMNS)
    assert clean["Class"].dtype == np.int64 and set(clean["Class"]) == {0, 1}
    assert report.rows_out == 40


def test_real_sample_loads(real_sample: Path) -> None:
    clean, report = validate(read_table(real_sample))
    assert report.rows_in == 2000 and report.frauds == 40
    raw = pd.read_csv(real_sample)
    # Up to 15 significant digits survive the pyarrow parse exactly.
    np.testing.assert_array_equal(clean["V1"].to_numpy(), raw["V1"].to_numpy())


def test_parquet_loads(tmp_path: Path, good: pd.DataFrame) -> None:
    good.to_parquet(tmp_path / "t.parquet")
    clean, _ = validate(read_table(tmp_path / "t.parquet"))
    assert len(clean) == len(good) - good.duplicated().sum()


def _broken(good: pd.DataFrame, column: str, rows: list[int], value: object) -> pd.DataFrame:
    frame = good.astype({column: object}) if isinstance(value, str) else good.copy()
    frame.loc[rows, column] = value
    return frame


@pytest.mark.parametrize(
    ("column", "value", "rule"),
    [
        ("V3", "abc", "numeric"),
        ("V7", np.nan, "missing-values"),
        ("V9", np.inf, "finite"),
        ("Amount", -3.5, "range"),  # the service's rule names: one contract check
        ("Time", -1.0, "range"),
        ("Class", 2, "binary-label"),
    ],
)
def test_rule_names_column_and_rows(
    good: pd.DataFrame, column: str, value: object, rule: str
) -> None:
    with pytest.raises(DataValidationError) as err:
        validate(_broken(good, column, [3, 10], value))
    assert err.value.rule == rule and err.value.column == column
    assert err.value.rows == [4, 11]  # 1-based data rows
    assert f"column '{column}'" in str(err.value) and "rows 4, 11" in str(err.value)


def test_missing_columns(good: pd.DataFrame) -> None:
    with pytest.raises(DataValidationError, match=r"\[missing-columns\].*V5, Amount"):
        validate(good.drop(columns=["V5", "Amount"]))


def test_empty_input(good: pd.DataFrame) -> None:
    with pytest.raises(DataValidationError, match=r"\[empty\]"):
        validate(good.iloc[0:0])


def test_single_class(good: pd.DataFrame) -> None:
    with pytest.raises(DataValidationError, match=r"\[both-classes\]"):
        validate(good.assign(Class=0))


def test_duplicate_policies(good: pd.DataFrame) -> None:
    doubled = pd.concat([good, good.iloc[[1, 2]]], ignore_index=True)
    base = int(good.duplicated().sum())
    dropped, report = validate(doubled, duplicates="drop")
    assert report.duplicate_rows == base + 2 and len(dropped) == len(doubled) - base - 2
    kept, _ = validate(doubled, duplicates="keep")
    assert len(kept) == len(doubled)
    with pytest.raises(DataValidationError, match=r"\[duplicates\]"):
        validate(doubled, duplicates="fail")


def test_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(DataValidationError, match=r"\[file\].*\.csv or \.parquet"):
        read_table(tmp_path / "x.json")
    (tmp_path / "broken.csv").write_text('"Time","V1"\n1,2\n3,4,5\n')
    with pytest.raises(DataValidationError, match=r"\[parse\]"):
        read_table(tmp_path / "broken.csv")


# The stage itself, run as DVC runs it: a bad file stops it and leaves no output behind.
def _run_prepare(workspace: Path, source: str) -> subprocess.CompletedProcess:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["source"] = source
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(ROOT / "dvc.yaml", workspace / "dvc.yaml")  # the stage's declared params
    paths = ["--raw", "data/raw", "--out", "data/prepared/transactions.parquet"]
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
