"""The service's JSON fast path (validate_records) answers exactly as validate() does."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serving import parquet_upload, scoring
from serving.contract import Column, InputSchema
from stages.lib.contract import feature_ranges
from stages.lib.schema import FEATURES

CONTRACT = InputSchema(
    features=[
        Column(name=n, valid_min=0.0 if n in ("Time", "Amount") else -100.0, valid_max=1e5)
        for n in FEATURES
    ],
    ignored_columns=["Class"],
)
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


# The mutation corpus of issue 11: client mistakes that were answered with 500 or
# scored anyway. Each must now be a 4xx naming the rule (and the column and rows).
@pytest.mark.reliability
@pytest.mark.parametrize(
    ("records", "status", "rule", "column", "rows"),
    [
        ([{**GOOD, "V1": 10**400}], 400, "finite", "V1", [0]),  # was OverflowError, 500
        ([GOOD, {**GOOD, "V2": True}], 400, "numeric", "V2", [1]),  # was scored as 1.0
        ([{**GOOD, "V2": "1.5"}], 400, "numeric", "V2", [0]),  # was scored as 1.5
        ([GOOD, {**GOOD, "V4": float("nan")}], 400, "finite", "V4", [1]),  # was "empty"
        ([GOOD, {**GOOD, "V4": None}], 400, "missing-values", "V4", [1]),
        ([GOOD, {k: v for k, v in GOOD.items() if k != "V4"}], 400, "missing-values", "V4", [1]),
        ([{}], 400, "missing-columns", "Time", None),  # was "no transactions"
        ([{**GOOD, "V5": [1.0]}], 400, "numeric", "V5", [0]),
    ],
)
def test_json_mistakes_are_named(records, status, rule, column, rows) -> None:
    with pytest.raises(scoring.RequestError) as caught:
        scoring.validate_records(records, CONTRACT, "ignore", 10)
    assert caught.value.status == status
    assert (caught.value.body["rule"], caught.value.body.get("column")) == (rule, column)
    assert caught.value.body.get("rows") == rows


def test_time_is_bounded_by_the_contract() -> None:
    """1e308 seconds was scored: the contract now caps Time."""
    train = pd.DataFrame({n: [0.0, 1.0] for n in FEATURES})
    time_spec = next(f for f in feature_ranges(train, 0.1) if f.name == "Time")
    assert time_spec.valid_max < 1e12


def _csv(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode()


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


ROWS = pd.DataFrame([GOOD, {**GOOD, "Time": 2.0}, {**GOOD, "Time": 3.0}])
TABLE = pa.Table.from_pandas(ROWS, preserve_index=False)


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("name", "data", "status", "rule", "column"),
    [
        ("h.csv", _csv(ROWS).replace(b"Time", b"T\xffime", 1), 400, "encoding", None),
        (
            "c.csv",
            _csv(ROWS.assign(note=["a", "\xff", "b"])).replace(b"\xc3\xbf", b"\xff"),
            400,
            "encoding",
            "note",
        ),  # fmt: skip
        ("d.csv", _csv(ROWS).replace(b"V2", b"V1", 1), 400, "duplicate-columns", "V1"),
        ("r.csv", _csv(ROWS.assign(is_fraud=1)), 400, "reserved-columns", "is_fraud"),
        ("r.csv", _csv(ROWS.assign(risk_band="x")), 400, "reserved-columns", "risk_band"),
        ("b.csv", _csv(ROWS.assign(V3=[True, False, True])), 400, "numeric", "V3"),
        (
            "l.parquet",
            _parquet(TABLE.append_column("L", pa.array([[1], [2], [3]]))),
            400,
            "column-type",
            "L",
        ),  # fmt: skip
        (
            "s.parquet",
            _parquet(TABLE.append_column("S", pa.array([{"a": 1}] * 3))),
            400,
            "column-type",
            "S",
        ),  # fmt: skip
        (
            "m.parquet",
            _parquet(
                TABLE.append_column(
                    "M", pa.array([[("k", 1)]] * 3, pa.map_(pa.string(), pa.int64()))
                )
            ),
            400,
            "column-type",
            "M",
        ),  # fmt: skip
        (
            "y.parquet",
            _parquet(TABLE.set_column(1, "V1", pa.array([b"1", b"2", b"3"]))),
            400,
            "numeric",
            "V1",
        ),  # fmt: skip
        (
            "t.parquet",
            _parquet(TABLE.set_column(0, "Time", pa.array([1, 2, 3], pa.duration("s")))),
            400,
            "numeric",
            "Time",
        ),  # fmt: skip
        (
            "w.parquet",
            _parquet(pa.table({f"c{i}": [1.0] for i in range(300)})),
            400,
            "max-columns",
            None,
        ),  # fmt: skip
    ],
)
def test_file_mistakes_are_named(name, data, status, rule, column) -> None:
    with pytest.raises(scoring.RequestError) as caught:
        scoring.validate(scoring.read_upload(data, name), CONTRACT, "ignore", 10)
    assert (caught.value.status, caught.value.body["rule"]) == (status, rule)
    assert caught.value.body.get("column") == column


@pytest.mark.reliability
def test_parquet_bomb_refused_from_its_footer(monkeypatch) -> None:
    """A small file whose text inflates past the cap is refused before decompressing."""
    defaults = parquet_upload.read_bounded.__defaults__
    monkeypatch.setattr(parquet_upload.read_bounded, "__defaults__", (defaults[0], 10 << 20))
    bomb = _parquet(TABLE.append_column("S", pa.array(["x" * (20 * 1024 * 1024), "", ""])))
    assert len(bomb) < 1024 * 1024
    with pytest.raises(scoring.RequestError) as caught:
        scoring.read_upload(bomb, "bomb.parquet")
    assert (caught.value.status, caught.value.body["rule"]) == (413, "max-decompressed-bytes")


@pytest.mark.reliability
def test_csv_output_defuses_spreadsheet_formulas() -> None:
    """OWASP CSV injection: text the client sent comes back unable to run as a formula;
    numbers (negative ones included) are untouched."""
    frame = ROWS.assign(V1=-2.5, note=['=HYPERLINK("http://x")', "+1", "plain"])
    payload, _ = scoring.write_table(frame, "csv")
    back = pd.read_csv(io.BytesIO(payload))
    assert back["note"].tolist() == ['\'=HYPERLINK("http://x")', "'+1", "plain"]
    assert (back["V1"] == -2.5).all()
    parquet, _ = scoring.write_table(frame, "parquet")  # Parquet keeps values as they are
    assert pd.read_parquet(io.BytesIO(parquet))["note"].tolist() == frame["note"].tolist()


def test_row_rules_name_what_validate_raises_per_row() -> None:
    """Batch jobs set rows aside with row_rules(); each row's rule, column and message are
    what validate() raises for that row alone. Text columns, as a CSV read as text gives."""
    rows = [
        dict.fromkeys(FEATURES, "1.5"),
        {**dict.fromkeys(FEATURES, "1.5"), "V3": "abc"},
        {**dict.fromkeys(FEATURES, "1.5"), "Amount": None},
        {**dict.fromkeys(FEATURES, "1.5"), "V1": "inf"},
        {**dict.fromkeys(FEATURES, "1.5"), "Time": "-5"},
        {**dict.fromkeys(FEATURES, "1.5"), "V2": "-1e9", "V5": "x"},  # first in contract order
    ]
    frame = pd.DataFrame(rows, dtype="str")
    matrix, rules, columns = scoring.row_rules(frame, CONTRACT)
    assert matrix.shape == (6, len(FEATURES)) and matrix[0].tolist() == [1.5] * len(FEATURES)
    assert rules[0] is None and columns[0] is None
    for i in range(1, len(rows)):
        with pytest.raises(scoring.RequestError) as raised:
            scoring.validate(frame.iloc[[i]].reset_index(drop=True), CONTRACT)
        body = raised.value.body
        assert (rules[i], columns[i]) == (body["rule"], body["column"])
        assert scoring.rule_message(rules[i], columns[i], CONTRACT) == body["error"]
    assert list(rules[1:]) == ["numeric", "missing-values", "finite", "range", "range"]
