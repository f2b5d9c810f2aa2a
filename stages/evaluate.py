"""evaluate: test metrics, the cost-based threshold, plots, the quality gate, the registry."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import joblib
import pandas as pd

from stages.lib.evaluation import choose_threshold, plot_data, score_metrics
from stages.lib.modeling import fraud_probability
from stages.lib.project import (
    atomic_path,
    configure_environment,
    file_md5,
    flatten,
    load_params,
    setup_logging,
    stage_timer,
    write_json,
)
from stages.lib.schema import TARGET

log = logging.getLogger("fraudops.evaluate")
SPLIT_DIR = Path("data/split")
MODEL = Path("models/model.joblib")
RUN_INFO = Path("models/train_run.json")
METRICS = Path("metrics/evaluate.json")
PLOTS_DIR = Path("plots")
REGISTRY = Path("models/registry.json")


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


def write_plots(plots: dict[str, list[dict]]) -> None:
    for name, records in plots.items():
        if name == "confusion":  # one record per test row: CSV keeps it small
            with atomic_path(PLOTS_DIR / f"{name}.csv") as tmp, open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=["actual", "predicted"])
                writer.writeheader()
                writer.writerows(records)
        else:
            write_json(PLOTS_DIR / f"{name}.json", records)


def main() -> None:
    setup_logging()
    configure_environment()
    import mlflow

    from stages.lib.registry import register_and_promote
    from stages.lib.tracking import resume_run

    params = load_params()
    cfg = params["evaluate"]
    costs = {
        "cost_missed_fraud": float(cfg["cost_missed_fraud"]),
        "cost_false_alarm": float(cfg["cost_false_alarm"]),
    }
    with stage_timer("evaluate"):
        model = joblib.load(MODEL)
        run_info = json.loads(RUN_INFO.read_text())
        run_id = run_info["run_id"]
        valid = pd.read_parquet(SPLIT_DIR / "valid.parquet")
        test = pd.read_parquet(SPLIT_DIR / "test.parquet")
        valid_y, test_y = valid[TARGET].to_numpy(), test[TARGET].to_numpy()
        valid_p, test_p = fraud_probability(model, valid), fraud_probability(model, test)

        threshold, valid_cost = choose_threshold(valid_y, valid_p, **costs)
        log.info(
            "threshold %.4f minimises cost on validation (%.0f for %d rows)",
            threshold,
            valid_cost,
            len(valid),
        )
        metrics = score_metrics(
            test_y, test_p, threshold, review_budget=int(cfg["review_budget"]), **costs
        )
        metrics["validation_expected_cost"] = valid_cost
        log.info(
            "test: AP %.4f, ROC AUC %.4f, Brier %.5f, precision %.3f, recall %.3f at %.4f",
            metrics["average_precision"],
            metrics["roc_auc"],
            metrics["brier"],
            metrics["precision"],
            metrics["recall"],
            threshold,
        )

        with resume_run(run_id):
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
            plots = plot_data(test_y, test_p, threshold, valid_y, valid_p, **costs)
            write_plots(plots)
            mlflow.log_artifacts(str(PLOTS_DIR), artifact_path="plots")
            registry = register_and_promote(
                run_info["model_uri"],
                cfg["registered_model"],
                candidate_score=metrics["average_precision"],
                score_champion=lambda champion: score_metrics(
                    test_y,
                    fraud_probability(champion, test),
                    threshold,
                    review_budget=int(cfg["review_budget"]),
                    **costs,
                )["average_precision"],
                tags={"test_data_md5": file_md5(SPLIT_DIR / "test.parquet")},
            )
            mlflow.set_tags(
                {
                    "registered_version": str(registry["version"]),
                    "promoted_to_champion": str(registry["promoted_to_champion"]),
                }
            )
        write_json(METRICS, metrics)
        write_json(REGISTRY, {**registry, "run_id": run_id, "threshold": threshold, **costs})


if __name__ == "__main__":
    main()
