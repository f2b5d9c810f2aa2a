"""One truth about the champion: when the registry's `champion` moves (another experiment,
or a person in the MLflow UI), `dvc repro` rebuilds the Bento for it, `make serve`'s check
says which version is served and warns while they differ, and the batch job scores with
the served model unless told otherwise."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stages.lib.project import file_md5

from ..conftest import bento_dir, copy_workspace, ran_stages, run, stale_stages

pytestmark = pytest.mark.integration
NAME = "fraud-detector"


@pytest.fixture(scope="module")
def workspace(
    built, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, dict, object]]:
    """A copy of the shared build whose registry also holds a second model (v2, logistic
    regression, trained by a temporary experiment) that is not the champion. Each test
    leaves the registry's champion where it found it."""
    ws, env = copy_workspace(built[0].parent, tmp_path_factory.mktemp("champion"))
    run(["dvc", "exp", "run", "--temp", "-n", "other", "-S", "train.model=logreg"], ws, env)
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    assert {int(v.version) for v in client.search_model_versions(f"name = '{NAME}'")} == {1, 2}
    yield ws, env, client


def _served(ws: Path, env: dict) -> str:
    args = [sys.executable, "-m", "stages.lib.served", "--bento", str(bento_dir(ws))]
    return run(args, ws, env).stderr


def _batch_default(ws: Path, env: dict):
    """The model the Spark job scores with when no --model is given (no Spark needed)."""
    code = "from batch.score import default_model; print(default_model())"
    return run([sys.executable, "-c", code], ws, env)


def _bento_md5(ws: Path) -> str:
    (contract,) = (bento_dir(ws) / "models").glob("fraud_model/*/contract.json")
    return json.loads(contract.read_text())["lineage"]["model_md5"]


def test_a_moved_champion_is_rebuilt_and_reported(workspace) -> None:
    ws, env, client = workspace
    versions = client.search_model_versions(f"name = '{NAME}'")
    md5 = file_md5(ws / "models/model.pkl")
    champion = next(v for v in versions if v.tags["model_md5"] == md5)
    other = next(v for v in versions if v.version != champion.version)
    # The workspace's model is the champion (whatever the experiment's evaluate decided).
    client.set_registered_model_alias(NAME, "champion", champion.version)
    lock = (ws / "dvc.lock").read_bytes()
    assert _bento_md5(ws) == champion.tags["model_md5"]
    assert f"serving {NAME} v{champion.version}" in _served(ws, env)

    # As a reviewer would in the MLflow UI: the other model becomes the champion.
    client.set_registered_model_alias(NAME, "champion", other.version)
    report = _served(ws, env)
    assert f"WARNING: the registry's champion is now {NAME} v{other.version}" in report
    assert "run `dvc repro`" in report
    # Until then the batch job scores with what the service serves, and says why.
    batch = _batch_default(ws, env)
    assert batch.stdout.strip() == f"models:/{NAME}/{champion.version}"
    assert f"the registry's champion is now v{other.version}" in batch.stderr

    result = run(["dvc", "repro"], ws, env)
    assert ran_stages(result.stdout) == ["champion", "package"]
    assert (
        json.loads((ws / "models/champion.json").read_text())["model_md5"]
        == (other.tags["model_md5"])
    )
    assert _bento_md5(ws) == other.tags["model_md5"]
    report = _served(ws, env)
    assert f"serving {NAME} v{other.version}" in report and "WARNING" not in report
    assert _batch_default(ws, env).stdout.strip() == f"models:/{NAME}/{other.version}"
    assert ran_stages(run(["dvc", "repro"], ws, env).stdout) == ["champion"]
    assert stale_stages(ws, env) == {}

    # Back to the first champion: the same bytes as before, so the same dvc.lock.
    client.set_registered_model_alias(NAME, "champion", champion.version)
    back = run(["dvc", "repro"], ws, env).stdout
    # DVC's run cache knows package's outputs for these inputs: restored, not rebuilt.
    assert ran_stages(back) == ["champion"] and "Stage 'package' is cached" in back, back
    assert (ws / "dvc.lock").read_bytes() == lock
    assert _bento_md5(ws) == md5


def test_the_champion_check_keeps_a_record_the_registry_cannot_judge(workspace, tmp_path) -> None:
    """A teammate's clone with an empty registry keeps the pulled record; with neither a
    registry answer nor a record the stage fails in one line."""
    ws, env, _ = workspace
    empty = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'empty.db'}"}
    args = [sys.executable, "-m", "stages.champion", "--split", "data/split"]
    record = ws / "models/champion.json"
    before = record.read_bytes()
    kept = run([*args, "--champion", str(record)], ws, empty)
    assert "keeping" in kept.stderr and record.read_bytes() == before
    missing = run([*args, "--champion", str(tmp_path / "none.json")], ws, empty, check=False)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert f"the registry has no '{NAME}@champion'" in missing.stderr
