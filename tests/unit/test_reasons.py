"""Reason codes are exact for every family train can produce: the contributions plus the
base value give the model's own raw score, and the served probability is monotone in it."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from serving.reasons import Explainer, NoReasons, _scored, _transformed, as_text
from stages.lib.modeling import fraud_probability, refit_calibrated
from stages.lib.schema import FEATURES

from .contract_fixture import transactions

SMALL = {
    "lightgbm": {"n_estimators": 20, "n_jobs": 1},
    "hgb": {"max_iter": 20},
    "extra_trees": {"n_estimators": 15},
    "random_forest": {"n_estimators": 15},
    "logreg": {"C": 0.1},
}
FAMILIES = [
    ["lightgbm"], ["hgb"], ["extra_trees"], ["random_forest"], ["logreg"],
    ["extra_trees", "random_forest"],
]  # fmt: skip


@pytest.fixture(scope="module")
def rows() -> tuple[pd.DataFrame, pd.DataFrame]:
    frame = transactions(4_000, seed=5).sort_values("Time", ignore_index=True)
    return frame.iloc[:3_000], frame.iloc[3_000:]


def _explainer(families: list[str], train: pd.DataFrame, folder: Path) -> tuple[Explainer, object]:
    members = [{"family": f, "params": SMALL[f]} for f in families]
    config = {"seed": 1, "calibration": "auto", "calibration_folds": 2}
    model, _, _ = refit_calibrated(members, train, config, time_ordered=True)
    path = folder / "model.pkl"
    path.write_bytes(pickle.dumps(model))
    return Explainer(str(path), FEATURES), model


@pytest.mark.parametrize("families", FAMILIES, ids="+".join)
def test_contributions_add_up_to_the_raw_score_and_calibration_is_monotone(
    families, rows, tmp_path
) -> None:
    train, test = rows
    explainer, model = _explainer(families, train, tmp_path)
    attribution = explainer.explain(test)
    raw = explainer.raw_score(test)
    assert attribution.contributions.shape == (len(test), len(FEATURES))
    np.testing.assert_allclose(attribution.raw, raw, rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        attribution.base + attribution.contributions.sum(axis=1), raw, rtol=0, atol=1e-6
    )
    probability = fraud_probability(model, test)
    order = np.argsort(raw, kind="stable")
    assert np.all(np.diff(probability[order]) >= -1e-12)  # monotone on top of the raw score
    assert np.corrcoef(raw, probability)[0, 1] > 0  # and increasing, not constant
    expected = "probability" if set(families) <= {"extra_trees", "random_forest"} else "log-odds"
    assert attribution.unit == expected


@pytest.mark.parametrize("families", [["lightgbm"], ["logreg"]], ids="+".join)
def test_the_fast_transform_is_the_pipelines_own_bit_for_bit(families, rows, tmp_path) -> None:
    train, test = rows
    _, model = _explainer(families, train, tmp_path)
    (pipeline,), _ = _scored(model)
    prep = pipeline.named_steps["prep"]
    for part in (test.head(1), test):
        values = part[list(FEATURES)].to_numpy(dtype=np.float64)
        np.testing.assert_array_equal(_transformed(prep, values, FEATURES),
                                      prep.transform(part[list(FEATURES)]))  # fmt: skip


def test_top_reasons_are_the_largest_contributions_with_the_sent_values(rows, tmp_path) -> None:
    train, test = rows
    explainer, _ = _explainer(["lightgbm"], train, tmp_path)
    attribution = explainer.explain(test.head(5))
    top = attribution.top(3)
    for i, reasons in enumerate(top):
        sizes = [abs(r["contribution"]) for r in reasons]
        assert sizes == sorted(sizes, reverse=True)
        assert sizes[0] == pytest.approx(np.abs(attribution.contributions[i]).max())
        for reason in reasons:
            assert reason["value"] == test.iloc[i][reason["feature"]]
    # Time is one feature: the spline's basis columns are summed, not listed.
    assert "Time" in attribution.features and len(attribution.features) == len(FEATURES)


def test_a_soft_average_with_a_log_odds_member_says_why_it_has_no_reasons(rows, tmp_path) -> None:
    train, test = rows
    explainer, _ = _explainer(["hgb", "extra_trees"], train, tmp_path)
    with pytest.raises(NoReasons, match="soft average"):
        explainer.explain(test.head(2))


def test_reasons_read_as_text() -> None:
    reasons = [{"feature": "V14", "value": -9.1234, "contribution": 2.31},
               {"feature": "Amount", "value": 12.5, "contribution": -0.4}]  # fmt: skip
    assert as_text(reasons) == "V14 = -9.123 (+2.31); Amount = 12.5 (-0.4)"
