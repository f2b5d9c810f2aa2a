"""evaluate: test metrics, the cost-based threshold, plots, the quality gate, the registry.

Outputs: the candidate's metrics and plots; the candidate is registered and becomes
`champion` if it beats the current one. Which model is served is the next stage's
question (stages/champion.py), asked of the registry on every run. The registry's
bookkeeping (versions, run ids) goes to MLflow and to models/registry.json, a side file
outside the DVC chain.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

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


def main() -> None:
    paths = stage_paths(__doc__, "split", "model", "oof", "metrics", "plots")
    setup_logging()
    configure_environment()
    import mlflow

    from stages.lib.registry import register_and_promote
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
        run_id = logged.source_run_id
        oof = pd.read_parquet(paths.oof)
        test = pd.read_parquet(paths.split / "test.parquet")
        test_y, test_p = test[TARGET].to_numpy(), fraud_probability(model, test)
        threshold, metrics = evaluate_scores(
            oof[TARGET].to_numpy(), oof["probability"].to_numpy(), test_y, test_p, cfg
        )
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
            write_plots(
                plot_data(
                    test_y,
                    test_p,
                    threshold,
                    oof[TARGET].to_numpy(),
                    oof["probability"].to_numpy(),
                    **costs(cfg),
                ),
                paths.plots,
            )
            mlflow.log_artifacts(str(paths.plots), artifact_path=paths.plots.name)
            outcome = register_and_promote(
                logged,
                cfg["registered_model"],
                md5,
                candidate_score=metrics["average_precision"],
                score_champion=lambda champion: score_metrics(
                    test_y,
                    fraud_probability(champion, test),
                    threshold,
                    review_budget=int(cfg["review_budget"]),
                    **costs(cfg),
                )["average_precision"],
            )
            mlflow.set_tags(
                {
                    "registered_version": str(outcome.candidate_version),
                    "served_by_champion": str(outcome.champion_md5 == md5),
                }
            )

        write_json(paths.metrics, metrics)
        write_json(side_file, {**outcome.summary(), "candidate_run_id": run_id})


if __name__ == "__main__":
    main()
