"""Reason codes: each row's top-k features by exact additive contribution to the raw score.

The served probability is a monotone calibration (Platt) on top of a raw score, so the
features that push the raw score up are the ones that push the probability up. The raw
score and its exact attributions, by family:
- LightGBM: the margin (log-odds); LightGBM's own `pred_contrib` (TreeSHAP).
- scikit-learn's HistGradientBoosting: the margin (log-odds); shap's TreeExplainer.
- RandomForest, ExtraTrees: the trees' averaged probability; shap's TreeExplainer (its
  values are in probability units for these: the calibration takes the logit after).
- logistic regression: the decision function (log-odds); coefficient x standardised value.
- a soft average of families: the average of the members' probabilities, so the average
  of the members' contributions when each is in probability units (forests). A member in
  log-odds has no exact additive split of its probability: such averages give no reasons.

The hour-of-day spline's basis columns are summed back into one feature, `Time`, and
log(Amount) is reported as `Amount`: contributions are per input feature, with the value
the client sent. Pickle runs code on load: only the model file the seal checked is read.
"""

from __future__ import annotations

import pickle
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from serving.errors import RequestError

MAX_REASONS = 10
# The fitted preprocessing parts are given arrays (see _transformed), so scikit-learn says
# they were fitted with feature names; the columns are in the fitted order, by name.
warnings.filterwarnings("ignore", message="X does not have valid feature names",
                        category=UserWarning)  # fmt: skip


def check_request(k: object, rows: int, max_rows: int) -> int:
    """The number of reasons asked for (0: none), or the 4xx that refuses the request."""
    if k is None:
        return 0
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_REASONS:
        raise RequestError(400, "reasons", f"reasons must be an integer from 0 to {MAX_REASONS}",
                           column="reasons")  # fmt: skip
    if k and rows > max_rows:
        raise RequestError(413, "max-reason-rows", f"{rows} rows ask for reasons; the limit is "
                           f"{max_rows} (FRAUD_MAX_REASON_ROWS)", column="reasons")  # fmt: skip
    return k


def reasons_for(
    explainer: Explainer, k: int, rows: pd.DataFrame
) -> tuple[list[list[dict[str, Any]]], str]:
    """Each row's top-k reasons and their unit, or the 422 that says why this model has
    none."""
    try:
        attribution = explainer.explain(rows)
        return attribution.top(k), attribution.unit
    except NoReasons as exc:
        raise RequestError(422, "reasons-unavailable", str(exc), column="reasons") from None


class NoReasons(Exception):
    """The model's family has no exact additive attribution here (the message says why)."""


@dataclass(frozen=True)
class Attribution:
    """Per row: the values sent and one contribution per input feature (both in `features`
    order), the base value, the raw score they add up to, and its unit."""

    features: tuple[str, ...]
    values: np.ndarray
    base: np.ndarray
    contributions: np.ndarray
    raw: np.ndarray
    unit: str

    def top(self, k: int) -> list[list[dict[str, Any]]]:
        """Each row's k largest contributions (by size, sign kept) with the sent value."""
        order = np.argsort(-np.abs(self.contributions), axis=1, kind="stable")[:, :k]
        sent = self.values
        return [
            [{"feature": self.features[j], "value": float(sent[i, j]),
              "contribution": float(self.contributions[i, j])} for j in row]
            for i, row in enumerate(order)
        ]  # fmt: skip


def as_text(reasons: list[dict[str, Any]]) -> str:
    """`V14 = -9.1 (+2.3); V4 = 3.2 (+1.1)`: what an analyst reads."""
    return "; ".join(
        f"{r['feature']} = {r['value']:.4g} ({r['contribution']:+.3g})" for r in reasons
    )


def _source_columns(prep: Any) -> list[str]:
    """For each column the preprocessing outputs, the input feature it came from."""
    columns = prep.steps[0][1] if hasattr(prep, "steps") else prep  # logreg: then a scaler
    source: list[str] = [""] * sum(s.stop - s.start for s in columns.output_indices_.values())
    for name, _, inputs in columns.transformers_:
        part = columns.output_indices_[name]
        width = part.stop - part.start
        for offset in range(width):
            source[part.start + offset] = inputs[0] if len(inputs) == 1 else inputs[offset]
    return source


def _grouped(contributions: np.ndarray, source: list[str], features: tuple[str, ...]) -> np.ndarray:
    index = {name: i for i, name in enumerate(features)}
    grouped = np.zeros((contributions.shape[0], len(features)))
    np.add.at(grouped.T, [index[s] for s in source], contributions.T)
    return grouped


def _pipeline_parts(pipeline: Any) -> tuple[Any, Any]:
    return pipeline.named_steps["prep"], pipeline.named_steps["clf"]


def _tree_contributions(clf: Any, x: np.ndarray, cache: dict) -> tuple[np.ndarray, np.ndarray, str]:
    """(contributions, base per row, unit) of one fitted tree model on transformed x;
    `cache` keeps shap's explainer of each model (building one takes ~40 ms)."""
    name = type(clf).__name__
    if name == "LGBMClassifier":
        out = clf.booster_.predict(x, pred_contrib=True)
        return out[:, :-1], out[:, -1], "log-odds"
    if id(clf) not in cache:
        import shap  # only for scikit-learn's trees; imported when first asked

        cache[id(clf)] = shap.TreeExplainer(clf)
    explainer = cache[id(clf)]
    values = np.asarray(explainer.shap_values(x, check_additivity=False))
    base = np.atleast_1d(np.asarray(explainer.expected_value, dtype=np.float64))
    if values.ndim == 3:  # forests: one set per class; the fraud class
        return values[:, :, 1], np.full(len(x), base[1]), "probability"
    return values, np.full(len(x), base[0]), "log-odds"


def _transformed(prep: Any, values: np.ndarray, features: tuple[str, ...]) -> np.ndarray:
    """prep.transform of the rows `values` (columns in `features` order), bit for bit, by
    the fitted column transformer's own parts on arrays: ColumnTransformer's and pandas'
    bookkeeping cost ~10 ms on one row, the parts well under 1 ms."""
    columns = prep.steps[0][1] if hasattr(prep, "steps") else prep
    position = {name: i for i, name in enumerate(features)}
    parts = []
    for name, transformer, inputs in columns.transformers_:
        if name == "remainder":
            continue
        part = values[:, [position[c] for c in inputs]]
        if transformer != "passthrough":
            part = np.asarray(transformer.transform(part), dtype=np.float64)
        parts.append(part)
    x = np.hstack(parts)
    return prep.steps[1][1].transform(x) if hasattr(prep, "steps") else x


def _member(
    pipeline: Any, values: np.ndarray, features: tuple[str, ...], cache: dict
) -> tuple[np.ndarray, np.ndarray, str, list[str]]:
    prep, clf = _pipeline_parts(pipeline)
    x = _transformed(prep, values, features)
    if type(clf).__name__ == "LogisticRegression":
        contributions = x * clf.coef_[0]
        return contributions, np.full(len(x), clf.intercept_[0]), "log-odds", _source_columns(prep)
    contributions, base, unit = _tree_contributions(clf, np.asarray(x, dtype=np.float64), cache)
    return contributions, base, unit, _source_columns(prep)


def _scored(model: Any) -> tuple[list[Any], str]:
    """The pipelines whose raw score is calibrated, and what that raw score is."""
    if type(model).__name__ == "CalibratedClassifierCV":  # Platt or isotonic on the margin
        return [model.calibrated_classifiers_[0].estimator.estimator], "decision_function"
    if type(model).__name__ != "StackingClassifier":
        raise NoReasons(f"a {type(model).__name__} is not a model the train stage builds")
    inner = model.estimators_[0].estimator  # StackingClassifier: Platt on logit(probability)
    if type(inner).__name__ == "VotingClassifier":
        return list(inner.estimators_), "average_probability"
    return [inner], "probability"


class Explainer:
    """Exact reason codes for the stored model (read from its file when first asked)."""

    def __init__(self, model_path: str, features: tuple[str, ...]) -> None:
        self.model_path, self.features = model_path, tuple(features)
        self._model: Any = None
        self._trees: dict[int, Any] = {}  # shap's explainer of each member (by the model's id)
        self._lock = threading.Lock()

    def _loaded(self) -> Any:
        with self._lock:
            if self._model is None:
                with open(self.model_path, "rb") as fh:
                    self._model = pickle.load(fh)
        return self._model

    def explain(self, rows: pd.DataFrame) -> Attribution:
        members, kind = _scored(self._loaded())
        values = rows[list(self.features)].to_numpy(dtype=np.float64)
        parts = [_member(m, values, self.features, self._trees) for m in members]
        units = {unit for _, _, unit, _ in parts}
        if kind == "average_probability" and units != {"probability"}:
            raise NoReasons("the model is a soft average with a member scored in log-odds, "
                            "whose probability has no exact additive split")  # fmt: skip
        grouped = [_grouped(c, source, self.features) for c, _, _, source in parts]
        contributions = np.mean(grouped, axis=0)
        base = np.mean([b for _, b, _, _ in parts], axis=0)
        raw = base + contributions.sum(axis=1)
        return Attribution(self.features, values, base, contributions, raw, parts[0][2])

    def raw_score(self, rows: pd.DataFrame) -> np.ndarray:
        """The score the calibration is fitted on, by the model itself (for the tests)."""
        members, kind = _scored(self._loaded())
        rows = rows[list(self.features)]
        if kind == "decision_function":
            return np.asarray(members[0].decision_function(rows), dtype=np.float64)
        return np.mean([m.predict_proba(rows)[:, 1] for m in members], axis=0)
