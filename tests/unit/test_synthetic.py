"""The generator reproduces the real file's schema, imbalance and calibrated shape."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from stages.lib import ulb_calibration as cal
from stages.lib.family_ranking import ap_interval
from stages.lib.schema import COLUMNS
from stages.lib.synthetic import DUPLICATE_RATE, generate


@pytest.fixture(scope="module")
def full() -> pd.DataFrame:
    return generate(seed=7)


def test_schema_size_and_imbalance(full: pd.DataFrame) -> None:
    assert list(full.columns) == list(COLUMNS)
    assert len(full) == cal.ROWS == 284_807
    assert int(full["Class"].sum()) == cal.FRAUDS == 492
    assert full["Class"].dtype == np.int64
    assert full["Time"].between(0, cal.DURATION_SECONDS).all()
    assert full["Time"].is_monotonic_increasing


def test_duplicates_at_real_rate(full: pd.DataFrame) -> None:
    assert int(full.duplicated().sum()) == round(cal.ROWS * DUPLICATE_RATE) == 1081


def test_deterministic_from_seed() -> None:
    a, b = generate(n_rows=3000, seed=3), generate(n_rows=3000, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert not generate(n_rows=3000, seed=4).equals(a)


@pytest.mark.parametrize("feature", ["V1", "V4", "V10", "V12", "V14", "V17", "Amount"])
def test_legit_quantiles_match_real(full: pd.DataFrame, feature: str) -> None:
    legit = full.loc[full["Class"] == 0, feature]
    knots = cal.LEGIT_QUANTILES[feature]
    for prob, real in zip(cal.QUANTILE_PROBS[2:-2], knots[2:-2], strict=True):
        spread = knots[7] - knots[3]  # the real 5%..95% range
        # 1% and 99% get more room: the fraud-like legitimate rows live out there.
        tolerance = 0.06 if prob in (0.01, 0.99) else 0.03
        assert abs(legit.quantile(prob) - real) < tolerance * spread, (feature, prob)


@pytest.mark.parametrize("feature", ["V4", "V10", "V12", "V14", "V17"])
def test_fraud_medians_near_real(full: pd.DataFrame, feature: str) -> None:
    fraud = full.loc[full["Class"] == 1, feature]
    knots = cal.FRAUD_QUANTILES[feature]
    # Camouflaged frauds (8%) pull the median a little toward the legitimate one.
    assert abs(fraud.median() - knots[5]) < 0.2 * (knots[7] - knots[3]), feature


def test_heavy_tails_and_amounts(full: pd.DataFrame) -> None:
    legit = full[full["Class"] == 0]
    assert legit["V1"].min() < -20  # the real minimum is -56: far beyond a normal's reach
    zero_share = (legit["Amount"] == 0).mean()
    assert abs(zero_share - cal.LEGIT_ZERO_AMOUNT_SHARE) < 0.002
    assert legit["Amount"].mean() == pytest.approx(88.3, rel=0.2)
    assert (full["Amount"] == full["Amount"].round(2)).all()


def test_correlations_follow_real(full: pd.DataFrame) -> None:
    fraud = full.loc[full["Class"] == 1, ["V1", "V2", "V3"]]
    real = np.asarray(cal.FRAUD_CORRELATION)
    measured = fraud.corr(method="spearman").to_numpy()
    # Frauds are strongly correlated in the real file (V1~V3 +0.91, V1~V2 -0.82).
    assert measured[0, 2] > 0.6 and real[0, 2] > 0.6
    assert measured[0, 1] < -0.5 and real[0, 1] < -0.5


def test_hour_of_day_volume(full: pd.DataFrame) -> None:
    hours = ((full["Time"] % 86_400) // 3600).astype(int)
    share = hours.value_counts(normalize=True).sort_index().to_numpy()
    real = np.asarray(cal.TRANSACTIONS_PER_HOUR) / sum(cal.TRANSACTIONS_PER_HOUR)
    assert np.abs(share - real).max() < 0.005
    assert share[4] < share[11] / 4  # the night trough


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n_rows"):
        generate(n_rows=10)
    with pytest.raises(ValueError, match="fraud_rate"):
        generate(n_rows=1000, fraud_rate=0.0)


def test_ap_interval_is_a_bootstrap_of_the_split() -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(30), np.zeros(3000)].astype(int)
    perfect = np.r_[np.full(30, 0.9), np.full(3000, 0.1)]
    assert ap_interval(labels, perfect, rounds=200) == (1.0, 1.0)
    noisy = perfect + rng.normal(0, 0.25, len(labels))
    low, high = ap_interval(labels, noisy, rounds=200)
    assert low < average_precision_score(labels, noisy) < high < 1.0
