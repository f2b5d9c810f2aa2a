"""The model search and the cross-fitted calibration, on small synthetic data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import StackingClassifier, VotingClassifier
from sklearn.metrics import average_precision_score

from stages.lib.modeling import build_model, cross_fitted, folds, fraud_probability, raw_scores
from stages.lib.schema import FEATURES
from stages.lib.search import SearchCutShort, population_weights, run_search, search_sample
from stages.lib.synthetic import generate

SEARCH = {
    "families": ["hgb", "logreg"],
    "trials": 4,
    "timeout_seconds": 120,
    "folds": 3,
    "negative_fraction": 0.5,
    "average_top_two": True,
    "average_min_gain": 0.0,
}
DEFAULTS = {
    "hgb": {"learning_rate": 0.1, "max_iter": 40, "max_leaf_nodes": 15, "min_samples_leaf": 20},
    "logreg": {"C": 0.1, "class_weight": "balanced"},
}


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return generate(n_rows=6_000, fraud_rate=0.02, seed=5)


@pytest.fixture(scope="module")
def searched(frame: pd.DataFrame):
    seen: list[dict] = []
    result = run_search(frame, SEARCH, DEFAULTS, seed=3, time_ordered=True, on_trial=seen.append)
    return result, seen


def test_search_tries_every_family_default_first(searched) -> None:
    result, seen = searched
    assert [r["family"] for r in seen[:2]] == ["hgb", "logreg"]
    assert seen[0]["params"]["learning_rate"] == 0.1 and seen[1]["params"]["C"] == 0.1
    assert result.trials == len(seen) == 4
    assert set(result.best_by_family) == {"hgb", "logreg"}
    assert result.cv_average_precision >= max(result.best_by_family.values())


def test_search_is_deterministic(frame: pd.DataFrame, searched) -> None:
    again = run_search(frame, SEARCH, DEFAULTS, seed=3, time_ordered=True)
    result, _ = searched
    assert again.members == result.members
    assert again.cv_average_precision == result.cv_average_precision


def test_a_search_cut_short_by_its_cap_fails(frame: pd.DataFrame) -> None:
    """Choosing from the trials that finished in time would make the model (and every
    hash after it) depend on the machine's speed."""
    with pytest.raises(SearchCutShort, match=r"after \d of 4 trials"):
        run_search(frame, {**SEARCH, "timeout_seconds": 0.01}, DEFAULTS, 3, True)


def test_forward_chaining_never_learns_from_the_future() -> None:
    rows = np.arange(100)
    for fit_rows, held_out in folds(3, time_ordered=True, seed=0).split(rows):
        assert fit_rows.max() < held_out.min()


def test_search_sample_keeps_all_frauds_in_order(frame: pd.DataFrame) -> None:
    sample = search_sample(frame, 0.3, seed=1)
    assert sample["Class"].sum() == frame["Class"].sum()
    assert sample["Time"].is_monotonic_increasing
    assert 0.2 < (sample["Class"] == 0).sum() / (frame["Class"] == 0).sum() < 0.4


def test_population_weights_undo_negative_sampling() -> None:
    """Scored on a 40% sample of the legitimate rows, weighted AP estimates the full
    population's AP; unweighted it overstates it (the fraud rate looks 2.5x higher)."""
    rng = np.random.default_rng(0)
    labels = (rng.random(200_000) < 0.002).astype(int)
    scores = rng.normal(size=labels.size) + 2.5 * labels
    full = average_precision_score(labels, scores)
    keep = (labels == 1) | (rng.random(labels.size) < 0.4)
    weights = population_weights(labels[keep], 0.4)
    weighted = average_precision_score(labels[keep], scores[keep], sample_weight=weights)
    unweighted = average_precision_score(labels[keep], scores[keep])
    assert abs(weighted - full) < 0.02
    assert unweighted > full + 0.05
    assert (population_weights(labels, 1.0) == 1).all()


def test_cross_fitted_calibration(frame: pd.DataFrame) -> None:
    labels = frame["Class"].to_numpy()
    members = [{"family": "hgb", "params": DEFAULTS["hgb"]}]
    model, oof_rows, oof_p = cross_fitted(
        lambda: build_model(members, 0), frame, labels, "sigmoid", folds(3, True, 0)
    )
    # Forward chaining: the first block is never out-of-fold; the rest is, once each.
    assert len(np.unique(oof_rows)) == len(oof_rows) and oof_rows.min() > 0
    assert oof_rows.max() == len(frame) - 1
    assert isinstance(model, CalibratedClassifierCV)
    calibrator = model.calibrated_classifiers_[0].calibrators[0]
    final = model.calibrated_classifiers_[0].estimator
    # The served probability is the out-of-fold calibrator on the refitted model's score.
    head = frame.head(50)
    np.testing.assert_allclose(
        fraud_probability(model, head), calibrator.predict(raw_scores(final, head)), rtol=1e-12
    )
    assert ((oof_p >= 0) & (oof_p <= 1)).all()


def test_average_of_two_is_plain_sklearn() -> None:
    members = [
        {"family": "hgb", "params": DEFAULTS["hgb"]},
        {"family": "logreg", "params": DEFAULTS["logreg"]},
    ]
    assert isinstance(build_model(members, 0), VotingClassifier)


def test_probability_only_models_get_platt_on_log_odds(frame: pd.DataFrame) -> None:
    """No floor under the probabilities and no ties: the ranking the search scored."""
    labels = frame["Class"].to_numpy()
    members = [{"family": "extra_trees", "params": {"n_estimators": 30, "min_samples_leaf": 3}}]
    model, _, oof_p = cross_fitted(
        lambda: build_model(members, 0), frame, labels, "auto", folds(3, True, 0)
    )
    assert isinstance(model, StackingClassifier)
    head = frame.tail(400)
    raw = model.estimators_[0].predict_proba(head[list(FEATURES)])[:, 1]
    served = fraud_probability(model, head)
    order = np.argsort(raw, kind="stable")
    assert (np.diff(served[order]) >= 0).all()  # monotone in the model's own score
    # No new ties (isotonic's steps): distinct scores stay distinct, beyond float noise.
    distinct = np.diff(raw[order]) > 1e-12
    assert (np.diff(served[order])[distinct] > 0).all()
    assert oof_p.min() < 1e-3 < oof_p.max()


@pytest.mark.parametrize("name", ["model", "ranking"])
def test_benchmark_script_imports_the_project(name: str) -> None:
    """The make targets run `python -m bench.<name>`: bench/serving.py once shadowed the
    serving package when the scripts ran by path (make bench-model broke)."""
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--help"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-2000:]
