"""The champion's model card: what the model is, on what data, how good, with what limits.

Built by the package stage from this run's own inputs (the split files, the champion
model, its contract and its MLflow training run), never from hand-written numbers; written
as model_card.json and model_card.md beside the model in the Bento (served at /model-card)
and attached to the registered version in MLflow. Deterministic: the same inputs give the
same bytes (bootstrap with a fixed seed, no timestamps), so dvc.lock stays in step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

from serving.contract import SCORE_EDGES, Contract
from serving.reasons import Explainer, NoReasons
from stages.lib.evaluation import precision_at_k, recall_at_fpr
from stages.lib.schema import FEATURES

SPLITS = ("train", "valid", "test")
BOOTSTRAP_ROUNDS = 500
BOOTSTRAP_SEED = 7
IMPORTANCE_ROWS = 300  # test rows (every fraud first) whose reasons give global importance
INTENDED_USE = (
    "Ranking card transactions by calibrated fraud probability, so that an analyst team "
    "reviews the riskiest first and a cost-based threshold flags them; decisions are "
    "recorded and outcomes come back as labels (the service's decision log)."
)
OUT_OF_SCOPE = [
    "Declining a transaction or judging a cardholder without human review: reasons are "
    "for the analyst, not for the cardholder.",
    "Data of another schema, currency, market or time period than the training data "
    "without retraining and re-checking the threshold.",
    "Credit, insurance or other eligibility decisions.",
]
LIMITS = [
    "The features V1-V28 are anonymised PCA components: a reason names a component, not "
    "a business attribute.",
    "No protected attributes are present, so fairness across groups cannot be audited "
    "with this data.",
    "Labels are the dataset's; production labels arrive late and incomplete (label "
    "coverage and delay are on /metrics).",
]


def _interval(values: list[float]) -> list[float]:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def bootstrap_metrics(y: np.ndarray, p: np.ndarray, threshold: float, costs: Any,
                      review_budget: int) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Point estimates on the test split with 95% bootstrap intervals (resampled rows)."""

    def measure(yy: np.ndarray, pp: np.ndarray) -> dict[str, float]:
        flagged = pp >= threshold
        cost = (np.sum(flagged & (yy == 0)) * costs.cost_false_alarm
                + np.sum(~flagged & (yy == 1)) * costs.cost_missed_fraud)  # fmt: skip
        return {"average_precision": float(average_precision_score(yy, pp)),
                "roc_auc": float(roc_auc_score(yy, pp)),
                "recall_at_1pct_fpr": recall_at_fpr(yy, pp, 0.01),
                f"precision_at_{review_budget}": precision_at_k(yy, pp, review_budget),
                "cost": float(cost)}  # fmt: skip

    point = measure(y, p)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    rounds: dict[str, list[float]] = {name: [] for name in point}
    for _ in range(BOOTSTRAP_ROUNDS):
        rows = rng.integers(0, len(y), len(y))
        if 0 < y[rows].sum() < len(rows):
            for name, value in measure(y[rows], p[rows]).items():
                rounds[name].append(value)
    return {name: {"value": value, "ci95": _interval(rounds[name])}
            for name, value in point.items()}  # fmt: skip


def reliability(y: np.ndarray, p: np.ndarray) -> list[dict[str, float]]:
    """Per score bin (the service's log-spaced bins): rows, mean probability, fraud rate."""
    bins = np.clip(np.searchsorted(SCORE_EDGES, p, side="right") - 1, 0, len(SCORE_EDGES) - 2)
    curve = []
    for b in range(len(SCORE_EDGES) - 1):
        mask = bins == b
        if mask.any():
            curve.append({"from": SCORE_EDGES[b], "to": SCORE_EDGES[b + 1],
                          "rows": int(mask.sum()), "mean_probability": float(p[mask].mean()),
                          "fraud_rate": float(y[mask].mean())})  # fmt: skip
    return curve


def importance(model_file: Path, test: pd.DataFrame) -> dict[str, Any]:
    """Mean |contribution| per feature over test rows, from the same exact attributions
    the service's reason codes use."""
    rows = pd.concat([test[test["Class"] == 1], test[test["Class"] == 0]]).head(IMPORTANCE_ROWS)
    try:
        attribution = Explainer(str(model_file), FEATURES).explain(rows)
    except NoReasons as exc:
        return {"available": False, "why": str(exc)}
    mean = np.abs(attribution.contributions).mean(axis=0)
    order = np.argsort(-mean, kind="stable")
    return {"available": True, "unit": attribution.unit, "rows": len(rows),
            "features": [{"feature": FEATURES[i], "mean_abs_contribution": float(mean[i])}
                         for i in order]}  # fmt: skip


def _split_summary(frame: pd.DataFrame) -> dict[str, Any]:
    return {"rows": len(frame), "frauds": int(frame["Class"].sum()),
            "time_from_hours": float(frame["Time"].min() / 3600),
            "time_to_hours": float(frame["Time"].max() / 3600)}  # fmt: skip


def build(contract: Contract, model_file: Path, split: Path, probabilities: np.ndarray,
          training_run: dict[str, Any], review_budget: int) -> dict[str, Any]:  # fmt: skip
    """The card as JSON-ready data. `probabilities` are the champion's on the test split;
    `training_run` holds its MLflow run's metrics and tags."""
    parts = {
        name: pd.read_parquet(split / f"{name}.parquet") for name in ("train", "valid", "test")
    }
    test = parts["test"]
    y = test["Class"].to_numpy()
    lineage, metrics, tags = contract.lineage, training_run["metrics"], training_run["tags"]
    span = max(p["Time"].max() for p in parts.values()) - min(
        p["Time"].min() for p in parts.values()
    )
    return {
        "model": {"registered_model": lineage.registered_model, "model_md5": lineage.model_md5,
                  "family": lineage.model_family, "calibration": tags.get("calibration_method"),
                  "threshold": contract.threshold, "costs": contract.costs.model_dump()},
        "intended_use": INTENDED_USE,
        "out_of_scope": OUT_OF_SCOPE,
        "training_data": {
            "source": lineage.params.get("data.source"),
            "split_strategy": lineage.params.get("split.strategy"),
            "days": float(span / 86_400),
            "splits": {name: _split_summary(frame) for name, frame in parts.items()},
            "md5": {"train": lineage.train_data_md5, "valid": lineage.valid_data_md5,
                    "test": lineage.test_data_md5},
        },
        "test_metrics": bootstrap_metrics(y, probabilities, contract.threshold, contract.costs,
                                          review_budget),
        "calibration": reliability(y, probabilities),
        "search": {"chosen": lineage.model_family,
                   "cv_average_precision": metrics.get("cv_average_precision"),
                   "families": {k.removeprefix("cv_ap_"): v for k, v in sorted(metrics.items())
                                if k.startswith("cv_ap_")}},
        "compiled_runtime": contract.runtime.model_dump(mode="json"),
        "known_limits": [*LIMITS, f"The data spans {span / 86_400:.1f} days: weekly and "
                         "seasonal patterns are not in it."],
        "feature_importance": importance(model_file, test),
    }  # fmt: skip


def to_json(card: dict[str, Any]) -> bytes:
    return (json.dumps(card, indent=2, sort_keys=True) + "\n").encode()


def _metric_rows(metrics: dict[str, dict[str, Any]]) -> list[str]:
    return [f"| {name} | {m['value']:.4g} | {m['ci95'][0]:.4g} - {m['ci95'][1]:.4g} |"
            for name, m in metrics.items()]  # fmt: skip


def to_markdown(card: dict[str, Any]) -> str:
    """The card for a reader: the same figures as the JSON, as text and tables."""
    model, data = card["model"], card["training_data"]
    lines = [f"# Model card: {model['registered_model']} ({model['family']})", "",
             f"Model md5 `{model['model_md5']}`; calibration: {model['calibration']}; "
             f"threshold {model['threshold']:.6g}, set by cost (missed fraud EUR "
             f"{model['costs']['cost_missed_fraud']:g}, false alarm EUR "
             f"{model['costs']['cost_false_alarm']:g}).", "",
             "## Intended use", "", card["intended_use"], "", "## Out of scope", "",
             *[f"- {item}" for item in card["out_of_scope"]], "",
             "## Training data", "",
             f"Source `{data['source']}`, split `{data['split_strategy']}`, "
             f"{data['days']:.1f} days of transactions.", "",
             "| split | rows | frauds | from hour | to hour | md5 |",
             "|---|---:|---:|---:|---:|---|",
             *[f"| {name} | {s['rows']:,} | {s['frauds']:,} | {s['time_from_hours']:.1f} | "
               f"{s['time_to_hours']:.1f} | `{data['md5'][name]}` |"
               for name, s in data["splits"].items()], "",
             "## Test metrics (95% bootstrap intervals)", "",
             "| metric | value | 95% interval |", "|---|---:|---|",
             *_metric_rows(card["test_metrics"]), "",
             "## Calibration (reliability on the test split)", "",
             "| probability bin | rows | mean probability | fraud rate |", "|---|---:|---:|---:|",
             *[f"| {c['from']:g} - {c['to']:g} | {c['rows']:,} | {c['mean_probability']:.4g} | "
               f"{c['fraud_rate']:.4g} |" for c in card["calibration"]], "",
             "## Search", "", _search_text(card["search"]), "",
             "| family | best CV AP |", "|---|---:|",
             *[f"| {f} | {ap:.4f} |" for f, ap in card["search"]["families"].items()], "",
             "## Compiled runtime", "", _runtime_text(card["compiled_runtime"]), "",
             "## Known limits", "", *[f"- {item}" for item in card["known_limits"]], "",
             "## Feature importance", "",
             *_importance_lines(card["feature_importance"])]  # fmt: skip
    return "\n".join(lines) + "\n"


def _runtime_text(runtime: dict[str, Any]) -> str:
    onnx = runtime.get("onnx")
    if not onnx:
        return f"Served by scikit-learn: {runtime.get('reason')}."
    return (f"Served as ONNX (`{onnx['file']}`, md5 `{onnx['md5']}`), verified on "
            f"{onnx['rows_checked']:,} rows: max difference {onnx['max_abs_difference']:.3g}, "
            f"{onnx['flipped_decisions']} flipped decisions.")  # fmt: skip


def _importance_lines(found: dict[str, Any]) -> list[str]:
    if not found["available"]:
        return [f"Not available: {found['why']}."]
    return [f"Mean |contribution| ({found['unit']}) over {found['rows']} test rows, "
            "frauds first, from the reason codes' exact attributions:", "",
            "| feature | mean abs contribution |", "|---|---:|",
            *[f"| {f['feature']} | {f['mean_abs_contribution']:.4g} |"
              for f in found["features"][:15]]]  # fmt: skip


def _search_text(search: dict[str, Any]) -> str:
    best = search["cv_average_precision"]
    return f"Chosen: {search['chosen']}" + (f" (CV AP {best:.4f})." if best is not None else ".")
