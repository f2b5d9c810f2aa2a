"""A real, small model and its contract, built in about a second by the same code the
package stage uses (stages.lib.contract.build_contract): what the in-process tests of the
service's ASGI pieces and file lane score with. No pipeline, no BentoML."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from serving.contract import Contract, Runtime
from stages.lib.contract import build_contract
from stages.lib.schema import FEATURES, TARGET
from stages.lib.synthetic import generate

THRESHOLD = 0.2


def transactions(rows: int = 2_000, seed: int = 3) -> pd.DataFrame:
    return generate(n_rows=rows, fraud_rate=0.05, seed=seed)


def small_model(folder: Path) -> tuple[Contract, Path]:
    """A fitted logistic regression pickled in `folder`, and its served contract (no
    compiled form: the scikit-learn runtime serves it)."""
    frame = transactions()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    model.fit(frame[list(FEATURES)], frame[TARGET])
    path = folder / "model.pkl"
    path.write_bytes(pickle.dumps(model))
    champion = {
        "threshold": THRESHOLD,
        "costs": {"cost_missed_fraud": 120.0, "cost_false_alarm": 5.0},
        "test_metrics": {"average_precision": 0.5},
        "registered_model": "fraud-detector",
        "model_md5": hashlib.md5(path.read_bytes()).hexdigest(),
        "model_family": "logreg",
        "lineage": {
            "train_data_md5": "0" * 32,
            "valid_data_md5": "1" * 32,
            "test_data_md5": "2" * 32,
            "params": {"train.model": "logreg"},
        },
    }
    scores = model.predict_proba(frame[list(FEATURES)])[:, 1]
    contract = build_contract(
        frame,
        frame,
        scores,
        champion,
        {"range_margin": 0.1, "drift_features": ["V14", "Amount"], "performance_margin": 0.15},
        Runtime(default="sklearn", reason="a unit test's model"),
    )
    return contract, path
