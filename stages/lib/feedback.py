"""Labelled decisions as training data: exported from the decision log, read by prepare.

`make export-labels` joins each label that came back (POST /feedback) to the decision it
labels and writes one row per transaction id under data/raw/feedback/ (DVC-tracked): the
feature values the model saw, the time it decided, and the label (a correction replaces
the first label; a transaction scored twice keeps its latest decision). Exports merge
with what the folder already holds, so decisions the log's retention has since removed
stay in the training data.

Prepare (data.feedback: true) appends these rows after the source data in time order and
holds out the newest `data.recent_days` of them, on which evaluate judges the candidate
and the champion rule compares it with the champion (the same rows, which neither saw).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import Engine, select

from serving.decisions import DECISIONS, LABELS
from stages.lib.project import atomic_path
from stages.lib.schema import FEATURES, TARGET

log = logging.getLogger("fraudops.feedback")

FILE_NAME = "labelled.parquet"
ID = "transaction_id"
DECIDED_AT = "decided_at"
DECISION = "decision_id"  # the log's row id: a request's rows share a time, this orders them
RECEIVED_AT = "label_received_at"
SECONDS_PER_DAY = 86_400
CHUNK_ROWS = 50_000


def _chunks(engine: Engine) -> Iterator[list]:
    """The joined (decision, label) rows, a chunk at a time, without holding them all."""
    query = (
        select(DECISIONS.c.id, DECISIONS.c.transaction_id, DECISIONS.c.decided_at,
               DECISIONS.c.model_md5, DECISIONS.c.probability, DECISIONS.c.threshold,
               DECISIONS.c.features, LABELS.c.id.label("label_id"),
               LABELS.c.is_fraud.label("label"), LABELS.c.labelled_at, LABELS.c.received_at)
        .join(LABELS, LABELS.c.transaction_id == DECISIONS.c.transaction_id)
        .order_by(LABELS.c.id, DECISIONS.c.id)
    )  # fmt: skip
    with engine.connect() as connection:
        result = connection.execution_options(stream_results=True).execute(query)
        while rows := result.fetchmany(CHUNK_ROWS):
            yield rows


def _frame(rows: list) -> pd.DataFrame:
    width = 8 * len(FEATURES)  # the log stores the contract's features, in this order
    if any(len(r.features) != width for r in rows):
        raise ValueError(f"a decision's features are not {len(FEATURES)} float64 values")
    features = np.frombuffer(b"".join(r.features for r in rows), dtype="<f8")
    frame = pd.DataFrame(features.reshape(len(rows), len(FEATURES)), columns=list(FEATURES))
    frame.insert(0, ID, [r.transaction_id for r in rows])
    frame[DECISION] = np.array([r.id for r in rows], dtype=np.int64)
    frame[DECIDED_AT] = [r.decided_at for r in rows]
    frame["labelled_at"] = [r.labelled_at for r in rows]
    frame[RECEIVED_AT] = [r.received_at for r in rows]
    frame["model_md5"] = [r.model_md5 for r in rows]
    frame["probability"] = [r.probability for r in rows]
    frame["threshold"] = [r.threshold for r in rows]
    frame[TARGET] = np.array([r.label for r in rows], dtype=np.int64)
    frame["_order"] = [(r.label_id, r.id) for r in rows]
    return frame


def labelled_decisions(engine: Engine) -> pd.DataFrame:
    """One row per labelled transaction: its latest decision and its latest label."""
    parts, total = [], 0
    for rows in _chunks(engine):
        parts.append(_frame(rows))
        total += len(rows)
        log.info("read %d labelled decision rows", total)
    if not parts:
        return empty()
    frame = pd.concat(parts, ignore_index=True).sort_values("_order", kind="stable")
    frame = frame.drop_duplicates(ID, keep="last").drop(columns="_order")
    return frame.sort_values([DECIDED_AT, DECISION], ignore_index=True)


def empty() -> pd.DataFrame:
    columns = {ID: "object", **dict.fromkeys(FEATURES, "float64"), DECISION: "int64",
               DECIDED_AT: "float64",
               "labelled_at": "float64", RECEIVED_AT: "float64", "model_md5": "object",
               "probability": "float64", "threshold": "float64", TARGET: "int64"}  # fmt: skip
    return pd.DataFrame({name: pd.Series(dtype=kind) for name, kind in columns.items()})


def merge(held: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """What the folder held and the new export, one row per transaction id: the row whose
    label arrived last wins (a correction made after the previous export)."""
    both = pd.concat([held, new], ignore_index=True)
    both = both.sort_values(RECEIVED_AT, kind="stable").drop_duplicates(ID, keep="last")
    return both.sort_values([DECIDED_AT, DECISION], ignore_index=True)


def read_folder(folder: Path) -> pd.DataFrame:
    """Every exported row under `folder` (empty if it holds none)."""
    # not atomic_path's hidden temporary file of an export cut short
    files = (
        sorted(f for f in folder.glob("*.parquet") if not f.name.startswith("."))
        if folder.is_dir()
        else []
    )
    if not files:
        return empty()
    return merge(empty(), pd.concat([pd.read_parquet(f) for f in files], ignore_index=True))


def export(engine: Engine, folder: Path) -> tuple[int, int]:
    """Merge the log's labelled decisions into `folder`; (rows before, rows after)."""
    held = read_folder(folder)
    merged = merge(held, labelled_decisions(engine))
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / FILE_NAME) as tmp:
        merged.to_parquet(tmp, index=False)
    for stale in folder.glob("*.parquet"):  # folded into the one file above
        if stale.name != FILE_NAME and not stale.name.startswith("."):
            stale.unlink()
    return len(held), len(merged)


def in_time_order(feedback: pd.DataFrame, source_end: float) -> pd.DataFrame:
    """The feedback rows (sorted by decision time) as rows of the source schema, after
    the source data in time.

    `Time` counts seconds from the source's first transaction, and the model reads only
    its hour of day. Each row keeps the hour of day it was scored with and moves to the
    day after the source's last, plus the days between its decision and the first
    labelled decision's, so a time split sees the outcomes as the newest data."""
    decided = feedback[DECIDED_AT].to_numpy()
    day = np.floor(decided / SECONDS_PER_DAY) - (
        math.floor(decided.min() / SECONDS_PER_DAY) if len(decided) else 0
    )
    start = math.floor(source_end / SECONDS_PER_DAY) + 1
    rows = feedback[[*FEATURES, TARGET]].reset_index(drop=True)
    rows["Time"] = (start + day) * SECONDS_PER_DAY + np.mod(rows["Time"], SECONDS_PER_DAY)
    return rows


def newest(feedback: pd.DataFrame, days: float) -> np.ndarray:
    """Which rows were decided within `days` of the newest labelled decision."""
    decided = feedback[DECIDED_AT].to_numpy()
    if not len(decided):
        return np.zeros(0, dtype=bool)
    return decided > decided.max() - days * SECONDS_PER_DAY


def same_transaction(rows: pd.DataFrame, window: pd.DataFrame) -> np.ndarray:
    """Which of `rows` have the features of a row of `window` (Time aside, which moved):
    the same transaction scored twice under two assigned ids, or a source row scored and
    labelled. Kept in training, they would be judged on themselves."""
    columns = [c for c in FEATURES if c != "Time"]
    if window.empty:
        return np.zeros(len(rows), dtype=bool)
    held = pd.util.hash_pandas_object(window[columns], index=False)
    return pd.util.hash_pandas_object(rows[columns], index=False).isin(held).to_numpy()
