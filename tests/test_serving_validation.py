"""The service's JSON fast path (validate_records) answers exactly as validate() does."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest

from stages.lib.schema import FEATURES

from .conftest import ROOT

spec = importlib.util.spec_from_file_location("serving_scoring", ROOT / "serving" / "scoring.py")
scoring = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scoring)

CONTRACT = {
    "features": [
        {"name": n, "valid_min": 0.0 if n in ("Time", "Amount") else -100.0, "valid_max": 1e5}
        for n in FEATURES
    ],
    "ignored_columns": ["Class"],
}
GOOD = {n: 1.5 for n in FEATURES}


def answer(records: list, unknown: str = "ignore", max_rows: int | None = 10):
    """What each path returns or raises: a frame, or the error's status and body."""
    out = []
    for check in (
        lambda: scoring.validate_records(records, CONTRACT, unknown, max_rows),
        lambda: scoring.validate(pd.DataFrame.from_records(records), CONTRACT, unknown, max_rows),
    ):
        try:
            out.append(check())
        except scoring.RequestError as exc:
            out.append((exc.status, exc.body))
    return out


@pytest.mark.parametrize(
    "records",
    [
        [GOOD],
        [GOOD, {**GOOD, "Time": 7, "Class": 1}],  # ints, an ignored column
        [{**GOOD, "extra": "x"}],
    ],
)
def test_same_features(records) -> None:
    fast, slow = answer(records)
    pd.testing.assert_frame_equal(fast, slow)
    assert list(fast.columns) == list(FEATURES) and (fast.dtypes == np.float64).all()


@pytest.mark.parametrize(
    ("records", "unknown", "rule"),
    [
        ([{**GOOD, "V3": "abc"}], "ignore", "numeric"),
        ([GOOD, {**GOOD, "V3": None}], "ignore", "missing-values"),
        ([{**GOOD, "Amount": -1.0}], "ignore", "range"),
        ([{**GOOD, "V1": float("inf")}], "ignore", "finite"),
        ([{k: v for k, v in GOOD.items() if k != "V2"}], "ignore", "missing-columns"),
        ([{**GOOD, "extra": 1}], "reject", "unknown-columns"),
        ([], "ignore", "empty-batch"),
        ([GOOD] * 11, "ignore", "max-rows"),
    ],
)
def test_same_errors(records, unknown, rule) -> None:
    fast, slow = answer(records, unknown)
    assert fast == slow and fast[1]["rule"] == rule
