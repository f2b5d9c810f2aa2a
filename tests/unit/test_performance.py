"""Realised and estimated performance (serving/performance.py) from a real SQLite decision
log equal the same figures computed offline from the rows themselves."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from serving.contract import Costs
from serving.decisions import DecisionLog, Decisions, commit_or_refuse
from serving.feedback import labels_from_json, store
from serving.performance import measure

COSTS = Costs(cost_missed_fraud=100.0, cost_false_alarm=5.0)
THRESHOLD = 0.3


def test_figures_match_an_offline_computation(tmp_path: Path) -> None:
    log = DecisionLog(f"sqlite:///{tmp_path}/decisions.db")
    rng = np.random.default_rng(4)
    rows = 2_000
    probability = rng.beta(0.3, 3, rows)
    fraud = rng.random(rows) < probability  # calibrated by construction
    ids = [f"t{i}" for i in range(rows)]
    commit_or_refuse(log, Decisions(ids, probability, THRESHOLD, np.zeros((rows, 30)), "r",
                                    "0" * 32, "onnx"))  # fmt: skip
    labelled = rng.random(rows) < 0.6
    wrong_first = np.flatnonzero(labelled)[:10]  # a first label, then its correction
    store(
        log.engine,
        labels_from_json(
            {"labels": [{"transaction_id": ids[i], "is_fraud": not fraud[i]} for i in wrong_first]},
            10**6,
        ),
    )
    store(log.engine, labels_from_json({"labels": [
        {"transaction_id": ids[i], "is_fraud": bool(fraud[i])} for i in np.flatnonzero(labelled)
    ]}, 10**6))  # fmt: skip
    figures = measure(log.engine, time.time() - 3600, COSTS)
    alerted, truth, p = (probability >= THRESHOLD)[labelled], fraud[labelled], probability[labelled]
    realised = figures["realised"]
    assert realised["label_coverage"] == pytest.approx(labelled.mean())
    assert realised["alert_precision"] == pytest.approx((alerted & truth).sum() / alerted.sum())
    assert realised["recall"] == pytest.approx((alerted & truth).sum() / truth.sum())
    assert realised["average_precision"] == pytest.approx(average_precision_score(truth, p))
    cost = (~alerted & truth).sum() * 100.0 + (alerted & ~truth).sum() * 5.0
    assert realised["cost"] == pytest.approx(cost)
    estimated = figures["estimated"]
    assert estimated["frauds"] == pytest.approx(probability.sum())
    assert estimated["alert_precision"] == pytest.approx(probability[probability >= THRESHOLD]
                                                         .mean())  # fmt: skip
    assert measure(log.engine, time.time() + 60, COSTS)["estimated"]["decisions"] == 0
