"""The real `dvc repro` end to end in a copy of the project, on a small synthetic config.

Real DVC, MLflow (sqlite store) and BentoML (a private BENTOML_HOME); nothing mocked. The
session's shared build (`built`) is what the first `dvc repro` made; every test that runs
DVC again or edits the checkout does so in its own copy of it (`built_copy`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import yaml

from serving.contract import Contract
from stages.lib.modeling import load_model
from stages.lib.project import file_md5

from ..conftest import (
    bento_dir,
    copy_workspace,
    ran_stages,
    run,
    set_params,
    sqlite_mentions,
    stale_stages,
    start_bento,
    stop,
)

pytestmark = pytest.mark.integration


def test_repro_builds_every_output(built, tmp_path: Path) -> None:
    ws, env = built
    for out in (
        "data/prepared/transactions.parquet",
        "data/split/train.parquet",
        "models/model.pkl",
        "models/oof.parquet",
        "metrics/search.json",
        "models/champion.json",
        "models/bento/bento.yaml",
        "plots/pr_curve.json",
        "plots/confusion.csv",
        "metrics/evaluate.json",
    ):
        assert (ws / out).is_file(), out
    metrics = json.loads((ws / "metrics/evaluate.json").read_text())
    assert 0.3 < metrics["average_precision"] < 1.0 and metrics["roc_auc"] > 0.85
    registry = json.loads((ws / "models/registry.json").read_text())
    assert registry["candidate_version"] == registry["champion_version"] == 1
    assert registry["promoted"]
    champion = json.loads((ws / "models/champion.json").read_text())
    assert champion["model_md5"] == file_md5(ws / "models/model.pkl")
    assert champion["threshold"] == metrics["threshold"]
    contract = next((bento_dir(ws) / "models").glob("fraud_model/*/contract.json"))
    text = contract.read_text()
    contract = Contract.read(contract)
    assert contract.feature_names[:2] == ["Time", "V1"]
    assert contract.threshold == champion["threshold"]
    assert contract.lineage.model_md5 == champion["model_md5"]
    # Content only: nothing in the Bento changes from one run to the next.
    assert registry["candidate_run_id"] not in text and "git_commit" not in text
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"prepare", "split", "train", "evaluate", "champion", "package"}

    show = run(["dvc", "metrics", "show", "--json"], ws, env).stdout
    assert "average_precision" in show
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots_html")], ws, env)
    assert (tmp_path / "plots_html" / "index.html").is_file()


def test_one_serialised_model(built) -> None:
    """The DVC output, the registry's champion and the Bento's model are one file."""
    ws, env = built
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    md5 = file_md5(ws / "models/model.pkl")
    champion = MlflowClient().get_model_version_by_alias("fraud-detector", "champion")
    assert champion.tags["model_md5"] == md5
    registry_file = Path(mlflow.artifacts.download_artifacts("models:/fraud-detector@champion"))
    assert file_md5(registry_file / "model.pkl") == md5
    (bento_model,) = (bento_dir(ws) / "models").glob("fraud_model/*/model.pkl")
    assert file_md5(bento_model) == md5
    assert not list(ws.glob("models/*.joblib"))


def test_mlflow_run_and_registry(built) -> None:
    ws, env = built
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    registry = json.loads((ws / "models/registry.json").read_text())
    run_ = client.get_run(registry["candidate_run_id"])
    assert run_.data.params["train.model"] == "auto"
    search = json.loads((ws / "metrics/search.json").read_text())
    assert run_.data.tags["model_family"] == search["chosen"]
    assert set(search) >= {"chosen", "cv_average_precision", "trials", "cv_ap_hgb", "config"}
    # Every search trial is a child run of the training run.
    trials = client.search_runs(
        [run_.info.experiment_id], f"tags.mlflow.parentRunId = '{run_.info.run_id}'"
    )
    assert len(trials) == search["trials"] == 5
    assert {t.data.params["family"] for t in trials} >= {"hgb", "lightgbm", "extra_trees"}
    assert run_.data.metrics["test_average_precision"] == pytest.approx(
        json.loads((ws / "metrics/evaluate.json").read_text())["average_precision"]
    )
    assert run_.data.tags["quality_gate"] == "passed" and "train_data_md5" in run_.data.tags
    champion = client.get_model_version_by_alias("fraud-detector", "champion")
    assert champion.run_id == registry["candidate_run_id"]
    assert champion.tags["bento_tag"].startswith("fraud_scoring:")
    loaded = mlflow.sklearn.load_model("models:/fraud-detector@champion")
    test = pd.read_parquet(ws / "data/split/test.parquet").drop(columns="Class").head(20)
    local = load_model(ws / "models/model.pkl")
    np.testing.assert_allclose(loaded.predict_proba(test), local.predict_proba(test))


def test_second_repro_is_noop(built_copy) -> None:
    """Only the registry question is asked again; its answer is the same, so nothing
    downstream runs and dvc.lock is not touched."""
    ws, env = built_copy
    lock = (ws / "dvc.lock").read_bytes()
    result = run(["dvc", "repro"], ws, env)
    assert ran_stages(result.stdout) == ["champion"]
    assert "is still v1" in result.stderr + result.stdout
    assert "Stage 'package' didn't change, skipping" in result.stdout
    assert (ws / "dvc.lock").read_bytes() == lock
    assert stale_stages(ws, env) == {}


def test_param_change_reruns_only_downstream(built_copy) -> None:
    ws, env = built_copy
    set_params(ws, evaluate__cost_false_alarm=7)
    result = run(["dvc", "repro"], ws, env)
    assert ran_stages(result.stdout) == ["evaluate", "champion", "package"]
    registry = json.loads((ws / "models/registry.json").read_text())
    # The same model file: registered once, and already the champion.
    assert registry["candidate_version"] == registry["champion_version"] == 1
    assert registry["promoted"] is False
    assert stale_stages(ws, env) == {}


def test_schema_change_reruns_train(built_copy) -> None:
    """A changed module a stage imports (here the feature list) reruns that stage."""
    ws, env = built_copy
    schema = ws / "stages/lib/schema.py"
    before = schema.read_text()
    try:
        schema.write_text(before + "\n# a change\n")
        status = run(["dvc", "status"], ws, env).stdout
        assert "train:" in status and "evaluate:" in status and "package:" in status
    finally:
        schema.write_text(before)
    assert stale_stages(ws, env) == {}


def test_bento_loads_and_scores(built, tmp_path: Path) -> None:
    """Serve the exported Bento folder from an empty BentoML home, for real."""
    ws, env = built
    env = {**env, "BENTOML_HOME": str(tmp_path / "fresh_home")}
    process, url = start_bento(bento_dir(ws), env, tmp_path / "serve.log")
    try:
        rows = pd.read_parquet(ws / "data/split/test.parquet").head(50)
        response = requests.post(
            f"{url}/predict", timeout=30, json={"transactions": rows.to_dict(orient="records")}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        served = [p["fraud_probability"] for p in body["predictions"]]
        model = load_model(ws / "models/model.pkl")
        expected = model.predict_proba(rows.drop(columns="Class"))[:, 1]
        np.testing.assert_allclose(served, expected, rtol=1e-12)
        champion = json.loads((ws / "models/champion.json").read_text())
        assert body["lineage"]["model_md5"] == champion["model_md5"]
        assert body["threshold"] == champion["threshold"]
    finally:
        stop(process)


def test_gate_failure_stops_before_registry(built_copy) -> None:
    ws, env = built_copy
    champion = (ws / "models/champion.json").read_bytes()
    set_params(ws, evaluate__gate__min_roc_auc=0.9999)
    result = run(["dvc", "repro"], ws, env, check=False)
    assert result.returncode != 0
    assert "quality gate failed on the test split: roc_auc" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert not (ws / "models/registry.json").exists()
    # The registry's champion did not move: its record stays, and nothing after the
    # failed stage ran.
    assert (ws / "models/champion.json").read_bytes() == champion
    assert not {"champion", "package"} & set(ran_stages(result.stdout))


def test_a_copy_of_the_build_names_only_itself(built, tmp_path: Path) -> None:
    """copy_workspace: no row of the copy's MLflow store and no file of the copy names
    the original's folder, the copy's registry hands out its own files, and its DVC
    outputs are up to date there."""
    import mlflow

    original = built[0].parent
    ws, env = copy_workspace(original, tmp_path / "copy")
    assert sqlite_mentions(ws.parent / "mlflow.db", str(original)) == []
    assert sqlite_mentions(ws.parent / "mlflow.db", str(ws.parent))  # it had paths to move
    needle = str(original).encode()
    assert [p for p in ws.parent.rglob("*") if p.is_file() and needle in p.read_bytes()] == []
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        folder = Path(mlflow.artifacts.download_artifacts("models:/fraud-detector@champion"))
        assert folder.resolve().is_relative_to(ws / "mlruns"), folder  # not the original's
        assert file_md5(folder / "model.pkl") == file_md5(ws / "models/model.pkl")
    finally:
        mlflow.set_tracking_uri(None)
    assert stale_stages(ws, env) == {}
