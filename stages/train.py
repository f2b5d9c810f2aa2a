"""train: fit the chosen model on the train split, calibrate it on the validation split.

The model is serialised once: MLflow logs it (pickle, whose bytes depend only on the
fitted model, unlike skops' time-stamped zip), and the DVC output is that same file, so
DVC and the registry hold one artifact under one md5.
"""

from __future__ import annotations

import logging
import shutil
import time

import pandas as pd

from stages.lib.modeling import build_estimator, calibrate, fraud_probability
from stages.lib.project import (
    atomic_path,
    configure_environment,
    file_md5,
    flatten,
    setup_logging,
    stage_params,
    stage_paths,
    stage_timer,
)
from stages.lib.schema import FEATURES, TARGET

log = logging.getLogger("fraudops.train")


def main() -> None:
    paths = stage_paths(__doc__, "split", "model")
    setup_logging()
    configure_environment()
    import mlflow
    import sklearn
    from mlflow.models import infer_signature

    from stages.lib.tracking import MODEL_ARTIFACT, start_training_run

    params = stage_params("train")
    cfg = params["train"]
    with stage_timer("train"):
        train = pd.read_parquet(paths.split / "train.parquet")
        valid = pd.read_parquet(paths.split / "valid.parquet")
        estimator = build_estimator(cfg["model"], cfg[cfg["model"]], seed=int(cfg["seed"]))
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
            mlflow.log_params(flatten(params))
            mlflow.set_tags(
                {
                    "train_data_md5": file_md5(paths.split / "train.parquet"),
                    "valid_data_md5": file_md5(paths.split / "valid.parquet"),
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
                serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_PICKLE,
                signature=infer_signature(example, fraud_probability(model, example)),
                pyfunc_predict_fn="predict_proba",
                # Inferring requirements re-imports the model in a subprocess (slow); the
                # model needs scikit-learn alone.
                pip_requirements=[f"scikit-learn=={sklearn.__version__}"],
            )
            location = mlflow.get_logged_model(logged.model_id).artifact_location
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/{MODEL_ARTIFACT}")
            with atomic_path(paths.model) as tmp:
                shutil.copyfile(local, tmp)
            md5 = file_md5(local)
            # How evaluate and package find this run and model from the DVC output alone.
            mlflow.set_tag("model_md5", md5)
            mlflow.set_logged_model_tags(logged.model_id, {"model_md5": md5})
        log.info("mlflow run %s, model md5 %s", run.info.run_id, md5)


if __name__ == "__main__":
    main()
