"""train: choose the model (a search, or a named family), fit it, calibrate it.

`train.model: auto` searches families and hyperparameters on the train split (see
stages/lib/search.py); a family name skips the search and uses its params block. The
chosen config is then refitted on train + valid, and calibrated on out-of-fold scores
(forward-chaining folds for a time split), whose calibrated values are written for
evaluate to choose the threshold on: the test split stays untouched until evaluate.

The model is serialised once: MLflow logs it (pickle, whose bytes depend only on the
fitted model, unlike skops' time-stamped zip), and the DVC output is that same file, so
DVC and the registry hold one artifact under one md5. The logged model's pyfunc flavor
scores like the service once package has attached the contract (serving/mlflow_model.py).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from stages.lib.modeling import MODELS, calibration_name, refit_calibrated
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
from stages.lib.schema import FEATURES, TARGET

log = logging.getLogger("fraudops.train")


def choose(train: pd.DataFrame, cfg: dict, time_ordered: bool) -> tuple[list[dict], dict]:
    """The members of the model to fit, and the search summary for metrics/search.json."""
    import mlflow

    from stages.lib.search import SearchCutShort, run_search

    family = cfg["model"]
    if family != "auto":
        if family not in MODELS:
            raise SystemExit(f"train.model must be 'auto' or one of {MODELS}, got {family!r}")
        return [{"family": family, "params": dict(cfg[family])}], {"chosen": family}

    search = cfg["search"]
    defaults = {f: dict(cfg[f]) for f in search["families"]}
    start = time.perf_counter()
    try:
        result = run_search(train, search, defaults, int(cfg["seed"]), time_ordered, log_trial)
    except SearchCutShort as exc:  # one line, and the MLflow run ends FAILED
        log.error("%s", exc)
        raise SystemExit(1) from None
    mlflow.log_metric("search_seconds", time.perf_counter() - start)
    summary = {
        "chosen": result.name,
        "cv_average_precision": result.cv_average_precision,
        "trials": result.trials,
        **{f"cv_ap_{f}": v for f, v in sorted(result.best_by_family.items())},
        "config": flatten({m["family"]: m["params"] for m in result.members}),
    }
    log.info("search chose %s (CV AP %.4f)", result.name, result.cv_average_precision)
    return result.members, summary


def log_trial(record: dict[str, Any]) -> None:
    """One search trial as a nested run of the training run."""
    import mlflow

    with mlflow.start_run(run_name=f"trial-{record['trial']:03d}", nested=True):
        mlflow.log_params({"family": record["family"], **record["params"]})
        mlflow.log_metrics(
            {
                "cv_average_precision": record["cv_average_precision"],
                "seconds": record["seconds"],
                **{
                    f"fold_{i}_average_precision": v
                    for i, v in enumerate(record["fold_average_precision"])
                },
            }
        )


@dataclass
class Fitted:
    """The refitted, calibrated model and what the run records about its fit."""

    model: Any
    oof: pd.DataFrame  # calibrated out-of-fold probabilities and labels, for evaluate
    rows: int
    frauds: int
    seconds: float


def refit(
    members: list[dict],
    chosen: str,
    train: pd.DataFrame,
    valid: pd.DataFrame,
    cfg: dict,
    time_ordered: bool,
) -> Fitted:
    """The chosen members refitted on train + valid and calibrated out of fold."""
    # train then valid: for a time split, rows stay in time order for the folds.
    rows = pd.concat([train, valid], ignore_index=True)
    labels = rows[TARGET].to_numpy()
    log.info("refitting %s on %d rows (%d frauds)", chosen, len(rows), labels.sum())
    start = time.perf_counter()
    model, oof_rows, oof_probability = refit_calibrated(members, rows, cfg, time_ordered)
    seconds = time.perf_counter() - start
    log.info(
        "refit and %s calibration on %d out-of-fold rows: %.1f s",
        calibration_name(model),
        len(oof_rows),
        seconds,
    )
    oof = pd.DataFrame({"probability": oof_probability, TARGET: labels[oof_rows]})
    return Fitted(model, oof, len(rows), int(labels.sum()), seconds)


def log_fit(fitted: Fitted, summary: dict, split_dir: Path, oof_path: Path) -> None:
    """The run's lineage tags, fit metrics and out-of-fold file (champion reads it back)."""
    import mlflow

    mlflow.set_tags(
        {
            "train_data_md5": file_md5(split_dir / "train.parquet"),
            "valid_data_md5": file_md5(split_dir / "valid.parquet"),
            "model_family": summary["chosen"],
            "calibration_method": calibration_name(fitted.model),
        }
    )
    mlflow.log_metrics(
        {
            "fit_seconds": fitted.seconds,
            "fit_rows": fitted.rows,
            "fit_frauds": fitted.frauds,
            **{k: v for k, v in summary.items() if isinstance(v, int | float)},
        }
    )
    mlflow.log_artifact(str(oof_path))


def log_and_copy_model(
    model: Any, members: list[dict], example: pd.DataFrame, model_path: Path
) -> str:
    """Log the model to MLflow and make the DVC output that same file; returns its md5."""
    import mlflow
    import sklearn

    from stages.lib.scoring_model import log_scoring_model
    from stages.lib.tracking import MODEL_ARTIFACT

    # Two flavors: sklearn (the pickle, the DVC output) and a pyfunc that applies the
    # serving contract package adds later (stages/lib/scoring_model.py).
    logged = log_scoring_model(
        model,
        example,
        # Inferring requirements re-imports the model in a subprocess (slow).
        [f"scikit-learn=={sklearn.__version__}", *_extra_requirements(members)],
    )
    location = mlflow.get_logged_model(logged.model_id).artifact_location
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/{MODEL_ARTIFACT}")
    with atomic_path(model_path) as tmp:
        shutil.copyfile(local, tmp)
    md5 = file_md5(local)
    # How evaluate and package find this run and model from the DVC output alone.
    mlflow.set_tag("model_md5", md5)
    mlflow.set_logged_model_tags(logged.model_id, {"model_md5": md5})
    return md5


def main() -> None:
    paths = stage_paths(__doc__, "split", "model", "oof", "search")
    setup_logging()
    configure_environment()
    import mlflow

    from stages.lib.tracking import start_training_run

    params = stage_params("train")
    cfg = params["train"]
    time_ordered = params["split"]["strategy"] == "time"
    with stage_timer("train"), start_training_run() as run:
        train = pd.read_parquet(paths.split / "train.parquet")
        valid = pd.read_parquet(paths.split / "valid.parquet")
        mlflow.log_params(flatten(params))
        members, summary = choose(train, cfg, time_ordered)
        fitted = refit(members, summary["chosen"], train, valid, cfg, time_ordered)
        with atomic_path(paths.oof) as tmp:
            fitted.oof.to_parquet(tmp, index=False)
        write_json(paths.search, summary)
        log_fit(fitted, summary, paths.split, paths.oof)
        md5 = log_and_copy_model(fitted.model, members, valid[list(FEATURES)].head(5), paths.model)
        log.info("mlflow run %s, model md5 %s", run.info.run_id, md5)


def _extra_requirements(members: list[dict]) -> list[str]:
    if any(m["family"] == "lightgbm" for m in members):
        import lightgbm

        return [f"lightgbm=={lightgbm.__version__}"]
    return []


if __name__ == "__main__":
    main()
