"""evaluate: test metrics, the cost-based threshold, plots, the quality gate, the registry.

Outputs: the candidate's metrics and plots (and, with data.feedback, its metrics on the
recent labelled window prepare held out); the candidate is registered and becomes
`champion` if it beats the current one, on that window when it holds at least
evaluate.recent_min_frauds frauds, else on the test split. Which model is served is the next stage's
question (stages/champion.py), asked of the registry on every run. The registry's
bookkeeping (versions, run ids) goes to MLflow and to models/registry.json, a side file
outside the DVC chain.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from stages.lib.evaluation import evaluate_scores, plot_data, score_metrics
from stages.lib.modeling import fraud_probability, load_model
from stages.lib.params import costs
from stages.lib.project import (
    atomic_path,
    configure_environment,
    file_md5,
    flatten,
    setup_logging,
    stage_params,
    stage_paths,
    stage_timer,
    write_json,
)
from stages.lib.schema import TARGET

if TYPE_CHECKING:
    from mlflow.entities import LoggedModel

    from stages.lib.registry import RegistryOutcome

log = logging.getLogger("fraudops.evaluate")
REGISTRY_SIDE_FILE = "registry.json"  # versions and run ids: for people, not for DVC


class QualityGateError(RuntimeError):
    pass


def check_gate(metrics: dict, gate: dict) -> None:
    failures = [
        f"{name} {metrics[name]:.4f} < required {gate[f'min_{name}']}"
        for name in ("average_precision", "roc_auc")
        if metrics[name] < float(gate[f"min_{name}"])
    ]
    if failures:
        raise QualityGateError(
            "quality gate failed on the test split: "
            + "; ".join(failures)
            + ". The model is not registered or packaged."
        )


def write_plots(plots: dict[str, list[dict]], out_dir: Path) -> None:
    for name, records in plots.items():
        if name == "confusion":  # one record per test row: CSV keeps it small
            with atomic_path(out_dir / f"{name}.csv") as tmp, open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=["actual", "predicted"])
                writer.writeheader()
                writer.writerows(records)
        else:
            write_json(out_dir / f"{name}.json", records)


@dataclass
class Scored:
    """The candidate's test scores and the metrics at the threshold chosen out of fold."""

    test: pd.DataFrame
    test_y: np.ndarray
    test_p: np.ndarray
    oof_y: np.ndarray
    oof_p: np.ndarray
    threshold: float
    metrics: dict[str, Any]


def score_candidate(model: Any, oof: pd.DataFrame, test: pd.DataFrame, cfg: dict) -> Scored:
    """The threshold from the training rows' out-of-fold scores, the test metrics at it."""
    oof_y, oof_p = oof[TARGET].to_numpy(), oof["probability"].to_numpy()
    test_y, test_p = test[TARGET].to_numpy(), fraud_probability(model, test)
    threshold, metrics = evaluate_scores(oof_y, oof_p, test_y, test_p, cfg)
    log.info(
        "test: AP %.4f, ROC AUC %.4f, Brier %.5f, precision %.3f, recall %.3f at %.4f "
        "(cost-optimal on %d out-of-fold training rows)",
        metrics["average_precision"],
        metrics["roc_auc"],
        metrics["brier"],
        metrics["precision"],
        metrics["recall"],
        threshold,
        len(oof),
    )
    return Scored(test, test_y, test_p, oof_y, oof_p, threshold, metrics)


def log_and_gate(metrics: dict, cfg: dict) -> None:
    """Log the test metrics to the training run and apply the quality gate; a failed gate
    ends the stage (and the run is tagged so)."""
    import mlflow

    mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items()})
    # Tags, not params: evaluate may run again on the same training run with other
    # costs or gates, and MLflow params are write-once.
    mlflow.set_tags({f"evaluate.{k}": v for k, v in flatten(cfg).items()})
    try:
        check_gate(metrics, cfg["gate"])
    except QualityGateError as exc:
        mlflow.set_tag("quality_gate", "failed")
        log.error("%s", exc)
        raise SystemExit(1) from None
    mlflow.set_tag("quality_gate", "passed")


def score_recent(model: Any, recent: pd.DataFrame, threshold: float, cfg: dict) -> dict:
    """The candidate on the recent labelled window at its threshold (counts only while the
    window lacks a class)."""
    y = recent[TARGET].to_numpy()
    counts = {"rows": len(y), "frauds": int(y.sum())}
    if len(np.unique(y)) < 2:
        return counts
    p = fraud_probability(model, recent)
    found = score_metrics(y, p, threshold, review_budget=int(cfg["review_budget"]), **costs(cfg))
    log.info("recent labelled window: AP %.4f, precision %.3f, recall %.3f on %d rows "
             "(%d frauds)", found["average_precision"], found["precision"], found["recall"],
             len(y), counts["frauds"])  # fmt: skip
    return {**counts, **found}


@dataclass
class Basis:
    """The rows the champion rule compares on: the recent window or the test split."""

    name: str
    rows: pd.DataFrame
    candidate_ap: float

    @classmethod
    def choose(cls, scored: Scored, recent: pd.DataFrame, found: dict, cfg: dict) -> Basis:
        if found["frauds"] >= int(cfg["recent_min_frauds"]) and "average_precision" in found:
            name = f"the recent labelled window ({found['rows']} rows, {found['frauds']} frauds)"
            return cls(name, recent, found["average_precision"])
        return cls("this test data", scored.test, scored.metrics["average_precision"])


def register(
    logged: LoggedModel, md5: str, scored: Scored, basis: Basis, cfg: dict
) -> RegistryOutcome:
    """Register the candidate and promote it if it beats the champion re-scored on the
    basis's rows at the candidate's threshold; returns the registry's outcome."""
    import mlflow

    from stages.lib.registry import register_and_promote

    outcome = register_and_promote(
        logged,
        cfg["registered_model"],
        md5,
        candidate_score=basis.candidate_ap,
        score_champion=lambda champion: score_metrics(
            basis.rows[TARGET].to_numpy(),
            fraud_probability(champion, basis.rows),
            scored.threshold,
            review_budget=int(cfg["review_budget"]),
            **costs(cfg),
        )["average_precision"],
        basis=basis.name,
    )
    mlflow.set_tags(
        {
            "registered_version": str(outcome.candidate_version),
            "served_by_champion": str(outcome.champion_md5 == md5),
            "champion_rule_basis": basis.name,
        }
    )
    return outcome


def main() -> None:
    paths = stage_paths(__doc__, "split", "model", "oof", "recent", "metrics", "plots")
    setup_logging()
    configure_environment()
    import mlflow

    from stages.lib.tracking import logged_model_for, resume_run

    cfg = stage_params("evaluate")["evaluate"]
    # Registry bookkeeping for people and tests, beside the model; no stage reads it, so it
    # stays out of the DVC chain. DVC does not clear it before a run, so a failed run must
    # not leave an old one behind.
    side_file = paths.model.with_name(REGISTRY_SIDE_FILE)
    side_file.unlink(missing_ok=True)
    with stage_timer("evaluate"):
        model = load_model(paths.model)
        md5 = file_md5(paths.model)
        logged = logged_model_for(md5)
        scored = score_candidate(
            model, pd.read_parquet(paths.oof), pd.read_parquet(paths.split / "test.parquet"), cfg
        )
        recent = pd.read_parquet(paths.recent)
        found = score_recent(model, recent, scored.threshold, cfg)
        with resume_run(logged.source_run_id):
            log_and_gate(scored.metrics, cfg)
            mlflow.log_metrics({f"recent_{k}": v for k, v in found.items()})
            plots = plot_data(
                scored.test_y,
                scored.test_p,
                scored.threshold,
                scored.oof_y,
                scored.oof_p,
                **costs(cfg),
            )
            write_plots(plots, paths.plots)
            mlflow.log_artifacts(str(paths.plots), artifact_path=paths.plots.name)
            outcome = register(logged, md5, scored, Basis.choose(scored, recent, found, cfg), cfg)

        write_json(paths.metrics, {**scored.metrics, "recent": found})
        write_json(side_file, {**outcome.summary(), "candidate_run_id": logged.source_run_id})


if __name__ == "__main__":
    main()
