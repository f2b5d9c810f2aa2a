"""Beyond one machine: the pipeline against `mlflow server` on a real PostgreSQL, and the
Spark batch job scoring with that server's champion.

The server is what `make mlflow-server` starts (deploy/mlflow_server.py), here on free
ports in a temporary folder; the pipeline and the Spark job reach it only through
MLFLOW_TRACKING_URI. Spark runs in local mode (`python -m batch.score`, as typed).
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg2
import pytest
import requests

from deploy.mlflow_server import Postgres, start_mlflow
from stages.lib.project import file_md5

from ..conftest import (
    bento_dir,
    free_port,
    ran_stages,
    run,
    small_checkout,
    start_bento,
    stop,
    system_tool,
)

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
    """A small checkout built by its own `dvc repro` against the team server: what the
    module proves is that the pipeline's runs, trials, registry writes and artifacts go
    to `mlflow server` on PostgreSQL, so it cannot start from the session's shared build
    (an SQLite store and local artifacts)."""
    _, uri, _ = team_server
    ws, env = small_checkout(tmp_path_factory.mktemp("team"))
    env = {**env, "MLFLOW_TRACKING_URI": uri}
    run(["dvc", "repro"], ws, env, timeout=1800)  # a whole build
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
    """Only the champion check asks the server again; nothing downstream reruns."""
    ws, env = team_workspace
    out = run(["dvc", "repro"], ws, env).stdout
    assert ran_stages(out) == ["champion"], out


# --- Spark batch scoring from the team server's registry -------------------------------

FEATURES = ["Time", *[f"V{i}" for i in range(1, 29)], "Amount"]


def _score(ws: Path, env: dict[str, str], inputs: list[str], out: Path, *extra: str) -> dict:
    """`python -m batch.score` as a user types it; its summary file."""
    run(["python", "-m", "batch.score", *inputs, "--out", str(out), "--master", "local[2]",
         *extra], ws, env, timeout=900)  # fmt: skip
    return json.loads((out / "_summary.json").read_text())


def _service_scores(url: str, path: Path, **fields: str) -> pd.DataFrame:
    with open(path, "rb") as fh:
        response = requests.post(
            f"{url}/predict_file", timeout=120, files={"file": (path.name, fh)},
            data={"output_format": "parquet", **fields},
        )  # fmt: skip
    assert response.status_code == 200, response.text
    return pd.read_parquet(io.BytesIO(response.content))


def _by_content(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows in an order fixed by their values (Spark keeps no file order across tasks)."""
    ordered = frame[[*FEATURES, "fraud_probability"]].astype("float64")
    return ordered.sort_values([*FEATURES, "fraud_probability"], ignore_index=True)


@pytest.fixture(scope="module")
def java() -> str:
    return system_tool("java")  # Spark's JVM


@pytest.fixture(scope="module")
def served(team_workspace, tmp_path_factory):
    ws, env = team_workspace
    process, url = start_bento(bento_dir(ws), env, tmp_path_factory.mktemp("serve") / "log")
    yield url
    stop(process)


def test_spark_scores_like_the_service(java, team_workspace, served, tmp_path) -> None:
    """A multi-file Parquet set: every row scored with the server's champion, with the
    service's probabilities to 1e-9, lineage on every row."""
    ws, env = team_workspace
    rows = pd.read_parquet(ws / "data/split/test.parquet")
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    parts = [incoming / f"day-{i}.parquet" for i in range(3)]
    for part, chunk in zip(parts, np.array_split(np.arange(len(rows)), 3), strict=True):
        rows.iloc[chunk].to_parquet(part, index=False)
    summary = _score(ws, env, [str(incoming / "*.parquet")], tmp_path / "out")
    champion = json.loads((ws / "models/champion.json").read_text())
    assert summary["model"] == "models:/fraud-detector/1"
    assert summary["model_md5"] == champion["model_md5"]
    assert summary["rows"] == summary["scored"] == len(rows) and summary["rejected"] == {}
    assert sorted(summary["files"]) == ["day-0", "day-1", "day-2"]
    for part in parts:
        batch = tmp_path / "out" / "scored" / f"batch={part.stem}"
        spark = pd.read_parquet(batch)
        service = _service_scores(served, part)
        assert len(spark) == len(service)
        diff = _by_content(spark)["fraud_probability"] - _by_content(service)["fraud_probability"]
        assert diff.abs().max() <= 1e-9
        assert (spark["threshold"] == champion["threshold"]).all()
        assert set(spark["model_version"]) == {"1"}
        assert spark["source_file"].str.endswith(part.name).all()
    flagged = pd.read_parquet(tmp_path / "out" / "scored")["is_fraud"].sum()
    assert summary["flagged"] == flagged


def test_spark_scores_the_real_format_like_the_service(
    java, team_workspace, served, real_sample, tmp_path
) -> None:
    ws, env = team_workspace
    csv = tmp_path / "csv"
    csv.mkdir()
    (csv / "creditcard.csv").write_bytes(real_sample.read_bytes())
    summary = _score(ws, env, [str(csv / "creditcard.csv")], tmp_path / "out_csv")
    assert summary["rows"] == summary["scored"] == 2000
    spark = pd.read_parquet(tmp_path / "out_csv" / "scored")
    service = _service_scores(served, csv / "creditcard.csv")
    diff = _by_content(spark)["fraud_probability"] - _by_content(service)["fraud_probability"]
    assert diff.abs().max() <= 1e-9


def test_spark_gives_the_services_reason_codes(java, team_workspace, served, tmp_path) -> None:
    ws, env = team_workspace
    test = pd.read_parquet(ws / "data/split/test.parquet")
    rows = pd.concat([test[test["Class"] == 1].head(10), test.head(30)], ignore_index=True)
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "rows.parquet"
    rows.to_parquet(path, index=False)
    summary = _score(ws, env, [str(path)], tmp_path / "out", "--reasons", "2")
    assert summary["scored"] == len(rows)
    spark = pd.read_parquet(tmp_path / "out" / "scored")
    service = _service_scores(served, path, reasons="2")
    key = [*FEATURES, "fraud_probability"]
    by_spark = spark.sort_values(key, ignore_index=True)["reasons"]
    by_service = service.astype({c: "float64" for c in key}).sort_values(key, ignore_index=True)
    assert by_spark.tolist() == by_service["reasons"].tolist()
    assert by_spark.str.count(";").eq(1).all()  # two reasons each


BAD_LINES = {  # a line of the real format with one problem each, and the rule it breaks
    "numeric": lambda v: [v[0], v[1], v[2], "abc", *v[4:]],
    "missing-values": lambda v: [*v[:-2], "", v[-1]],
    "finite": lambda v: [v[0], "inf", *v[2:]],
    "range": lambda v: ["1e12", *v[1:]],
    "malformed-row": lambda v: [*v, "7"],
}


def test_spark_sets_bad_rows_aside_and_reruns_idempotently(java, team_workspace, tmp_path) -> None:
    ws, env = team_workspace
    rows = pd.read_parquet(ws / "data/split/test.parquet").head(300)
    lines = rows.astype(str).to_numpy().tolist()
    header = ",".join(f'"{c}"' for c in rows.columns)  # quoted, as in creditcard.csv
    bad = {rule: 10 + 20 * i for i, rule in enumerate(BAD_LINES)}  # rule: line index
    for rule, index in bad.items():
        lines[index] = BAD_LINES[rule](lines[index])
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "monday.csv").write_text("\n".join([header, *map(",".join, lines)]) + "\n")
    clean = [",".join(line) for i, line in enumerate(lines) if i not in bad.values()]
    (incoming / "tuesday.csv").write_text("\n".join([header, *clean]) + "\n")
    out = tmp_path / "out"

    summary = _score(ws, env, [str(incoming / "*.csv")], out)
    assert summary["rows"] == 300 + 295 and summary["scored"] == 295 * 2
    assert summary["rejected"] == dict.fromkeys(sorted(BAD_LINES), 1)
    rejects = pd.read_parquet(out / "rejects")
    assert set(rejects["batch"]) == {"monday"}
    columns = rejects["reject_column"].fillna("(whole line)")
    assert dict(zip(rejects["reject_rule"], columns, strict=True)) == {
        "numeric": "V3", "missing-values": "Amount", "finite": "V1", "range": "Time",
        "malformed-row": "(whole line)",
    }  # fmt: skip
    assert rejects["reject_reason"].str.len().min() > 10 and rejects["raw_record"].notna().all()
    assert "abc" in rejects.loc[rejects["reject_rule"] == "numeric", "raw_record"].item()

    def snapshot() -> dict[str, list]:
        files = sorted(p.relative_to(out).parent.as_posix() for p in out.rglob("*.parquet"))
        scored = pd.read_parquet(out / "scored")
        return {"partitions": files, "rows": sorted(map(tuple, _by_content(scored).to_numpy()))}

    before = snapshot()
    _score(ws, env, [str(incoming / "*.csv")], out)
    assert snapshot() == before, "a rerun over the same files changed the output"

    # monday fixed and scored alone: its partitions are replaced, tuesday's untouched.
    (incoming / "monday.csv").write_text((incoming / "tuesday.csv").read_text())
    tuesday = sorted(p.name for p in (out / "scored" / "batch=tuesday").glob("*.parquet"))
    summary = _score(ws, env, [str(incoming / "monday.csv")], out)
    assert summary["rejected"] == {} and summary["scored"] == 295
    assert not (out / "rejects" / "batch=monday").exists()
    assert sorted(p.name for p in (out / "scored" / "batch=tuesday").glob("*.parquet")) == tuesday
    assert len(pd.read_parquet(out / "scored")) == 295 * 2


def test_spark_job_refuses_a_file_missing_a_contract_column(java, team_workspace, tmp_path) -> None:
    ws, env = team_workspace
    rows = pd.read_parquet(ws / "data/split/test.parquet").head(20).drop(columns="V7")
    rows.to_parquet(tmp_path / "short.parquet", index=False)
    args = ["python", "-m", "batch.score", str(tmp_path / "short.parquet"), "--out",
            str(tmp_path / "out"), "--master", "local[1]"]  # fmt: skip
    result = run(args, ws, env, check=False)
    assert result.returncode == 2
    assert "the input lacks contract columns: V7" in result.stderr
    assert not (tmp_path / "out").exists()
