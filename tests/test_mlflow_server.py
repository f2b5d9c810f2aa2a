"""MLflow for a team: the whole pipeline against `mlflow server` on a real PostgreSQL.

The server is what `make mlflow-server` starts (deploy/mlflow_server.py), here on free
ports in a temporary folder; the pipeline reaches it only through MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import psycopg2
import pytest

from deploy.mlflow_server import Postgres, start_mlflow
from stages.lib.project import file_md5

from .conftest import free_port, run, small_checkout, stop

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def team_server():
    """(PostgreSQL, tracking URI, artifact folder); everything stopped and removed after."""
    if not (Path("/usr/lib/postgresql").exists() or shutil.which("pg_ctl")):
        pytest.skip("PostgreSQL server binaries not installed")
    # Not pytest's tmp_path: its folders are 0700, and PostgreSQL runs as `postgres` when
    # the tests run as root, so it must be able to reach its folder.
    base = Path(tempfile.mkdtemp(prefix="fraudops-pg-"))
    base.chmod(0o755)
    postgres = Postgres(base / "postgres", port=free_port())
    postgres.initialise()
    postgres.start()
    server = None
    try:
        postgres.ensure_database()
        artifacts = base / "artifacts"
        port = free_port()
        server = start_mlflow(postgres, str(artifacts), port, base / "mlflow.log")
        yield postgres, f"http://127.0.0.1:{port}", artifacts
    finally:
        if server is not None:
            stop(server)
        postgres.stop()
        assert not postgres.running()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def team_workspace(team_server, tmp_path_factory: pytest.TempPathFactory):
    _, uri, _ = team_server
    ws, env = small_checkout(tmp_path_factory.mktemp("team"))
    env = {**env, "MLFLOW_TRACKING_URI": uri}
    run(["dvc", "repro"], ws, env)
    return ws, env


def _rows(postgres: Postgres, query: str) -> list[tuple]:
    connection = psycopg2.connect(postgres.uri().replace("+psycopg2", ""))
    try:
        with connection.cursor() as cursor:
            cursor.execute(query)
            return cursor.fetchall()
    finally:
        connection.close()


def test_pipeline_tracks_and_registers_in_postgres(team_server, team_workspace) -> None:
    postgres, _, artifacts = team_server
    ws, _ = team_workspace
    assert not (ws.parent / "mlflow.db").exists(), "the sqlite default was used"
    registry = json.loads((ws / "models/registry.json").read_text())
    assert registry["candidate_version"] == registry["champion_version"] == 1
    # The rows are in PostgreSQL: the training run, its search trials, the aliases.
    runs = dict(_rows(postgres, "SELECT run_uuid, status FROM runs"))
    assert runs[registry["candidate_run_id"]] == "FINISHED"
    assert len(runs) >= 1 + 5  # the training run and its five trials (child runs)
    aliases = dict(_rows(postgres, "SELECT alias, version FROM registered_model_aliases"))
    assert aliases == {"candidate": 1, "champion": 1}
    # The model file went to the server's artifact store, not to the workspace.
    stored = list(artifacts.rglob("model.pkl"))
    assert [file_md5(path) for path in stored] == [file_md5(ws / "models/model.pkl")]
    assert not (ws / "mlruns").exists()


def test_champion_resolves_through_the_server(team_server, team_workspace) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    _, uri, _ = team_server
    ws, _ = team_workspace
    mlflow.set_tracking_uri(uri)
    try:
        client = MlflowClient()
        champion = client.get_model_version_by_alias("fraud-detector", "champion")
        assert champion.tags["model_md5"] == file_md5(ws / "models/model.pkl")
        assert champion.tags["bento_tag"].startswith("fraud_scoring:")
        local = Path(mlflow.artifacts.download_artifacts("models:/fraud-detector@champion"))
        assert file_md5(local / "model.pkl") == champion.tags["model_md5"]
        trials = client.search_runs(
            [client.get_run(champion.run_id).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{champion.run_id}'",
        )
        assert len(trials) >= 5
    finally:
        mlflow.set_tracking_uri(None)


def test_second_repro_against_the_server_is_a_noop(team_workspace) -> None:
    ws, env = team_workspace
    out = run(["dvc", "repro"], ws, env).stdout
    assert "Running stage" not in out
