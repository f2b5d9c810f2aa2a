"""Each data rule: a clear message naming the column, rule and rows, and no output left."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

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
