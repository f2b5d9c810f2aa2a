"""A stopped stage's MLflow runs end KILLED, nested ones included: a search trial created
in the store but not yet on mlflow's active-run stack when the signal came (so not the
run the stage named) must not stay RUNNING (seen twice in CI's kill test)."""

from __future__ import annotations

import os

from mlflow.tracking import MlflowClient

from stages.lib.lifecycle import mark_killed


def test_a_trial_the_stage_did_not_name_ends_killed_too(tmp_path, monkeypatch) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment("kill")
    training = client.create_run(experiment, run_name="training")
    tags = {"mlflow.parentRunId": training.info.run_id}
    trial = client.create_run(experiment, run_name="trial-000", tags=tags)
    done = client.create_run(experiment, run_name="trial-done", tags=tags)
    client.set_terminated(done.info.run_id, "FINISHED")
    # The stage named its training run (the trial was not on the stack); it has exited,
    # so the helper's parent is no longer the stage's pid.
    mark_killed(os.getppid() + 1_000_000, training.info.run_id)
    status = {r.info.run_name: r.info.status for r in client.search_runs([experiment])}
    assert status == {"training": "KILLED", "trial-000": "KILLED", "trial-done": "FINISHED"}
    assert client.get_run(trial.info.run_id).info.status == "KILLED"
