"""How model families rank on a dataset: the check that the synthetic default tells the truth.

One 20% time-ordered test split cannot rank families: on the real first day it holds 35
frauds, and a stratified bootstrap of that split gives each family's average precision a
95% interval about 0.3 wide (see `ap_interval`). Rolling-origin evaluation uses every
fraud after the first fold: each family is refitted on all rows before an origin and
scored on the block after it, for several origins (forward-chaining folds, the search's
own splitter). The ranking is the order of the mean AP over those blocks. AP ignores any
monotone calibration, so the raw pipelines are compared, without refit or threshold.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score

from stages.lib.modeling import build_estimator, fold_scores, folds
from stages.lib.schema import TARGET


def rolling_average_precision(
    frame: pd.DataFrame, families: dict[str, dict[str, Any]], n_splits: int, seed: int
) -> dict[str, list[float]]:
    """Per family (name -> its params), the AP on each forward-chaining block of `frame`
    sorted by Time; every block is scored by a model fitted on all rows before it."""
    ordered = frame.sort_values("Time", kind="stable", ignore_index=True)
    labels = ordered[TARGET].to_numpy()
    splitter = folds(n_splits, time_ordered=True, seed=seed)
    result = {}
    for family, params in families.items():

        def make(family: str = family, params: dict[str, Any] = params) -> Any:
            return build_estimator(family, params, seed)

        result[family] = [
            float(average_precision_score(labels[rows], scores))
            for rows, _, scores in fold_scores(make, ordered, labels, splitter)
        ]
    return result


def ranking(per_block: dict[str, list[float]]) -> list[str]:
    """Families from the highest mean AP to the lowest."""
    return sorted(per_block, key=lambda family: -float(np.mean(per_block[family])))


def ap_interval(
    labels: np.ndarray, scores: np.ndarray, rounds: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% stratified-bootstrap interval of one split's AP (frauds and legitimate rows are
    resampled separately, so every round keeps the split's fraud count)."""
    rng = np.random.default_rng(seed)
    positives, negatives = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    values = []
    for _ in range(rounds):
        rows = np.concatenate(
            [rng.choice(positives, len(positives)), rng.choice(negatives, len(negatives))]
        )
        values.append(average_precision_score(labels[rows], scores[rows]))
    low, high = np.quantile(values, [0.025, 0.975])
    return float(low), float(high)
