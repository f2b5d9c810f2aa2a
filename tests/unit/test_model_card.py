"""The model card is built from the run's own figures: every section present, the test
metrics those of the model on the test split (with intervals around them), the same bytes
from the same inputs, and the Markdown showing the JSON's figures."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from serving.contract import Runtime
from stages.lib import model_card
from stages.lib.contract import build_contract
from stages.lib.modeling import fraud_probability, refit_calibrated
from stages.lib.schema import FEATURES

from .contract_fixture import transactions

SECTIONS = {"model", "intended_use", "out_of_scope", "training_data", "test_metrics",
            "calibration", "search", "compiled_runtime", "known_limits",
            "feature_importance"}  # fmt: skip


@pytest.fixture(scope="module")
def card_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("card")
    frame = transactions(4_500, seed=11).sort_values("Time", ignore_index=True)
    parts = {"train": frame.iloc[:2_500], "valid": frame.iloc[2_500:3_200],
             "test": frame.iloc[3_200:]}  # fmt: skip
    for name, part in parts.items():
        part.to_parquet(folder / f"{name}.parquet", index=False)
    members = [{"family": "lightgbm", "params": {"n_estimators": 20, "n_jobs": 1}}]
    config = {"seed": 1, "calibration": "auto", "calibration_folds": 2}
    model, _, _ = refit_calibrated(members, parts["train"], config, time_ordered=True)
    model_file = folder / "model.pkl"
    model_file.write_bytes(pickle.dumps(model))
    test = parts["test"]
    probabilities = fraud_probability(model, test)
    champion = {
        "threshold": 0.2, "costs": {"cost_missed_fraud": 120.0, "cost_false_alarm": 5.0},
        "test_metrics": {"average_precision": 0.5}, "registered_model": "fraud-detector",
        "model_md5": hashlib.md5(model_file.read_bytes()).hexdigest(), "model_family": "lightgbm",
        "lineage": {"train_data_md5": "0" * 32, "valid_data_md5": "1" * 32,
                    "test_data_md5": "2" * 32,
                    "params": {"data.source": "synthetic", "split.strategy": "time"}},
    }  # fmt: skip
    contract = build_contract(
        parts["train"], test, probabilities, champion,
        {"range_margin": 0.1, "drift_features": ["V14"], "performance_margin": 0.15},
        Runtime(default="sklearn", reason="a unit test's model"),
    )  # fmt: skip
    run = {"metrics": {"cv_average_precision": 0.7, "cv_ap_lightgbm": 0.7, "cv_ap_hgb": 0.6},
           "tags": {"calibration_method": "sigmoid"}}  # fmt: skip
    return contract, model_file, folder, probabilities, run, test


def test_the_card_has_every_section_with_this_runs_figures(card_inputs) -> None:
    contract, model_file, folder, probabilities, run, test = card_inputs
    card = model_card.build(contract, model_file, folder, probabilities, run, 50)
    assert set(card) == SECTIONS
    ap = card["test_metrics"]["average_precision"]
    assert ap["value"] == average_precision_score(test["Class"], probabilities)
    assert ap["ci95"][0] <= ap["value"] <= ap["ci95"][1] and ap["ci95"][0] < ap["ci95"][1]
    assert set(card["test_metrics"]) == {"average_precision", "roc_auc", "recall_at_1pct_fpr",
                                         "precision_at_50", "cost"}  # fmt: skip
    flagged = probabilities >= contract.threshold
    y = test["Class"].to_numpy()
    expected_cost = 5.0 * np.sum(flagged & (y == 0)) + 120.0 * np.sum(~flagged & (y == 1))
    assert card["test_metrics"]["cost"]["value"] == expected_cost
    assert card["training_data"]["splits"]["test"] == {
        "rows": len(test), "frauds": int(y.sum()),
        "time_from_hours": test["Time"].min() / 3600, "time_to_hours": test["Time"].max() / 3600,
    }  # fmt: skip
    assert sum(b["rows"] for b in card["calibration"]) == len(test)
    assert card["search"]["families"] == {"hgb": 0.6, "lightgbm": 0.7}
    importance = card["feature_importance"]
    assert importance["available"] and len(importance["features"]) == len(FEATURES)
    sizes = [f["mean_abs_contribution"] for f in importance["features"]]
    assert sizes == sorted(sizes, reverse=True)


def test_the_card_is_the_same_bytes_from_the_same_inputs(card_inputs) -> None:
    contract, model_file, folder, probabilities, run, _ = card_inputs
    first = model_card.to_json(model_card.build(contract, model_file, folder, probabilities,
                                                run, 50))  # fmt: skip
    again = model_card.to_json(model_card.build(contract, model_file, folder, probabilities,
                                                run, 50))  # fmt: skip
    assert first == again


def test_the_markdown_shows_the_jsons_figures(card_inputs, tmp_path: Path) -> None:
    contract, model_file, folder, probabilities, run, _ = card_inputs
    card = model_card.build(contract, model_file, folder, probabilities, run, 50)
    text = model_card.to_markdown(card)
    for header in ("Intended use", "Out of scope", "Training data", "Test metrics",
                   "Calibration", "Search", "Compiled runtime", "Known limits",
                   "Feature importance"):  # fmt: skip
        assert f"## {header}" in text, header
    ap = card["test_metrics"]["average_precision"]
    assert f"| average_precision | {ap['value']:.4g} | {ap['ci95'][0]:.4g} - " in text
    assert "anonymised PCA" in text and "protected attributes" in text
