"""Estimators for fraud scoring, built from params, and their probability calibration.

Everything here is plain scikit-learn (and LightGBM's scikit-learn estimator), so the
pickled model loads wherever those are installed: serving needs no code from this project.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import log1p, logit
from sklearn.calibration import CalibratedClassifierCV, _SigmoidCalibration
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import (
    ExtraTreesClassifier,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
    StackingClassifier,
    VotingClassifier,
)
from sklearn.frozen import FrozenEstimator
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, TimeSeriesSplit
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, SplineTransformer, StandardScaler

from stages.lib.schema import FEATURES

MODELS = ("logreg", "hgb", "random_forest", "extra_trees", "lightgbm")
# Forests sum their trees' probabilities across threads in whatever order the threads
# finish, so with n_jobs > 1 predict_proba differs in the last bits from run to run (seen:
# two scores merging in one run, not the next), and so would the out-of-fold file and
# dvc.lock. One thread keeps them reproducible, at twice the fit time on two cores.
FOREST_JOBS = 1
CALIBRATIONS = ("auto", "sigmoid", "isotonic")  # auto: Platt on log-odds (see cross_fitted)
SECONDS_PER_DAY = 86_400
# log(1 + Amount) by scipy's scalar code, not numpy's np.log1p: on CPUs with AVX512_SKX
# numpy computes float64 log1p with Intel's SVML, whose last bits differ from the scalar
# libm path on other CPUs. The tree thresholds are midpoints of these values, so np.log1p
# made the model file (and every hash after it) depend on the CPU that trained it.
LOG_AMOUNT = log1p
PCA_FEATURES = [f for f in FEATURES if f.startswith("V")]


def _features(scale: bool) -> ColumnTransformer:
    """Time becomes a periodic hour-of-day encoding (knots span one day, so the spline
    repeats daily); Amount is log-scaled; the PCA features pass through."""
    hour = SplineTransformer(
        n_knots=7,
        degree=3,
        extrapolation="periodic",
        knots=np.linspace(0, SECONDS_PER_DAY, 7).reshape(-1, 1),
    )
    amount = FunctionTransformer(LOG_AMOUNT, feature_names_out="one-to-one")
    transformers = [
        ("hour", hour, ["Time"]),
        ("log_amount", amount, ["Amount"]),
        ("pca", "passthrough", PCA_FEATURES),
    ]
    features = ColumnTransformer(transformers, verbose_feature_names_out=False)
    if scale:
        return Pipeline([("features", features), ("scale", StandardScaler())])
    return features


def build_estimator(model: str, hyper: dict[str, Any], seed: int) -> Pipeline:
    """An unfitted pipeline from the model name and its params block."""
    hyper = dict(hyper or {})
    if model == "logreg":
        clf = LogisticRegression(max_iter=2000, random_state=seed, **hyper)
        return Pipeline([("prep", _features(scale=True)), ("clf", clf)])
    if model == "hgb":
        clf = HistGradientBoostingClassifier(random_state=seed, **hyper)
    elif model == "random_forest":
        clf = RandomForestClassifier(random_state=seed, n_jobs=FOREST_JOBS, **hyper)
    elif model == "extra_trees":
        clf = ExtraTreesClassifier(random_state=seed, n_jobs=FOREST_JOBS, **hyper)
    elif model == "lightgbm":
        from lightgbm import LGBMClassifier

        # deterministic + column-wise histograms: the same trees for the same data and
        # thread count (n_jobs comes from params so every machine uses the same count).
        clf = LGBMClassifier(
            random_state=seed, deterministic=True, force_col_wise=True, verbose=-1, **hyper
        )
    else:
        raise ValueError(f"train.model must be one of {MODELS}, got {model!r}")
    return Pipeline([("prep", _features(scale=False)), ("clf", clf)])


def build_model(members: list[dict[str, Any]], seed: int) -> Any:
    """One family's pipeline, or the soft-voting average of several (the search may pick
    the average of its top two)."""
    if len(members) == 1:
        return build_estimator(members[0]["family"], members[0]["params"], seed)
    return VotingClassifier(
        [(m["family"], build_estimator(m["family"], m["params"], seed)) for m in members],
        voting="soft",
    )


def folds(n_splits: int, time_ordered: bool, seed: int) -> TimeSeriesSplit | StratifiedKFold:
    """Forward-chaining folds for time-ordered rows (each fold trains on the past only),
    stratified shuffled folds otherwise."""
    if time_ordered:
        return TimeSeriesSplit(n_splits=n_splits)
    return StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)


def raw_scores(model: Any, frame: pd.DataFrame) -> np.ndarray:
    """What CalibratedClassifierCV calibrates: decision_function if the model has one,
    else the positive class's predict_proba."""
    features = frame[list(FEATURES)]
    if hasattr(model, "decision_function"):
        return np.asarray(model.decision_function(features), dtype="float64")
    return model.predict_proba(features)[:, 1]


def fold_scores(
    make: Callable[[], Any], frame: pd.DataFrame, labels: np.ndarray, splitter: Any
) -> Iterator[tuple[np.ndarray, Any, np.ndarray]]:
    """(held-out row positions, the model fitted without them, its scores on them)."""
    features = frame[list(FEATURES)]
    for fit_rows, held_out in splitter.split(features, labels):
        model = make().fit(features.iloc[fit_rows], labels[fit_rows])
        yield held_out, model, model.predict_proba(features.iloc[held_out])[:, 1]


def cross_fitted(
    make: Callable[[], Any],
    frame: pd.DataFrame,
    labels: np.ndarray,
    method: str,
    splitter: Any,
) -> tuple[Any, np.ndarray, np.ndarray]:
    """Refit on every row; calibrate on out-of-fold scores instead of a held-out slice.

    Each fold's model scores rows it never saw (with forward-chaining folds, rows later
    than all it learned from); the calibrator is fitted on those out-of-fold scores, and
    the model refitted on all rows. The result is a plain scikit-learn object whose
    calibrator is the out-of-fold one. Returns it, the out-of-fold row positions and
    their calibrated probabilities (for choosing the threshold without touching test).

    `auto` is Platt scaling on log-odds: on the decision_function where the model has
    one (HGB, logreg, LightGBM: its raw margin), else on logit(predict_proba) (forests,
    averages).
    Platt on a probability in [0, 1] instead puts a floor under every probability
    (measured: three quarters of the rows at 0.00034 for a LightGBM + HGB average);
    isotonic fixes that but ties scores into steps, which cost test AP (0.813 -> 0.798
    there, 0.89 -> 0.79 for ExtraTrees on the real first day). Log-odds Platt is strictly
    monotone: the served ranking is the one the search scored.
    """
    if method not in CALIBRATIONS:
        raise ValueError(f"train.calibration must be one of {CALIBRATIONS}, got {method!r}")
    on_probability = method == "auto" and not hasattr(make(), "decision_function")
    if method == "auto":
        method = "sigmoid"
    oof_rows, oof_scores = _out_of_fold_scores(make, frame, labels, splitter, on_probability)
    features = frame[list(FEATURES)]
    final = make().fit(features, labels)
    y = labels[oof_rows]
    # The object is built by scikit-learn itself on a small slice (both classes present),
    # then given the calibrator fitted on out-of-fold scores: what sklearn makes, fitted
    # the honest way.
    slice_rows = np.r_[oof_rows[y == 1], oof_rows[y == 0][:1000]]
    slice_x, slice_y = features.iloc[slice_rows], labels[slice_rows]
    if on_probability:
        model, calibrated = _platt_on_probability(final, slice_x, slice_y, oof_scores, y)
    else:
        model, calibrated = _calibrated_classifier(final, method, slice_x, slice_y, oof_scores, y)
    return model, oof_rows, calibrated


def _out_of_fold_scores(
    make: Callable[[], Any],
    frame: pd.DataFrame,
    labels: np.ndarray,
    splitter: Any,
    on_probability: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """The held-out row positions of every fold, and the scores the calibrator is fitted
    on: predict_proba for log-odds Platt (which takes its logit), else raw_scores."""
    features = frame[list(FEATURES)]
    positions, scores = [], []
    for fit_rows, held_out in splitter.split(features, labels):
        model = make().fit(features.iloc[fit_rows], labels[fit_rows])
        positions.append(held_out)
        scores.append(
            model.predict_proba(features.iloc[held_out])[:, 1]
            if on_probability
            else raw_scores(model, frame.iloc[held_out])
        )
    return np.concatenate(positions), np.concatenate(scores)


def _platt_on_probability(
    final: Any,
    slice_x: pd.DataFrame,
    slice_y: np.ndarray,
    oof_scores: np.ndarray,
    y: np.ndarray,
) -> tuple[StackingClassifier, np.ndarray]:
    """`final` under Platt on logit(predict_proba), fitted on the out-of-fold
    probabilities: a StackingClassifier, since CalibratedClassifierCV calibrates the
    probability itself and cannot take its logit first. Returns it and the calibrated
    out-of-fold probabilities."""
    platt = logit_platt().fit(oof_scores.reshape(-1, 1), y)
    head = platt.named_steps["platt"]
    head.coef_ = np.vectorize(round_significant)(head.coef_)
    head.intercept_ = np.vectorize(round_significant)(head.intercept_)
    model = StackingClassifier(
        [("model", FrozenEstimator(final))],
        final_estimator=logit_platt(),
        stack_method="predict_proba",
        cv=2,
    )
    model.fit(slice_x, slice_y)
    model.final_estimator_ = platt
    return model, platt.predict_proba(oof_scores.reshape(-1, 1))[:, 1]


def _calibrated_classifier(
    final: Any,
    method: str,
    slice_x: pd.DataFrame,
    slice_y: np.ndarray,
    oof_scores: np.ndarray,
    y: np.ndarray,
) -> tuple[CalibratedClassifierCV, np.ndarray]:
    """`final` in a CalibratedClassifierCV (`method`: sigmoid or isotonic) whose calibrator
    is fitted on the out-of-fold raw scores. Returns it and the calibrated out-of-fold
    probabilities."""
    if method == "sigmoid":
        calibrator = _SigmoidCalibration().fit(oof_scores, y)
        calibrator.a_ = round_significant(calibrator.a_)
        calibrator.b_ = round_significant(calibrator.b_)
    else:
        calibrator = IsotonicRegression(out_of_bounds="clip").fit(oof_scores, y)
    model = CalibratedClassifierCV(FrozenEstimator(final), method=method)
    model.fit(slice_x, slice_y)
    model.calibrated_classifiers_[0].calibrators[0] = calibrator
    return model, calibrator.predict(oof_scores)


def refit_calibrated(
    members: list[dict[str, Any]], rows: pd.DataFrame, train_cfg: dict, time_ordered: bool
) -> tuple[Any, np.ndarray, np.ndarray]:
    """The pipeline's final fit: `members` refitted on `rows` (train + valid), calibrated
    on out-of-fold scores as `train.calibration` and `train.calibration_folds` say."""
    seed = int(train_cfg["seed"])
    return cross_fitted(
        lambda: build_model(members, seed),
        rows,
        rows["Class"].to_numpy(),
        train_cfg["calibration"],
        folds(int(train_cfg["calibration_folds"]), time_ordered, seed),
    )


# Probabilities of exactly 0 or 1 (tree ensembles give them) have infinite log-odds.
LOGIT_CLIP = 1e-9


def logit_platt() -> Pipeline:
    """Platt scaling on log-odds of a probability, from library functions only."""
    return Pipeline(
        [
            (
                "clip",
                FunctionTransformer(
                    np.clip, kw_args={"a_min": LOGIT_CLIP, "a_max": 1 - LOGIT_CLIP}
                ),
            ),
            ("logit", FunctionTransformer(logit)),
            ("platt", LogisticRegression(C=1e6)),
        ]
    )


def calibration_name(model: Any) -> str:
    """What calibrates a model built by cross_fitted, for logs and MLflow."""
    if isinstance(model, StackingClassifier):
        return "sigmoid on logit(predict_proba)"
    return str(model.method)


def round_significant(value: float, digits: int = 10) -> float:
    """The sigmoid's two parameters come from L-BFGS through BLAS, whose kernels differ by
    CPU in the last bits (measured: 4e-15 relative with another OPENBLAS_CORETYPE). Ten
    significant digits change no probability that matters and give the same model file,
    hence the same dvc.lock, on every machine."""
    return float(f"{float(value):.{digits}g}")


def fraud_probability(model: Any, frame: pd.DataFrame) -> np.ndarray:
    return model.predict_proba(frame[list(FEATURES)])[:, 1]


def load_model(path: str | Path) -> Any:
    """A model file written by train (MLflow's pickle format). Pickle runs code on load:
    only load files this pipeline wrote or the project's own registry holds."""
    with open(path, "rb") as fh:
        return pickle.load(fh)
