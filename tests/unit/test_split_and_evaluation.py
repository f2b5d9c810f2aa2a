"""Split invariants, the cost-based threshold, the metrics, and the quality gate."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stages.evaluate import QualityGateError, check_gate
from stages.lib.evaluation import (
    choose_threshold,
    cost_by_threshold,
    plot_data,
    precision_at_k,
    recall_at_fpr,
    score_metrics,
)
from stages.lib.splitting import split_frame
from stages.lib.synthetic import generate


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return generate(n_rows=20_000, fraud_rate=0.01, seed=2).drop_duplicates(ignore_index=True)


@pytest.mark.parametrize("strategy", ["time", "stratified"])
def test_split_partitions_rows(frame: pd.DataFrame, strategy: str) -> None:
    parts = split_frame(frame, strategy, valid_size=0.2, test_size=0.25, seed=0)
    assert sum(len(p) for p in parts.values()) == len(frame)
    assert len(parts["test"]) == pytest.approx(0.25 * len(frame), abs=2)
    joined = pd.concat(parts.values()).sort_values(list(frame.columns), ignore_index=True)
    pd.testing.assert_frame_equal(joined, frame.sort_values(list(frame.columns), ignore_index=True))


def test_time_split_trains_on_the_past(frame: pd.DataFrame) -> None:
    parts = split_frame(frame, "time", valid_size=0.2, test_size=0.2, seed=0)
    assert parts["train"]["Time"].max() <= parts["valid"]["Time"].min()
    assert parts["valid"]["Time"].max() <= parts["test"]["Time"].min()


def test_stratified_split_keeps_fraud_rate(frame: pd.DataFrame) -> None:
    parts = split_frame(frame, "stratified", valid_size=0.2, test_size=0.2, seed=0)
    rate = frame["Class"].mean()
    for part in parts.values():
        assert part["Class"].mean() == pytest.approx(rate, rel=0.1)


def test_split_rejects_bad_params(frame: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="strategy"):
        split_frame(frame, "random", 0.2, 0.2, 0)
    with pytest.raises(ValueError, match="sum below 1"):
        split_frame(frame, "time", 0.6, 0.5, 0)


def test_threshold_minimises_cost_by_hand() -> None:
    y = np.array([0, 0, 0, 0, 1, 0, 1, 1])
    p = np.array([0.01, 0.05, 0.2, 0.3, 0.35, 0.6, 0.7, 0.95])
    # Flag p >= 0.35: 1 false alarm (0.6), no missed fraud -> cost 1 x 2 = 2.
    assert choose_threshold(y, p, cost_missed_fraud=50, cost_false_alarm=2) == (0.35, 2.0)
    # Dear false alarms: flag only p >= 0.7, missing one fraud -> cost 1.
    assert choose_threshold(y, p, cost_missed_fraud=1, cost_false_alarm=100) == (0.7, 1.0)
    # The top score is legitimate and alarms are dear: flag nothing (threshold clamps to 1).
    assert choose_threshold(1 - y, p, cost_missed_fraud=1, cost_false_alarm=100) == (1.0, 5.0)
    thresholds, costs = cost_by_threshold(y, p, 50, 2)
    assert costs[0] == 150.0 and thresholds[0] == 1.0  # flag nothing: all 3 frauds missed


def test_rank_metrics() -> None:
    y = np.array([1, 0, 1, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.1, 0.05, 0.01])
    assert precision_at_k(y, p, 2) == 0.5
    assert precision_at_k(y, p, 100) == pytest.approx(2 / 6)
    assert recall_at_fpr(y, p, 0.0) == 0.5
    metrics = score_metrics(y, p, 0.7, cost_missed_fraud=10, cost_false_alarm=1, review_budget=3)
    assert (metrics["true_positives"], metrics["false_positives"]) == (2, 1)
    assert metrics["expected_cost"] == 1.0 and metrics["precision_at_3"] == pytest.approx(2 / 3)
    assert metrics["recall"] == 1.0 and metrics["precision"] == pytest.approx(2 / 3)


def test_plot_data_shapes() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(5000) < 0.05).astype(int)
    p = np.clip(y * 0.5 + rng.random(5000) * 0.5, 0, 1)
    plots = plot_data(y, p, 0.5, y, p, 100, 5)
    assert set(plots) == {
        "pr_curve",
        "roc",
        "calibration",
        "score_histogram",
        "cost_vs_threshold",
        "confusion",
    }
    assert len(plots["confusion"]) == 5000
    assert all(len(v) <= 402 for k, v in plots.items() if k != "confusion")
    assert sum(r["fraud_share"] for r in plots["score_histogram"]) == pytest.approx(1.0)


def test_gate_refuses_degenerate_model() -> None:
    gate = {"min_average_precision": 0.3, "min_roc_auc": 0.85}
    check_gate({"average_precision": 0.7, "roc_auc": 0.95}, gate)
    with pytest.raises(QualityGateError, match=r"roc_auc 0\.5100 < required 0\.85"):
        check_gate({"average_precision": 0.31, "roc_auc": 0.51}, gate)
