"""Reading a transactions file and checking it against the ULB schema's rules.

Every rule failure raises `DataValidationError` naming the column, the rule and the first
offending rows (1-based data rows, the header not counted), so a user can find them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from serving.contract import Column, InputSchema
from serving.scoring import RequestError
from serving.scoring import validate as contract_check
from stages.lib.contract import NON_NEGATIVE
from stages.lib.schema import COLUMNS, FEATURES, TARGET

log = logging.getLogger("fraudops.validation")
EXAMPLE_ROWS = 5
DUPLICATE_POLICIES = ("drop", "keep", "fail")


class DataValidationError(ValueError):
    """A transactions file broke a rule; the message says which column, rule and rows."""

    def __init__(
        self, rule: str, message: str, column: str | None = None, rows: list[int] | None = None
    ) -> None:
        self.rule, self.column, self.rows = rule, column, rows or []
        where = f"column '{column}': " if column else ""
        at = f" (rows {', '.join(map(str, self.rows))})" if self.rows else ""
        super().__init__(f"[{rule}] {where}{message}{at}")


@dataclass
class ValidationReport:
    rows_in: int
    rows_out: int
    frauds: int
    duplicate_rows: int
    duplicates_policy: str
    extra_columns: list[str] = field(default_factory=list)


def read_table(path: str | Path) -> pd.DataFrame:
    """Read CSV (the real file's quoted format included) or Parquet with pyarrow."""
    path = Path(path)
    if not path.is_file():
        raise DataValidationError("file", f"no such file: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            table = pa_csv.read_csv(path)
        elif suffix in (".parquet", ".pq"):
            table = pq.read_table(path)
        else:
            raise DataValidationError(
                "file", f"{path.name}: expected a .csv or .parquet file, got '{suffix or 'none'}'"
            )
    except pa.ArrowInvalid as exc:
        raise DataValidationError("parse", f"{path.name} is not a readable table: {exc}") from exc
    return table.to_pandas()


def _rows(mask: np.ndarray) -> list[int]:
    return [int(i) + 1 for i in np.flatnonzero(mask)[:EXAMPLE_ROWS]]


def _schema_rules(columns: tuple[str, ...]) -> InputSchema:
    """The input rules that hold before there is a model (no training ranges yet)."""
    return InputSchema(
        features=[Column(name=c, valid_min=0.0 if c in NON_NEGATIVE else None) for c in columns]
    )


def _binary_labels(labels: np.ndarray) -> np.ndarray:
    """The labels as int 0/1, or DataValidationError: other values, or one class only."""
    not_binary = ~np.isin(labels, (0.0, 1.0))
    if not_binary.any():
        raise DataValidationError("binary-label", "Class must be 0 or 1", TARGET, _rows(not_binary))
    if len(np.unique(labels)) < 2:
        raise DataValidationError(
            "both-classes", "needs both frauds (1) and non-frauds (0)", TARGET
        )
    return labels.astype("int64")


def _apply_duplicates_policy(frame: pd.DataFrame, policy: str) -> tuple[pd.DataFrame, int]:
    """The frame under data.duplicates (keep, drop, or fail), and how many exact
    duplicate rows it had."""
    duplicated = frame.duplicated().to_numpy()
    n_duplicates = int(duplicated.sum())
    if n_duplicates and policy == "fail":
        raise DataValidationError(
            "duplicates",
            f"{n_duplicates} exact duplicate rows (policy data.duplicates=fail)",
            rows=_rows(duplicated),
        )
    if n_duplicates and policy == "drop":
        frame = frame.loc[~duplicated].reset_index(drop=True)
    return frame, n_duplicates


def validate(
    frame: pd.DataFrame, duplicates: str = "drop", require_target: bool = True
) -> tuple[pd.DataFrame, ValidationReport]:
    """Check the rules in order and return the clean frame (float64 features, int Class)."""
    if duplicates not in DUPLICATE_POLICIES:
        raise ValueError(
            f"duplicates policy must be one of {DUPLICATE_POLICIES}, got {duplicates!r}"
        )
    if len(frame) == 0:
        raise DataValidationError("empty", "the input has a header but no data rows")
    required = COLUMNS if require_target else FEATURES
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataValidationError(
            "missing-columns", f"required columns absent: {', '.join(missing)}"
        )
    extra = [c for c in frame.columns if c not in required]
    if extra:
        log.warning("ignoring %d extra columns: %s", len(extra), ", ".join(map(str, extra)))

    # The service's own contract check, with the rules that hold before there is a model:
    # every value a finite number, Time and Amount >= 0 (the served contract then adds the
    # training ranges). Rows are reported as data rows counted from 1.
    try:
        out = contract_check(frame, _schema_rules(required))
    except RequestError as problem:
        body = problem.body
        rows = [r + 1 for r in body.get("rows", [])]
        raise DataValidationError(body["rule"], body["error"], body.get("column"), rows) from None

    if require_target:
        out[TARGET] = _binary_labels(out[TARGET].to_numpy())
    out, n_duplicates = _apply_duplicates_policy(out, duplicates)
    report = ValidationReport(
        rows_in=len(frame),
        rows_out=len(out),
        frauds=int(out[TARGET].sum()) if require_target else 0,
        duplicate_rows=n_duplicates,
        duplicates_policy=duplicates,
        extra_columns=extra,
    )
    return out, report
