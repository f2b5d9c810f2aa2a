"""Scoring metrics, the business-cost threshold, and curve data for DVC plots."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from stages.lib.params import costs

MAX_CURVE_POINTS = 400


def cost_by_threshold(
    y: np.ndarray, p: np.ndarray, cost_missed_fraud: float, cost_false_alarm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Expected total cost of flagging `p >= t`, for every distinct score t.

    Returns (thresholds descending, costs). The first threshold flags nothing.
    """
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    positives, negatives = int(y.sum()), int(len(y) - y.sum())
    false_alarms = fpr * negatives
    missed = (1.0 - tpr) * positives
    thresholds = np.minimum(thresholds, 1.0)  # roc_curve starts at +inf: "flag nothing"
    return thresholds, cost_false_alarm * false_alarms + cost_missed_fraud * missed


def choose_threshold(
    y: np.ndarray, p: np.ndarray, cost_missed_fraud: float, cost_false_alarm: float
) -> tuple[float, float]:
    """The score threshold with the lowest expected cost, and that cost.

    >>> y = np.array([0, 0, 0, 1, 1]); p = np.array([0.1, 0.2, 0.6, 0.5, 0.9])
    >>> choose_threshold(y, p, cost_missed_fraud=10, cost_false_alarm=1)
    (0.5, 1.0)
    >>> choose_threshold(y, p, cost_missed_fraud=1, cost_false_alarm=10)
    (0.9, 1.0)
    """
    thresholds, costs = cost_by_threshold(y, p, cost_missed_fraud, cost_false_alarm)
    best = int(np.argmin(costs))
    return float(thresholds[best]), float(costs[best])


def recall_at_fpr(y: np.ndarray, p: np.ndarray, max_fpr: float) -> float:
    fpr, tpr, _ = roc_curve(y, p)
    return float(tpr[fpr <= max_fpr].max())


def precision_at_k(y: np.ndarray, p: np.ndarray, k: int) -> float:
    """Share of frauds among the k highest scores (a review team's daily budget)."""
    top = np.argsort(-p, kind="stable")[: min(k, len(p))]
    return float(y[top].mean())


def score_metrics(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    cost_missed_fraud: float,
    cost_false_alarm: float,
    review_budget: int,
) -> dict[str, Any]:
    flagged = p >= threshold
    tn, fp, fn, tp = confusion_matrix(y, flagged, labels=[0, 1]).ravel()
    cost = cost_false_alarm * fp + cost_missed_fraud * fn
    cost_without_model = cost_missed_fraud * int(y.sum())
    return {
        "average_precision": float(average_precision_score(y, p)),
        "roc_auc": float(roc_auc_score(y, p)),
        "brier": float(brier_score_loss(y, p)),
        "log_loss": float(log_loss(y, p, labels=[0, 1])),
        "threshold": threshold,
        "precision": float(precision_score(y, flagged, zero_division=0)),
        "recall": float(recall_score(y, flagged, zero_division=0)),
        "f1": float(f1_score(y, flagged, zero_division=0)),
        "recall_at_1pct_fpr": recall_at_fpr(y, p, 0.01),
        f"precision_at_{review_budget}": precision_at_k(y, p, review_budget),
        "flagged": int(flagged.sum()),
        "true_positives": int(tp),
        "false_positives": int(fp),
        "false_negatives": int(fn),
        "true_negatives": int(tn),
        "expected_cost": float(cost),
        "cost_without_model": float(cost_without_model),
        "cost_per_1000_transactions": float(1000 * cost / len(y)),
    }


def _thin(*columns: np.ndarray) -> list[np.ndarray]:
    step = max(1, -(-len(columns[0]) // MAX_CURVE_POINTS))  # ceil
    keep = np.r_[np.arange(0, len(columns[0]), step), len(columns[0]) - 1]
    return [np.asarray(c)[np.unique(keep)] for c in columns]


def _records(**columns: np.ndarray) -> list[dict[str, float]]:
    names = list(columns)
    return [
        dict(zip(names, map(float, row), strict=True))
        for row in zip(*columns.values(), strict=True)
    ]


def plot_data(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    oof_y: np.ndarray,
    oof_p: np.ndarray,
    cost_missed_fraud: float,
    cost_false_alarm: float,
) -> dict[str, list[dict[str, Any]]]:
    """Curve tables for `dvc plots`: each a list of flat records. Test scores (`y`, `p`)
    for all but the cost curve, which is drawn on the out-of-fold scores of the training
    rows, where the threshold was chosen."""
    precision, recall, _ = precision_recall_curve(y, p)
    fpr, tpr, _ = roc_curve(y, p)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10, strategy="quantile")
    thresholds, costs = cost_by_threshold(oof_y, oof_p, cost_missed_fraud, cost_false_alarm)
    edges = np.linspace(0, 1, 21)
    legit_hist = np.histogram(p[y == 0], bins=edges)[0] / max(1, int((y == 0).sum()))
    fraud_hist = np.histogram(p[y == 1], bins=edges)[0] / max(1, int((y == 1).sum()))
    flagged = p >= threshold
    confusion = [
        {"actual": "fraud" if a else "legit", "predicted": "fraud" if f else "legit"}
        for a, f in zip(y.astype(bool), flagged, strict=True)
    ]
    return {
        "pr_curve": _records(
            **dict(zip(("recall", "precision"), _thin(recall[::-1], precision[::-1]), strict=True))
        ),
        "roc": _records(**dict(zip(("fpr", "tpr"), _thin(fpr, tpr), strict=True))),
        "calibration": _records(mean_predicted=prob_pred, fraction_fraud=prob_true),
        "score_histogram": _records(
            bin_start=edges[:-1], legit_share=legit_hist, fraud_share=fraud_hist
        ),
        "cost_vs_threshold": _records(
            **dict(
                zip(("threshold", "expected_cost"), _thin(thresholds[1:], costs[1:]), strict=True)
            )
        ),
        "confusion": confusion,
    }


def evaluate_scores(
    oof_y: np.ndarray, oof_p: np.ndarray, test_y: np.ndarray, test_p: np.ndarray, cfg: dict
) -> tuple[float, dict[str, Any]]:
    """The cost-optimal threshold on the out-of-fold scores of the training rows, and the
    test metrics at it."""
    threshold, oof_cost = choose_threshold(oof_y, oof_p, **costs(cfg))
    metrics = score_metrics(
        test_y, test_p, threshold, review_budget=int(cfg["review_budget"]), **costs(cfg)
    )
    metrics["out_of_fold_expected_cost"] = oof_cost
    return threshold, metrics
