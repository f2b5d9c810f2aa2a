"""Builds the contract a model travels with (the typed definition is serving/contract.py):
what serving validates against and monitors with."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from serving.contract import (
    SCORE_EDGES,
    Binned,
    Contract,
    Costs,
    Feature,
    Lineage,
    Reference,
    RiskBand,
    Runtime,
    ScoreReference,
)
from stages.lib.schema import FEATURES, TARGET

NON_NEGATIVE = ("Time", "Amount")
# Time (seconds since the data's first transaction) only grows, so it has no training
# bound; ten years caps it short of values that lose precision (1e308 was scored).
MAX_TIME_SECONDS = 10 * 365 * 86_400.0


def feature_ranges(train: pd.DataFrame, margin: float) -> list[Feature]:
    """Per feature: dtype, the range seen in training, and the range serving accepts
    (the training range widened by `margin` times its span on each side; never below 0
    for Time and Amount; Time, which only grows, up to MAX_TIME_SECONDS)."""
    out = []
    for name in FEATURES:
        lo, hi = float(train[name].min()), float(train[name].max())
        span = hi - lo
        valid_min = 0.0 if name in NON_NEGATIVE else lo - margin * span
        out.append(
            Feature(
                name=name,
                train_min=lo,
                train_max=hi,
                valid_min=valid_min,
                valid_max=MAX_TIME_SECONDS if name == "Time" else hi + margin * span,
            )
        )
    return out


def _fractions(values: np.ndarray, edges: np.ndarray) -> list[float]:
    counts = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)[0]
    return (counts / max(1, counts.sum())).tolist()


def reference_distributions(
    frame: pd.DataFrame, scores: np.ndarray, drift_features: list[str], threshold: float
) -> Reference:
    """Binned distributions from held-out data, for PSI drift checks in serving."""
    score_edges = np.asarray(SCORE_EDGES)
    features = {}
    for name in drift_features:
        # Deciles of the reference, open-ended at both sides so live values always land.
        inner = np.unique(np.quantile(frame[name], np.linspace(0.1, 0.9, 9)))
        edges = np.r_[-np.inf, inner, np.inf]
        counts = np.histogram(frame[name], bins=edges)[0]
        features[name] = Binned(
            edges=[None, *inner.tolist(), None], fractions=(counts / counts.sum()).tolist()
        )
    return Reference(
        rows=len(frame),
        fraud_rate=float(frame[TARGET].mean()),
        flagged_ratio=float(np.mean(scores >= threshold)),
        score=ScoreReference(
            edges=list(SCORE_EDGES),
            fractions=_fractions(scores, score_edges),
            mean=float(scores.mean()),
        ),
        features=features,
    )


def risk_bands(threshold: float) -> list[RiskBand]:
    """Lower edges of named bands of fraud probability, anchored on the decision threshold."""
    return [
        RiskBand(name="low", min=0.0),
        RiskBand(name="elevated", min=threshold / 4),
        RiskBand(name="high", min=threshold),
        RiskBand(name="critical", min=max(0.9, threshold)),
    ]


def build_contract(
    train: pd.DataFrame,
    reference: pd.DataFrame,
    reference_scores: np.ndarray,
    champion: dict[str, Any],
    package_params: dict[str, Any],
    runtime: Runtime,
) -> Contract:
    """Everything serving needs, from content alone: the same champion and data give the
    same bytes on any machine (no run ids, versions, commits or times)."""
    threshold = float(champion["threshold"])
    return Contract(
        features=feature_ranges(train, float(package_params["range_margin"])),
        ignored_columns=[TARGET],
        output={
            "fraud_probability": "calibrated P(fraud) from predict_proba",
            "is_fraud": "fraud_probability >= threshold",
        },
        threshold=threshold,
        costs=Costs(**champion["costs"]),
        risk_bands=risk_bands(threshold),
        reference=reference_distributions(
            reference, reference_scores, list(package_params["drift_features"]), threshold
        ),
        test_metrics=champion["test_metrics"],
        performance_margin=float(package_params["performance_margin"]),
        lineage=Lineage(
            registered_model=champion["registered_model"],
            model_md5=champion["model_md5"],
            model_family=champion["model_family"],
            **champion["lineage"],
        ),
        runtime=runtime,
    )
