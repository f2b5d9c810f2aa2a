"""A synthetic transactions table with the ULB credit-card schema and imbalance.

Each class is drawn from a Gaussian copula: correlated normals (the class's real
correlation of V1..V28 and Amount) pushed through each feature's real quantile function.
That keeps the heavy-tailed marginals, the strong fraud-side correlations and the overlap
between classes that make the real problem hard. Time follows the real hour-of-day volume
per class over two days, and exact duplicate rows appear at the real file's rate.

The bytes it writes are the same on every x86-64 or ARM machine, so `dvc.lock` hashes
them once for everybody. Two things would break that and are avoided on purpose: BLAS and
LAPACK (eigh, Cholesky, matmul), whose kernels sum in a CPU-dependent order, and numpy's
SIMD-dispatched transcendental functions (exp, log1p, expm1, power), which differ in the
last bit between AVX2 and AVX-512 builds. The correlation factor is computed in plain
Python floats, the matrix product as a fixed sequence of elementwise multiply-adds (each
exactly rounded), and the few transcendental values through Python's scalar `math`.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.special import ndtr

from stages.lib import ulb_calibration as cal
from stages.lib.schema import COLUMNS, TARGET

SECONDS_PER_DAY = 86_400
_KNOTS = np.asarray(cal.QUANTILE_PROBS)
# Inside the outer 0.1% the real tails run far out (V1 down to -56); a power curve (t**4)
# keeps those extremes rare instead of spreading the last 0.1% evenly up to the maximum.
DUPLICATE_RATE = 1081 / cal.ROWS  # exact duplicate rows in the real file


def cholesky_factor(matrix: tuple[tuple[float, ...], ...]) -> list[list[float]]:
    """Lower Cholesky factor of a correlation matrix, in plain Python floats.

    The rounded real correlations are not always positive definite; shrinking towards the
    identity ((1 - s) C + s I, smallest s in 1e-6 steps that factors) keeps every
    correlation within s of the real one. Python floats make this bit-identical on any CPU.
    """
    n = len(matrix)
    for step in range(1, 10_001):
        shrink = 1e-6 * (step - 1) if step > 1 else 0.0
        factor = [[0.0] * n for _ in range(n)]
        ok = True
        for i in range(n):
            for j in range(i + 1):
                target = (1.0 - shrink) * matrix[i][j] + (shrink if i == j else 0.0)
                acc = target - math.fsum(factor[i][k] * factor[j][k] for k in range(j))
                if i == j:
                    if acc <= 1e-9:
                        ok = False
                        break
                    factor[i][i] = math.sqrt(acc)
                else:
                    factor[i][j] = acc / factor[j][j]
            if not ok:
                break
        if ok:
            return factor
    raise ValueError("correlation matrix is too far from positive definite")


def correlate(z: np.ndarray, factor: list[list[float]]) -> np.ndarray:
    """z @ factor.T as elementwise multiply-adds in a fixed order (no BLAS, see above)."""
    out = np.empty_like(z)
    for i, row in enumerate(factor):
        acc = z[:, 0] * row[0]
        for k in range(1, i + 1):
            acc += z[:, k] * row[k]
        out[:, i] = acc
    return out


def _expm1(values: np.ndarray) -> np.ndarray:
    return np.fromiter(map(math.expm1, values.tolist()), dtype="float64", count=len(values))


def _quantile_function(u: np.ndarray, knots: tuple[float, ...]) -> np.ndarray:
    values = np.asarray(knots)
    out = np.interp(u, _KNOTS, values)
    low, high = u < _KNOTS[1], u > _KNOTS[-2]
    t_low = (_KNOTS[1] - u[low]) / _KNOTS[1]
    out[low] = values[1] - (values[1] - values[0]) * _tail(t_low)
    t_high = (u[high] - _KNOTS[-2]) / (1.0 - _KNOTS[-2])
    out[high] = values[-2] + (values[-1] - values[-2]) * _tail(t_high)
    return out


def _tail(t: np.ndarray) -> np.ndarray:
    """t**4 by two exact-rounded squarings (np.power is SIMD-dispatched, see above)."""
    square = t * t
    return square * square


def _draw_class(
    n: int,
    quantiles: dict[str, tuple[float, ...]],
    correlation: tuple[tuple[float, ...], ...],
    zero_amount_share: float,
    hour_counts: np.ndarray,
    rng: np.random.Generator,
) -> pd.DataFrame:
    u = ndtr(correlate(rng.standard_normal((n, len(cal.FEATURES))), cholesky_factor(correlation)))
    frame = {
        name: _quantile_function(u[:, j], quantiles[name]) for j, name in enumerate(cal.FEATURES)
    }
    # Amounts are near log-normal: interpolating their knots on a log scale keeps the
    # class means close to the real ones (linear interpolation overshoots by ~25%).
    log_knots = tuple(math.log1p(q) for q in quantiles["Amount"])
    amount_u = u[:, cal.FEATURES.index("Amount")]
    amount = np.round(_expm1(_quantile_function(amount_u, log_knots)), 2)
    amount[amount_u < zero_amount_share] = 0.0
    frame["Amount"] = amount
    hours = rng.choice(24, size=n, p=hour_counts / hour_counts.sum())
    days = rng.integers(0, 2, size=n)
    seconds = days * SECONDS_PER_DAY + hours * 3600 + rng.integers(0, 3600, size=n)
    frame["Time"] = np.minimum(seconds, cal.DURATION_SECONDS).astype("float64")
    return pd.DataFrame(frame)


def generate(
    n_rows: int = cal.ROWS,
    fraud_rate: float = cal.FRAUD_RATE,
    seed: int = 0,
    duplicate_rate: float = DUPLICATE_RATE,
    camouflaged_fraud_share: float = 0.08,
    fraud_like_legit_share: float = 0.15,
) -> pd.DataFrame:
    """Return `n_rows` transactions sorted by Time, columns as in the real file.

    A pure two-copula draw is easier than the real data (a boosted model reaches average
    precision ~0.98, against ~0.85 on the real file), because the real classes overlap
    jointly, not only feature by feature. Two knobs put that overlap back:
    `camouflaged_fraud_share` of the frauds are drawn like legitimate transactions, and
    legitimate rows drawn like frauds are added, `fraud_like_legit_share` times the
    number of frauds.

    >>> frame = generate(n_rows=5_000, seed=1)
    >>> list(frame.columns)[:2], int(frame["Class"].sum()) == round(5_000 * cal.FRAUD_RATE)
    (['Time', 'V1'], True)
    """
    if n_rows < 100:
        raise ValueError(f"n_rows must be at least 100, got {n_rows}")
    if not 0.0 < fraud_rate < 0.5:
        raise ValueError(f"fraud_rate must be in (0, 0.5), got {fraud_rate}")
    rng = np.random.default_rng(seed)
    n_duplicates = int(round(n_rows * duplicate_rate))
    n_fraud = max(1, int(round(n_rows * fraud_rate)))
    n_camouflaged = int(round(n_fraud * camouflaged_fraud_share))
    n_fraud_like = int(round(n_fraud * fraud_like_legit_share))
    n_legit = n_rows - n_duplicates - n_fraud - n_fraud_like
    legit = (cal.LEGIT_QUANTILES, cal.LEGIT_CORRELATION, cal.LEGIT_ZERO_AMOUNT_SHARE)
    fraud = (cal.FRAUD_QUANTILES, cal.FRAUD_CORRELATION, cal.FRAUD_ZERO_AMOUNT_SHARE)
    legit_hours = np.asarray(cal.TRANSACTIONS_PER_HOUR, float) - np.asarray(cal.FRAUDS_PER_HOUR)
    fraud_hours = np.asarray(cal.FRAUDS_PER_HOUR, float)
    parts = [
        _draw_class(n_legit, *legit, legit_hours, rng).assign(**{TARGET: 0}),
        _draw_class(n_fraud_like, *fraud, legit_hours, rng).assign(**{TARGET: 0}),
        _draw_class(n_fraud - n_camouflaged, *fraud, fraud_hours, rng).assign(**{TARGET: 1}),
        _draw_class(n_camouflaged, *legit, fraud_hours, rng).assign(**{TARGET: 1}),
    ]
    unique = pd.concat(parts, ignore_index=True)
    # Duplicates copy legitimate rows only, so the fraud count stays exactly as asked.
    legit_index = np.flatnonzero(unique[TARGET].to_numpy() == 0)
    copies = unique.iloc[rng.choice(legit_index, size=n_duplicates, replace=False)]
    frame = pd.concat([unique, copies], ignore_index=True)
    frame = frame.sort_values("Time", kind="stable", ignore_index=True)
    return frame[list(COLUMNS)].astype({TARGET: "int64"})


def generate_from_params(cfg: dict) -> pd.DataFrame:
    """generate() with params.yaml's `data.synthetic` block."""
    return generate(
        n_rows=int(cfg["rows"]),
        fraud_rate=float(cfg["fraud_rate"]),
        seed=int(cfg["seed"]),
        camouflaged_fraud_share=float(cfg["camouflaged_fraud_share"]),
        fraud_like_legit_share=float(cfg["fraud_like_legit_share"]),
    )
