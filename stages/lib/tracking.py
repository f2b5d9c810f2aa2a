"""MLflow runs for the pipeline: one run per training, found again by the model's md5.

The DVC chain carries only content (the model file and its md5); run ids and registry
versions change every run and live here, in MLflow, so dvc.lock stays the same on every
machine that reproduces the same model.
"""

from __future__ import annotations

import os

import mlflow
from mlflow.entities import LoggedModel

from stages.lib.project import configure_environment, git_commit, project_root

EXPERIMENT = "fraudops"
MODEL_ARTIFACT = "model.pkl"  # MLflow's file name for the pickle serialisation format


def lineage_tags() -> dict[str, str]:
    """Where a run came from: the git commit and, under `dvc exp run`, the experiment."""
    tags = {"git_commit": git_commit()}
    for var, tag in (
        ("DVC_EXP_NAME", "dvc_exp_name"),
        ("DVC_EXP_BASELINE_REV", "dvc_exp_baseline_rev"),
    ):
        if os.environ.get(var):
            tags[tag] = os.environ[var]
    return tags


def use_experiment() -> None:
    """Select the pipeline's experiment, creating it with its artifacts in the user's
    project for the embedded sqlite store. MLflow's default (./mlruns of the current
    directory) would put a queued experiment's models in DVC's scratch copy, which DVC
    deletes afterwards, leaving the registry pointing at nothing."""
    configure_environment()
    if mlflow.get_experiment_by_name(EXPERIMENT) is None and mlflow.get_tracking_uri().startswith(
        "sqlite:"
    ):
        mlflow.create_experiment(
            EXPERIMENT, artifact_location=(project_root() / "mlruns").resolve().as_uri()
        )
    mlflow.set_experiment(EXPERIMENT)


def start_training_run() -> mlflow.ActiveRun:
    use_experiment()
    tags = lineage_tags()
    name = tags.get("dvc_exp_name") or f"repro-{tags['git_commit'][:12]}"
    return mlflow.start_run(run_name=name, tags=tags)


def resume_run(run_id: str) -> mlflow.ActiveRun:
    configure_environment()
    return mlflow.start_run(run_id=run_id)


def logged_model_for(model_md5: str) -> LoggedModel:
    """The newest MLflow logged model whose file has this md5 (tagged by train)."""
    configure_environment()
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    found = []
    if experiment is not None:
        found = mlflow.search_logged_models(
            experiment_ids=[experiment.experiment_id],
            filter_string=f"tags.model_md5 = '{model_md5}'",
            order_by=[{"field_name": "creation_time", "ascending": False}],
            max_results=1,
            output_format="list",
        )
    if not found:
        raise LookupError(
            f"no MLflow model in experiment '{EXPERIMENT}' of {mlflow.get_tracking_uri()} has "
            f"md5 {model_md5}: the model file came from elsewhere (a DVC remote?). "
            "Run `dvc repro --force -s train` to train and log it here."
        )
    return found[0]
