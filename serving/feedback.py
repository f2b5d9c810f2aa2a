"""Labels come back: `POST /feedback` attaches outcomes to logged decisions.

A label is a transaction id, whether it was fraud, and optionally when that was known
(`labelled_at`, ISO 8601 or unix seconds; default: now). JSON (`{"labels": [...]}`) or a
CSV upload (`file`, columns transaction_id, is_fraud[, labelled_at]). Idempotent: the
same label twice is stored once; a changed label is stored as a correction (the latest
one counts, the earlier ones stay with their times). Ids with no logged decision are not
stored and are listed under `unknown` (the first few, and a count). All of a request's
labels are committed together before the answer.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
from sqlalchemy import Engine, func, insert, select

from serving.contract import ID_COLUMN
from serving.decisions import DECISIONS, LABELS, safe_reason
from serving.errors import EXAMPLE_ROWS, RequestError
from serving.ids import transaction_ids

CHUNK = 500  # ids per IN (...) query: well under every database's parameter limit
UNKNOWN_LISTED = 20
TRUE = {"1", "true", "fraud", "yes"}
FALSE = {"0", "false", "legit", "legitimate", "no"}


def labels_from_json(payload: Any, max_rows: int) -> pd.DataFrame:
    """The labels of a JSON body, checked: a frame of transaction_id, is_fraud, labelled_at."""
    items = payload.get("labels") if isinstance(payload, dict) else None
    if not isinstance(items, list) or not items:
        raise RequestError(400, "labels", 'send {"labels": [{"transaction_id": ..., '
                           '"is_fraud": true|false}, ...]}')  # fmt: skip
    _check_count(len(items), max_rows)
    bad = [i for i, item in enumerate(items) if not isinstance(item, dict)]
    if bad:
        raise RequestError(400, "record-type", "each label must be a JSON object",
                           rows=bad, rows_total=len(bad))  # fmt: skip
    frame = pd.DataFrame({
        ID_COLUMN: [item.get(ID_COLUMN) for item in items],
        "is_fraud": [item.get("is_fraud") for item in items],
        "labelled_at": [item.get("labelled_at") for item in items],
    })  # fmt: skip
    return _checked(frame)


def labels_from_csv(data: bytes, max_rows: int) -> pd.DataFrame:
    try:
        data[: data.find(b"\n")].decode("utf-8")
        table = pa_csv.read_csv(io.BytesIO(data), convert_options=pa_csv.ConvertOptions(
            column_types={ID_COLUMN: pa.string(), "is_fraud": pa.string(),
                          "labelled_at": pa.string()}))  # fmt: skip
    except (pa.ArrowException, UnicodeDecodeError) as exc:
        reason = str(exc).split(":", 1)[0]
        raise RequestError(400, "parse", f"could not parse the CSV file ({reason})") from None
    names = table.column_names
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise RequestError(400, "duplicate-columns", f"the column '{repeated[0]}' appears more "
                           "than once", column=repeated[0])  # fmt: skip
    missing = [c for c in (ID_COLUMN, "is_fraud") if c not in table.column_names]
    if missing:
        raise RequestError(400, "missing-columns", f"required columns are missing: "
                           f"{', '.join(missing)}", column=missing[0])  # fmt: skip
    _check_count(table.num_rows, max_rows)
    frame = table.to_pandas()
    if "labelled_at" not in frame:
        frame["labelled_at"] = None
    return _checked(frame[[ID_COLUMN, "is_fraud", "labelled_at"]])


def _check_count(rows: int, max_rows: int) -> None:
    if rows > max_rows:
        raise RequestError(413, "max-rows", f"{rows} labels; the limit is {max_rows} per request")
    if rows == 0:
        raise RequestError(400, "empty-batch", "no labels")


def _checked(frame: pd.DataFrame) -> pd.DataFrame:
    ids = frame[ID_COLUMN]
    if ids.isna().any():
        _refuse("transaction-id", f"every label needs a {ID_COLUMN}", ids.isna().to_numpy())
    checked = transaction_ids(ids, len(frame), "label")  # the scoring rules, duplicates too
    fraud = frame["is_fraud"].map(_as_bool)
    _refuse("is-fraud", "is_fraud must be true or false (or 1/0)", fraud.isna().to_numpy())
    when = [_as_time(value) for value in frame["labelled_at"].tolist()]
    _refuse("labelled-at", "labelled_at must be ISO 8601 or unix seconds",
            np.array([t is False for t in when], dtype=bool))  # fmt: skip
    now = time.time()
    return pd.DataFrame({
        ID_COLUMN: checked,
        "is_fraud": fraud.astype(bool).to_numpy(),
        "labelled_at": np.array([now if t is None else t for t in when], dtype=float),
    })  # fmt: skip


def _refuse(rule: str, message: str, mask: np.ndarray) -> None:
    if mask.any():
        rows = [int(i) for i in np.flatnonzero(mask)[:EXAMPLE_ROWS]]
        raise RequestError(400, rule, message, rows=rows, rows_total=int(mask.sum()))


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        return True if word in TRUE else False if word in FALSE else None
    return None


def _as_time(value: Any) -> float | bool | None:
    """Unix seconds; None when not given; False when unreadable."""
    if value is None or value == "" or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _seconds(value)
    if isinstance(value, str) and value.strip():
        try:
            return datetime.fromisoformat(value.strip()).timestamp()
        except (ValueError, OverflowError):
            return _seconds(value)
    return False


def _seconds(value: Any) -> float | bool:
    """Unix seconds: a finite number, at least 0 (False otherwise)."""
    try:
        seconds = float(value)
    except (ValueError, OverflowError):
        return False
    return seconds if math.isfinite(seconds) and seconds >= 0 else False


def store(engine: Engine, labels: pd.DataFrame) -> dict[str, Any]:
    """Commit the labels of logged decisions; what happened to each, counted."""
    ids = labels[ID_COLUMN].tolist()
    try:
        with engine.begin() as connection:
            known = _known(connection, ids)
            current = _current(connection, ids)
            now = time.time()
            new, corrections, unchanged = [], 0, 0
            for tid, fraud, when in labels.itertuples(index=False, name=None):
                if tid not in known:
                    continue
                if current.get(tid) == bool(fraud):
                    unchanged += 1
                    continue
                corrections += tid in current
                new.append({"transaction_id": tid, "is_fraud": bool(fraud),
                            "labelled_at": float(when), "received_at": now})  # fmt: skip
            if new:
                connection.execute(insert(LABELS), new)
    except Exception as error:  # noqa: BLE001 - the database's failure, not the client's
        raise RequestError(503, "decision-log", f"the decision log is unavailable "
                           f"({safe_reason(error)}); send the labels again") from None  # fmt: skip
    unknown = [tid for tid in ids if tid not in known]
    return {"received": len(ids), "stored": len(new) - corrections, "corrections": corrections,
            "unchanged": unchanged, "unknown": unknown[:UNKNOWN_LISTED],
            "unknown_total": len(unknown)}  # fmt: skip


def _chunks(ids: Sequence[str]) -> list[Sequence[str]]:
    return [ids[i : i + CHUNK] for i in range(0, len(ids), CHUNK)]


def _known(connection: Any, ids: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for part in _chunks(ids):
        query = select(DECISIONS.c.transaction_id).where(DECISIONS.c.transaction_id.in_(part))
        found.update(connection.execute(query.distinct()).scalars())
    return found


def _current(connection: Any, ids: Sequence[str]) -> dict[str, bool]:
    """Each id's latest label."""
    current: dict[str, bool] = {}
    for part in _chunks(ids):
        latest = (select(func.max(LABELS.c.id)).where(LABELS.c.transaction_id.in_(part))
                  .group_by(LABELS.c.transaction_id))  # fmt: skip
        rows = connection.execute(
            select(LABELS.c.transaction_id, LABELS.c.is_fraud).where(LABELS.c.id.in_(latest))
        )
        current.update({tid: bool(fraud) for tid, fraud in rows})
    return current
