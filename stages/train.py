"""train: fit the chosen model on the train split, calibrate it on the validation split."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import joblib
import pandas as pd

from stages.lib.modeling import build_estimator, calibrate, fraud_probability
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
from stages.lib.schema import FEATURES, TARGET

log = logging.getLogger("fraudops.train")
SPLIT_DIR = Path("data/split")
MODEL = Path("models/model.joblib")
RUN_INFO = Path("models/train_run.json")


def main() -> None:
    setup_logging()
    configure_environment()
    import mlflow
    import sklearn
    from mlflow.models import infer_signature

    from stages.lib.tracking import start_training_run, untrusted_types

    params = load_params()
    cfg = params["train"]
    with stage_timer("train"):
        train = pd.read_parquet(SPLIT_DIR / "train.parquet")
        valid = pd.read_parquet(SPLIT_DIR / "valid.parquet")
        estimator = build_estimator(cfg["model"], cfg.get(cfg["model"]), seed=int(cfg["seed"]))
        log.info("fitting %s on %d rows (%d frauds)", cfg["model"], len(train), train[TARGET].sum())
        start = time.perf_counter()
        estimator.fit(train[list(FEATURES)], train[TARGET])
        fit_seconds = time.perf_counter() - start
        model = calibrate(estimator, valid, valid[TARGET], method=cfg["calibration"])
        calibrate_seconds = time.perf_counter() - start - fit_seconds
        log.info(
            "fit %.1f s, %s calibration on %d validation rows %.1f s",
            fit_seconds,
            cfg["calibration"],
            len(valid),
            calibrate_seconds,
        )

        with start_training_run() as run:
            mlflow.log_params(flatten({k: params[k] for k in ("data", "split", "train")}))
            mlflow.set_tags(
                {
                    "train_data_md5": file_md5(SPLIT_DIR / "train.parquet"),
                    "valid_data_md5": file_md5(SPLIT_DIR / "valid.parquet"),
                    "model_family": cfg["model"],
                }
            )
            mlflow.log_metrics(
                {
                    "fit_seconds": fit_seconds,
                    "calibrate_seconds": calibrate_seconds,
                    "train_rows": len(train),
                    "train_frauds": int(train[TARGET].sum()),
                }
            )
            example = valid[list(FEATURES)].head(5)
            logged = mlflow.sklearn.log_model(
                model,
                name="model",
                input_example=example,
                # MLflow stores sklearn models with skops, which refuses types it has not
                # been told to trust; this model was fitted just above, by this stage.
                skops_trusted_types=untrusted_types(model),
                signature=infer_signature(example, fraud_probability(model, example)),
                pyfunc_predict_fn="predict_proba",
                # Inferring requirements re-imports the model in a subprocess (slow); the
                # model needs scikit-learn alone.
                pip_requirements=[f"scikit-learn=={sklearn.__version__}"],
            )
            run_id = run.info.run_id
        with atomic_path(MODEL) as tmp:
            joblib.dump(model, tmp)
        write_json(
            RUN_INFO,
            {
                "run_id": run_id,
                "model_uri": logged.model_uri,
                "model": cfg["model"],
                "fit_seconds": round(fit_seconds, 3),
            },
        )
        log.info("mlflow run %s", run_id)


if __name__ == "__main__":
    main()
