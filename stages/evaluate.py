"""evaluate: test metrics, the cost-based threshold, plots, the quality gate, the registry.

Outputs: the candidate's metrics and plots, and the champion the registry now serves
(models/champion.json, which package builds). The registry's bookkeeping (versions, run
ids) goes to MLflow and to models/registry.json, a side file outside the DVC chain.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from stages.lib.evaluation import choose_threshold, plot_data, score_metrics
from stages.lib.modeling import fraud_probability, load_model
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
CHAMPION_METRICS = ("average_precision", "roc_auc", "brier", "precision", "recall")


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


def evaluate_scores(
    oof: pd.DataFrame, test_y: np.ndarray, test_p: np.ndarray, cfg: dict
) -> tuple[float, dict]:
    """The cost-optimal threshold on the out-of-fold scores of the training rows, and the
    test metrics at it."""
    costs = _costs(cfg)
    threshold, oof_cost = choose_threshold(
        oof[TARGET].to_numpy(), oof["probability"].to_numpy(), **costs
    )
    metrics = score_metrics(
        test_y, test_p, threshold, review_budget=int(cfg["review_budget"]), **costs
    )
    metrics["out_of_fold_expected_cost"] = oof_cost
    return threshold, metrics


def run_oof(run_id: str, oof_name: str) -> pd.DataFrame:
    """A training run's out-of-fold scores (logged by train), for a champion that stays."""
    import mlflow

    return pd.read_parquet(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/{oof_name}"))


def _costs(cfg: dict) -> dict[str, float]:
    return {
        "cost_missed_fraud": float(cfg["cost_missed_fraud"]),
        "cost_false_alarm": float(cfg["cost_false_alarm"]),
    }


def champion_record(
    name: str, md5: str, run_params: dict, run_tags: dict, threshold: float, metrics: dict, cfg
) -> dict:
    """What package needs of the champion; content only (no run ids or versions)."""
    return {
        "registered_model": name,
        "model_md5": md5,
        "model_family": run_tags.get("model_family"),
        "threshold": threshold,
        "costs": _costs(cfg),
        "test_metrics": {k: metrics[k] for k in CHAMPION_METRICS},
        "lineage": {
            "train_data_md5": run_tags.get("train_data_md5"),
            "valid_data_md5": run_tags.get("valid_data_md5"),
            "params": dict(sorted(run_params.items())),
        },
    }


def main() -> None:
    paths = stage_paths(__doc__, "split", "model", "oof", "metrics", "plots", "champion")
    setup_logging()
    configure_environment()
    import mlflow

    from stages.lib.registry import register_and_promote
    from stages.lib.tracking import logged_model_for, resume_run

    cfg = stage_params("evaluate")["evaluate"]
    # Registry bookkeeping for people and tests, beside the champion; no stage reads it,
    # so it stays out of the DVC chain. DVC clears neither it nor the champion (a persist
    # output) before a run, so a failed run must not leave an old one behind.
    side_file = paths.champion.with_name("registry.json")
    side_file.unlink(missing_ok=True)
    paths.champion.unlink(missing_ok=True)
    with stage_timer("evaluate"):
        model = load_model(paths.model)
        md5 = file_md5(paths.model)
        logged = logged_model_for(md5)
        run_id = logged.source_run_id
        oof = pd.read_parquet(paths.oof)
        test = pd.read_parquet(paths.split / "test.parquet")
        test_y, test_p = test[TARGET].to_numpy(), fraud_probability(model, test)
        threshold, metrics = evaluate_scores(oof, test_y, test_p, cfg)
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
                    **_costs(cfg),
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
                    **_costs(cfg),
                )["average_precision"],
            )
            mlflow.set_tags(
                {
                    "registered_version": str(outcome.candidate_version),
                    "served_by_champion": str(outcome.champion_md5 == md5),
                }
            )

        if outcome.champion_model is None:  # the candidate is the champion
            champion_threshold, champion_metrics = threshold, metrics
        else:  # the champion stays: its own threshold and metrics on today's data
            champion_threshold, champion_metrics = evaluate_scores(
                run_oof(outcome.champion_run_id, paths.oof.name),
                test_y,
                fraud_probability(outcome.champion_model, test),
                cfg,
            )
        champion_run = mlflow.get_run(outcome.champion_run_id)
        write_json(paths.metrics, metrics)
        write_json(
            paths.champion,
            champion_record(
                cfg["registered_model"],
                outcome.champion_md5,
                champion_run.data.params,
                champion_run.data.tags,
                champion_threshold,
                champion_metrics,
                cfg,
            ),
        )
        write_json(
            side_file,
            {**outcome.summary(), "candidate_run_id": run_id, "threshold": champion_threshold},
        )


if __name__ == "__main__":
    main()
