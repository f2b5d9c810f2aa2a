"""Labelled decisions as training data (stages/lib/feedback.py) against a real SQLite
decision log: one row per transaction id, the latest decision and label, the features the
model saw; merged with an earlier export; placed after the source data in time order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from serving.decisions import DecisionLog, Decisions, commit_or_refuse
from serving.feedback import labels_from_json, store
from stages.lib import feedback
from stages.lib.schema import FEATURES

DAY = feedback.SECONDS_PER_DAY


def _score(log: DecisionLog, ids: list[str], features: np.ndarray, request: str) -> None:
    probabilities = np.linspace(0.1, 0.9, len(ids))
    commit_or_refuse(log, Decisions(ids, probabilities, 0.5, features, request, "a" * 32, "onnx"))


def _label(log: DecisionLog, *labels: tuple[str, bool]) -> None:
    payload = {"labels": [{"transaction_id": t, "is_fraud": f} for t, f in labels]}
    store(log.engine, labels_from_json(payload, 100))


@pytest.fixture
def log(tmp_path: Path) -> DecisionLog:
    return DecisionLog(f"sqlite:///{tmp_path}/decisions.db")


def test_one_row_per_transaction_with_its_latest_decision_and_label(log, tmp_path) -> None:
    features = np.arange(3 * len(FEATURES), dtype=float).reshape(3, len(FEATURES))
    _score(log, ["a", "b", "c"], features, "r1")
    _score(log, ["a"], features[:1] + 1000, "r2")  # "a" scored again: the latest counts
    _label(log, ("a", False), ("b", True))
    _label(log, ("a", True))  # a correction
    out = tmp_path / "feedback"
    assert feedback.export(log.engine, out) == (0, 2)
    exported = pd.read_parquet(out / feedback.FILE_NAME).set_index("transaction_id")
    assert sorted(exported.index) == ["a", "b"]  # "c" has no label
    assert exported.loc["a", "Class"] == 1 and exported.loc["b", "Class"] == 1
    np.testing.assert_array_equal(exported.loc["a", FEATURES].to_numpy(float), features[0] + 1000)
    np.testing.assert_array_equal(exported.loc["b", FEATURES].to_numpy(float), features[1])


def test_an_export_keeps_what_the_folder_held(log, tmp_path) -> None:
    out = tmp_path / "feedback"
    _score(log, ["a", "b"], np.zeros((2, len(FEATURES))), "r1")
    _label(log, ("a", True))
    feedback.export(log.engine, out)
    with log.engine.begin() as connection:  # retention removed "a" from the log since
        connection.exec_driver_sql("DELETE FROM decisions WHERE transaction_id = 'a'")
    _label(log, ("b", False))
    assert feedback.export(log.engine, out) == (1, 2)
    assert sorted(feedback.read_folder(out)["transaction_id"]) == ["a", "b"]


def test_feedback_comes_after_the_source_keeping_the_hour_of_day() -> None:
    rows = pd.DataFrame(np.ones((3, len(FEATURES))), columns=FEATURES).assign(Class=[0, 1, 0])
    rows["Time"] = [3_600.0, 90_000.0, 7_200.0]  # as the clients sent them
    rows["decided_at"] = [10 * DAY + 5, 10 * DAY + 50, 12 * DAY + 1]
    rows["transaction_id"] = ["x", "y", "z"]
    placed = feedback.in_time_order(rows, source_end=172_792.0)  # the ULB file's last Time
    assert placed["Time"].tolist() == [2 * DAY + 3_600, 2 * DAY + 3_600, 4 * DAY + 7_200]
    assert placed["Class"].tolist() == [0, 1, 0]
    np.testing.assert_array_equal(feedback.newest(rows, 1.5), [False, False, True])
    np.testing.assert_array_equal(feedback.newest(rows, 3), [True, True, True])


def test_a_correction_after_an_export_wins_at_the_next(log, tmp_path) -> None:
    out = tmp_path / "feedback"
    _score(log, ["a"], np.zeros((1, len(FEATURES))), "r1")
    _label(log, ("a", False))
    feedback.export(log.engine, out)
    _label(log, ("a", True))
    (out / ".labelled.tmp-1.parquet").write_bytes(b"cut short")  # an export killed mid-write
    assert feedback.export(log.engine, out) == (1, 1)
    assert feedback.read_folder(out)["Class"].tolist() == [1]


def test_prepare_takes_feedback_of_one_class_and_keeps_the_window_out(tmp_path) -> None:
    from stages.prepare import with_feedback

    source = pd.DataFrame(np.ones((4, len(FEATURES))), columns=FEATURES).assign(Class=[0, 1, 0, 0])
    source["Time"] = [0.0, 10.0, 20.0, 30.0]
    source["V1"] = [1.0, 2.0, 3.0, 4.0]
    rows = source.iloc[[1, 2]].assign(Class=1)  # source rows 1 and 2, scored and labelled fraud
    rows = rows.assign(transaction_id=["x", "y"], decided_at=[DAY, 3 * DAY],
                       labelled_at=0.0, label_received_at=0.0, decision_id=[1, 2],
                       model_md5="a" * 32, probability=0.9, threshold=0.5)  # fmt: skip
    (tmp_path / "fb").mkdir()
    rows.to_parquet(tmp_path / "fb" / feedback.FILE_NAME, index=False)
    data = {"feedback": True, "recent_days": 1.0}
    training, recent, counts = with_feedback(source, data, tmp_path / "fb")
    assert recent["V1"].tolist() == [3.0] and recent["Class"].tolist() == [1]
    assert counts["dropped_as_in_window"] == 1  # source row 2 is the window's transaction
    assert training["V1"].tolist() == [1.0, 2.0, 4.0, 2.0]  # "x" appended after the source
    assert training["Class"].tolist() == [0, 1, 0, 1]
    assert training["Time"].iloc[-1] == 86_400 + 10.0
