"""Labels (serving/feedback.py) against a real SQLite decision log: idempotent, changed
labels kept as corrections, unknown ids listed, bad labels refused naming the rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from serving.decisions import LABELS, DecisionLog, Decisions, commit_or_refuse
from serving.errors import RequestError
from serving.feedback import labels_from_csv, labels_from_json, store


@pytest.fixture
def log(tmp_path: Path) -> DecisionLog:
    decision_log = DecisionLog(f"sqlite:///{tmp_path}/decisions.db")
    rows = 4
    commit_or_refuse(
        decision_log,
        Decisions(
            [f"t{i}" for i in range(rows)],
            np.full(rows, 0.9),
            0.5,
            np.zeros((rows, 30)),
            "r",
            "0" * 32,
            "onnx",
        ),
    )
    return decision_log


def _json(*labels: tuple) -> dict:
    return {"labels": [dict(zip(("transaction_id", "is_fraud", "labelled_at"), label, strict=False))
                       for label in labels]}  # fmt: skip


def test_labels_are_idempotent_and_changes_are_corrections(log: DecisionLog) -> None:
    first = store(log.engine, labels_from_json(_json(("t0", True), ("t1", False)), 100))
    assert (first["stored"], first["corrections"], first["unchanged"]) == (2, 0, 0)
    again = store(log.engine, labels_from_json(_json(("t0", True), ("t1", False)), 100))
    assert (again["stored"], again["corrections"], again["unchanged"]) == (0, 0, 2)
    changed = store(log.engine, labels_from_json(_json(("t1", True, "2026-11-30T10:00:00")), 100))
    assert (changed["stored"], changed["corrections"]) == (0, 1)
    with log.engine.connect() as connection:
        kept = connection.execute(select(LABELS.c.transaction_id, LABELS.c.is_fraud)
                                  .order_by(LABELS.c.id)).all()  # fmt: skip
    assert kept == [("t0", True), ("t1", False), ("t1", True)]  # the correction beside the first


def test_unknown_ids_are_listed_not_stored(log: DecisionLog) -> None:
    answer = store(log.engine, labels_from_json(_json(("t2", True), ("nope", True)), 100))
    assert answer["stored"] == 1 and answer["unknown"] == ["nope"] and answer["unknown_total"] == 1


def test_a_csv_of_labels(log: DecisionLog) -> None:
    data = b"transaction_id,is_fraud,labelled_at\nt0,1,1764547200\nt3,false,\n"
    answer = store(log.engine, labels_from_csv(data, 100))
    assert (answer["received"], answer["stored"]) == (2, 2)


@pytest.mark.parametrize(
    ("payload", "rule", "rows"),
    [
        (_json(("t0", "maybe"), ("t1", True), ("t2", None)), "is-fraud", [0, 2]),
        (_json(("t0", True), ("t0", False)), "duplicate-ids", [0, 1]),
        (_json(("t 0", True)), "transaction-id", [0]),
        (_json(("t0", True, "yesterday")), "labelled-at", [0]),
        ({"labels": [1, 2]}, "record-type", [0, 1]),
        ({"nothing": []}, "labels", None),
    ],
)
def test_bad_labels_are_refused_naming_the_rows(payload: dict, rule: str, rows) -> None:
    with pytest.raises(RequestError) as caught:
        labels_from_json(payload, 100)
    assert (caught.value.status, caught.value.body["rule"]) == (400, rule)
    assert caught.value.body.get("rows") == rows


@pytest.mark.parametrize("when", [10**400, "nan", "-inf", -5, "1e999"])
def test_impossible_label_times_are_400(when) -> None:
    with pytest.raises(RequestError) as caught:
        labels_from_json(_json(("t0", True, when)), 100)
    assert (caught.value.status, caught.value.body["rule"]) == (400, "labelled-at")


@pytest.mark.parametrize(
    ("data", "rule"),
    [
        (b"transaction_id,transaction_id,is_fraud\nt0,t0,1\n", "duplicate-columns"),
        (b"transaction_id,is_fraud,\xff\nt0,1,2\n", "parse"),
        (b"transaction_id\nt0\n", "missing-columns"),
    ],
)
def test_malformed_label_files_are_400(data: bytes, rule: str) -> None:
    with pytest.raises(RequestError) as caught:
        labels_from_csv(data, 100)
    assert (caught.value.status, caught.value.body["rule"]) == (400, rule)
