"""MLflow runs for the pipeline: one run per training, resumed by evaluate and package."""

from __future__ import annotations

import os
from typing import Any

import mlflow

from stages.lib.project import configure_environment, git_commit

EXPERIMENT = "fraudops"


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


def start_training_run() -> mlflow.ActiveRun:
    configure_environment()
    mlflow.set_experiment(EXPERIMENT)
    tags = lineage_tags()
    name = tags.get("dvc_exp_name") or f"repro-{tags['git_commit'][:12]}"
    return mlflow.start_run(run_name=name, tags=tags)


def resume_run(run_id: str) -> mlflow.ActiveRun:
    configure_environment()
    return mlflow.start_run(run_id=run_id)


def untrusted_types(model: Any) -> list[str]:
    """Types in `model` that skops (MLflow's sklearn format) would refuse to load."""
    import skops.io

    return skops.io.get_untrusted_types(data=skops.io.dumps(model))
