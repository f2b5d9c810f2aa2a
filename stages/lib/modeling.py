"""Estimators for fraud scoring, built from params, and their probability calibration.

Everything here is plain scikit-learn, so the pickled model loads wherever scikit-learn
is installed: serving needs no code from this project to use it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.calibration import CalibratedClassifierCV
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import (
    ExtraTreesClassifier,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
)
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, SplineTransformer, StandardScaler

from stages.lib.schema import FEATURES

MODELS = ("logreg", "hgb", "random_forest", "extra_trees")
CALIBRATIONS = ("sigmoid", "isotonic")
SECONDS_PER_DAY = 86_400
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
    amount = FunctionTransformer(np.log1p, feature_names_out="one-to-one")
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
        clf = RandomForestClassifier(random_state=seed, n_jobs=-1, **hyper)
    elif model == "extra_trees":
        clf = ExtraTreesClassifier(random_state=seed, n_jobs=-1, **hyper)
    else:
        raise ValueError(f"train.model must be one of {MODELS}, got {model!r}")
    return Pipeline([("prep", _features(scale=False)), ("clf", clf)])


def calibrate(
    fitted: Pipeline, valid: pd.DataFrame, labels: pd.Series, method: str
) -> CalibratedClassifierCV:
    """Map the fitted model's scores to probabilities on held-out data.

    Class weights and boosting distort scores; calibrating on rows the model never saw
    makes `predict_proba` a real fraud probability. Sigmoid has two parameters and suits
    the few hundred frauds of a validation slice; isotonic needs more positives.
    """
    if method not in CALIBRATIONS:
        raise ValueError(f"train.calibration must be one of {CALIBRATIONS}, got {method!r}")
    calibrated = CalibratedClassifierCV(FrozenEstimator(fitted), method=method)
    calibrated.fit(valid[list(FEATURES)], labels)
    if method == "sigmoid":
        for fold in calibrated.calibrated_classifiers_:
            for sigmoid in fold.calibrators:
                sigmoid.a_, sigmoid.b_ = (
                    round_significant(sigmoid.a_),
                    round_significant(sigmoid.b_),
                )
    return calibrated


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
