"""What runs on Spark's executors: Arrow batches of input rows in, the same rows out with
their scores, or with the rule they broke.

Only the contract and the model file travel to the executors. The row checks are the
service's own (serving/scoring.py) and so is the runtime (serving/runtime.py's
scikit-learn path, which the package stage verified against the served ONNX graph), so a
row gets the same probability here as from the service. Nothing imports Spark here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

from serving.contract import REASONS_COLUMN, Contract
from serving.reasons import Explainer, as_text, reasons_for
from serving.runtime import SklearnRuntime
from serving.scoring import RequestError, risk_band, row_rules, rule_message

CORRUPT = "_corrupt_record"  # Spark's column for a CSV line it could not split
MALFORMED = "malformed-row"  # the rule for such a line
# What the job adds to each row; the reject columns are null on scored rows and the
# score columns null on rejected ones.
ADDED = pa.schema(
    [
        ("fraud_probability", pa.float64()),
        ("is_fraud", pa.bool_()),
        ("risk_band", pa.string()),
        ("reject_rule", pa.string()),
        ("reject_column", pa.string()),
        ("reject_reason", pa.string()),
        ("raw_record", pa.string()),  # a rejected row's contract values as read, to fix it
    ]
)
_runtimes: dict[str, SklearnRuntime] = {}  # one loaded model per Python worker
_explainers: dict[str, Explainer] = {}


def output_schema(input_schema: pa.Schema, features: list[str], reasons: int = 0) -> pa.Schema:
    """The input's columns (contract columns as float64, the checked values; Spark's
    corrupt-record column dropped) followed by ADDED (and the reasons' text when asked)."""
    fields = [
        pa.field(f.name, pa.float64()) if f.name in features else f
        for f in input_schema
        if f.name != CORRUPT
    ]
    extra = [pa.field(REASONS_COLUMN, pa.string())] if reasons else []
    return pa.schema(fields + list(ADDED) + extra)


def _reasons(path: str, md5: str, k: int, rows: pd.DataFrame) -> list[str]:
    """The service's reason codes (serving/reasons.py) of scored rows, as text."""
    if md5 not in _explainers:
        _runtime(path, md5)  # checks the file's md5 before anything unpickles it
        _explainers[md5] = Explainer(path, tuple(rows.columns))
    try:
        explained, _ = reasons_for(_explainers[md5], k, rows)
    except RequestError as problem:  # this model has none: every row says why
        return [problem.body["error"]] * len(rows)
    return [as_text(row) for row in explained]


def _runtime(path: str, md5: str) -> SklearnRuntime:
    if md5 not in _runtimes:
        with open(path, "rb") as fh:
            if hashlib.md5(fh.read()).hexdigest() != md5:  # pickle runs code: check first
                raise RuntimeError(f"{path} is not the registered model (md5 {md5})")
        _runtimes[md5] = SklearnRuntime(path, threads=1)  # Spark runs one task per core
    return _runtimes[md5]


def _raw_records(frame: pd.DataFrame, features: list[str]) -> np.ndarray:
    """Each row's contract values as read, comma-separated (empty where null)."""
    text = frame[features].astype(object).where(frame[features].notna(), "")
    return text.astype(str).agg(",".join, axis=1).to_numpy(dtype=object)


def score_batch(
    batch: pa.RecordBatch, contract: Contract, model_path: str, model_md5: str, reasons: int = 0
) -> pa.RecordBatch:
    """One batch: good rows scored, every other row named with the first rule it breaks."""
    features = contract.feature_names
    frame = batch.to_pandas()
    n = len(frame)
    try:
        matrix, rule, column = row_rules(frame, contract)
    except RequestError as problem:  # a column of a type that holds no numbers
        matrix = np.full((n, len(features)), np.nan)
        rule = np.full(n, problem.body["rule"], dtype=object)
        column = np.full(n, problem.body.get("column"), dtype=object)
    raw = np.full(n, None, dtype=object)
    if CORRUPT in frame:  # a line with too many or too few fields: its values are unreliable
        corrupt = frame[CORRUPT].notna().to_numpy()
        rule[corrupt], column[corrupt] = MALFORMED, None
        raw[corrupt] = frame[CORRUPT].to_numpy(dtype=object)[corrupt]
    good = np.array([r is None for r in rule], dtype=bool)
    rejected = ~good
    probability = np.full(n, np.nan)
    explained = np.full(n, None, dtype=object)
    if good.any():
        rows = pd.DataFrame(matrix[good], columns=features)
        probability[good] = _runtime(model_path, model_md5).probability(rows)
        if reasons:
            explained[good] = _reasons(model_path, model_md5, reasons, rows)
    bands = np.full(n, None, dtype=object)
    bands[good] = risk_band(probability[good], contract.risk_bands)
    reason = np.full(n, None, dtype=object)
    for i in np.flatnonzero(rejected):
        reason[i] = (
            "the line does not have the header's number of fields"
            if rule[i] == MALFORMED
            else rule_message(rule[i], column[i], contract)
        )
    unfilled = rejected & np.array([r is None for r in raw], dtype=bool)
    if unfilled.any():
        raw[unfilled] = _raw_records(frame.loc[unfilled], features)
    schema = output_schema(batch.schema, features, reasons)
    columns = {
        f.name: frame[f.name] for f in batch.schema if f.name not in features and f.name != CORRUPT
    }
    columns.update({name: matrix[:, j] for j, name in enumerate(features)})
    columns.update(
        fraud_probability=np.where(good, probability, None),
        is_fraud=np.where(good, probability >= contract.threshold, None),
        risk_band=bands,
        reject_rule=rule,
        reject_column=column,
        reject_reason=reason,
        raw_record=raw,
        **({REASONS_COLUMN: explained} if reasons else {}),
    )
    arrays = [pa.array(columns[f.name], type=f.type, from_pandas=True) for f in schema]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def score_batches(
    batches: Iterator[pa.RecordBatch],
    contract: Contract,
    model_path: str,
    model_md5: str,
    reasons: int = 0,
) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        yield score_batch(batch, contract, model_path, model_md5, reasons)
