"""The real `dvc repro` end to end in a copy of the project, on a small synthetic config.

Real DVC, MLflow (sqlite store) and BentoML (a private BENTOML_HOME); nothing mocked.
"""

from __future__ import annotations

import json
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
import requests
import yaml

from .conftest import build_workspace, run, set_params, start_bento, stop

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    return build_workspace(tmp_path_factory.mktemp("pipeline"))


def _ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def test_repro_builds_every_output(workspace) -> None:
    ws, env = workspace
    for out in (
        "data/prepared/transactions.parquet",
        "data/split/train.parquet",
        "models/model.joblib",
        "models/fraud_scoring.bento",
        "models/contract.json",
        "plots/pr_curve.json",
        "plots/confusion.csv",
        "metrics/evaluate.json",
    ):
        assert (ws / out).is_file(), out
    metrics = json.loads((ws / "metrics/evaluate.json").read_text())
    assert 0.3 < metrics["average_precision"] < 1.0 and metrics["roc_auc"] > 0.85
    registry = json.loads((ws / "models/registry.json").read_text())
    assert registry["version"] == 1 and registry["promoted_to_champion"]
    contract = json.loads((ws / "models/contract.json").read_text())
    assert [f["name"] for f in contract["features"]][:2] == ["Time", "V1"]
    assert contract["threshold"] == registry["threshold"] == metrics["threshold"]
    assert contract["lineage"]["mlflow_run_id"] == registry["run_id"]
    assert len(contract["lineage"]["git_commit"]) >= 40
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"prepare", "split", "train", "evaluate", "package"}

    show = run(["dvc", "metrics", "show", "--json"], ws, env).stdout
    assert "average_precision" in show
    run(["dvc", "plots", "show", "-o", str(ws.parent / "plots_html")], ws, env)
    assert (ws.parent / "plots_html" / "index.html").is_file()


def test_mlflow_run_and_registry(workspace) -> None:
    ws, env = workspace
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    registry = json.loads((ws / "models/registry.json").read_text())
    run = client.get_run(registry["run_id"])
    assert run.data.params["train.model"] == "hgb"
    assert run.data.metrics["test_average_precision"] == pytest.approx(
        json.loads((ws / "metrics/evaluate.json").read_text())["average_precision"]
    )
    assert run.data.tags["quality_gate"] == "passed" and "train_data_md5" in run.data.tags
    champion = client.get_model_version_by_alias("fraud-detector", "champion")
    assert champion.run_id == registry["run_id"]
    loaded = mlflow.sklearn.load_model("models:/fraud-detector@champion")
    test = pd.read_parquet(ws / "data/split/test.parquet").drop(columns="Class").head(20)
    local = joblib.load(ws / "models/model.joblib")
    np.testing.assert_allclose(loaded.predict_proba(test), local.predict_proba(test))


def test_second_repro_is_noop(workspace) -> None:
    ws, env = workspace
    result = run(["dvc", "repro"], ws, env)
    assert _ran(result.stdout) == []
    assert "Data and pipelines are up to date" in result.stdout


def test_param_change_reruns_only_downstream(workspace) -> None:
    ws, env = workspace
    set_params(ws, evaluate__cost_false_alarm=7)
    result = run(["dvc", "repro"], ws, env)
    assert _ran(result.stdout) == ["evaluate", "package"]
    registry = json.loads((ws / "models/registry.json").read_text())
    # Same model, same test data: the candidate does not beat the champion, so no move.
    assert registry["version"] == 2 and registry["previous_champion_version"] == 1
    assert registry["promoted_to_champion"] is False
    assert run(["dvc", "status"], ws, env).stdout.strip().endswith("up to date.")


def test_bento_loads_and_scores(workspace, tmp_path: Path) -> None:
    """Import the exported archive into an empty BentoML home and serve it for real."""
    ws, env = workspace
    env = {**env, "BENTOML_HOME": str(tmp_path / "fresh_home")}
    tag = json.loads((ws / "models/bento.json").read_text())["bento"]
    run(["bentoml", "import", str(ws / "models/fraud_scoring.bento")], ws, env)
    process, url = start_bento(tag, env, tmp_path / "serve.log")
    try:
        rows = pd.read_parquet(ws / "data/split/test.parquet").head(50)
        response = requests.post(
            f"{url}/predict", timeout=30, json={"transactions": rows.to_dict(orient="records")}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        served = [p["fraud_probability"] for p in body["predictions"]]
        model = joblib.load(ws / "models/model.joblib")
        expected = model.predict_proba(rows.drop(columns="Class"))[:, 1]
        np.testing.assert_allclose(served, expected, rtol=1e-12)
        registry = json.loads((ws / "models/registry.json").read_text())
        assert body["model_version"] == registry["version"]
        assert body["threshold"] == registry["threshold"]
    finally:
        stop(process)


def test_gate_failure_stops_before_registry(workspace) -> None:
    ws, env = workspace
    before = (ws / "params.yaml").read_text()
    try:
        set_params(ws, evaluate__gate__min_roc_auc=0.9999)
        result = run(["dvc", "repro"], ws, env, check=False)
        assert result.returncode != 0
        assert "quality gate failed on the test split: roc_auc" in result.stderr + result.stdout
        assert "Traceback" not in result.stderr
        assert not (ws / "models/registry.json").exists()
        assert "package" not in _ran(result.stdout)
    finally:
        (ws / "params.yaml").write_text(before)


def test_experiment_sweep_logs_to_mlflow(workspace) -> None:
    ws, env = workspace
    run(["dvc", "repro"], ws, env)  # back in step after the gate test
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "step"], ws, env)
    run(["dvc", "exp", "run", "-n", "lr-sweep", "-S", "train.model=logreg"], ws, env)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], ws, env).stdout)
    names = {
        exp.get("name")
        for entry in shown
        for exp in (entry.get("experiments") or [])
        for exp in [exp.get("revs", [{}])[0]]
        if exp
    }
    assert "lr-sweep" in names, shown
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(
        experiment_names=["fraudops"], filter_string="tags.dvc_exp_name = 'lr-sweep'"
    )
    assert len(runs) == 1 and runs.iloc[0]["params.train.model"] == "logreg"
