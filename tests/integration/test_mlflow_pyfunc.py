"""MLflow's own serving answers like the Bento: the registered version is a pyfunc that
applies the serving contract the package stage attached to it.

On the session's small built workspace (`built`, only read here): real `mlflow models
serve` (docs/scaling-out.md's command) and the real `bentoml serve` of the package stage's Bento,
both given the team's real-format sample; `mlflow.pyfunc.load_model` in-process; and a
model folder without its contract refused at load. The one test that reruns the
pipeline does it in a copy (`built_copy`).
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests

from serving.contract import Contract
from stages.lib.project import file_md5

from ..conftest import (
    BIN,
    bento_dir,
    free_port,
    run,
    start_bento,
    start_server,
    stop,
    system_tool,
)

pytestmark = pytest.mark.integration
CHAMPION = "models:/fraud-detector@champion"
SCORES = ["fraud_probability", "is_fraud", "risk_band"]


@pytest.fixture(scope="module")
def mlflow_url(built, tmp_path_factory) -> Iterator[str]:
    """`mlflow models serve` of the registry's champion, as docs/scaling-out.md types it."""
    ws, env = built
    port = free_port()
    args = [str(BIN / "mlflow"), "models", "serve", "-m", CHAMPION, "--env-manager", "local",
            "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("mlflow_serve") / "log"
    process = start_server(args, env, log, f"{url}/ping")
    yield url
    stop(process)


@pytest.fixture(scope="module")
def bento_scores(built, real_sample: Path, tmp_path_factory) -> pd.DataFrame:
    """The served Bento's answer for the real-format sample (POST /predict_file)."""
    ws, env = built
    scratch = tmp_path_factory.mktemp("bento")
    env = {**env, "BENTOML_HOME": str(scratch / "home")}  # the Bento folder is all it needs
    process, url = start_bento(bento_dir(ws), env, scratch / "bento.log")
    try:
        with open(real_sample, "rb") as fh:
            response = requests.post(
                f"{url}/predict_file", timeout=120, files={"file": (real_sample.name, fh)},
                data={"output_format": "parquet"},
            )  # fmt: skip
    finally:
        stop(process)
    assert response.status_code == 200, response.text
    return pd.read_parquet(io.BytesIO(response.content))[SCORES]


def _same_scores(answer: pd.DataFrame, bento: pd.DataFrame) -> None:
    assert list(answer.columns) == SCORES and len(answer) == len(bento)
    np.testing.assert_allclose(
        answer["fraud_probability"].to_numpy(float),
        bento["fraud_probability"].to_numpy(float),
        rtol=0,
        atol=1e-9,
    )
    assert answer["is_fraud"].tolist() == bento["is_fraud"].tolist()
    assert answer["risk_band"].tolist() == bento["risk_band"].tolist()
    assert bento["is_fraud"].any() and not bento["is_fraud"].all()  # a real comparison


def _invocations(url: str, body: bytes | str, content_type: str) -> requests.Response:
    return requests.post(
        f"{url}/invocations", data=body, headers={"Content-Type": content_type}, timeout=120
    )


def _predictions(response: requests.Response) -> pd.DataFrame:
    assert response.status_code == 200, response.text[:2000]
    return pd.DataFrame(response.json()["predictions"])


def test_serve_answers_the_real_csv_like_the_bento(
    mlflow_url: str, bento_scores: pd.DataFrame, real_sample: Path
) -> None:
    # The file as it is: quoted headers, integer Time, quoted Class (ignored).
    answer = _predictions(_invocations(mlflow_url, real_sample.read_bytes(), "text/csv"))
    _same_scores(answer, bento_scores)


def test_serve_answers_dataframe_split_like_the_bento(
    mlflow_url: str, bento_scores: pd.DataFrame, real_sample: Path
) -> None:
    frame = pd.read_csv(real_sample)
    assert frame["Time"].dtype == np.int64  # what MLflow's own signature check refused
    body = json.dumps({"dataframe_split": json.loads(frame.to_json(orient="split"))})
    answer = _predictions(_invocations(mlflow_url, body, "application/json"))
    _same_scores(answer, bento_scores)
    # The service's optional threshold override, as MLflow params.
    split = json.loads(frame.to_json(orient="split"))
    body = json.dumps({"dataframe_split": split, "params": {"threshold": 0.5}})
    answer = _predictions(_invocations(mlflow_url, body, "application/json"))
    assert answer["is_fraud"].tolist() == (bento_scores["fraud_probability"] >= 0.5).tolist()


def test_serve_refuses_a_row_out_of_range_naming_the_rule(
    mlflow_url: str, real_sample: Path
) -> None:
    frame = pd.read_csv(real_sample).head(10)
    frame.loc[3, "Amount"] = -5.0
    response = _invocations(mlflow_url, frame.to_csv(index=False), "text/csv")
    assert response.status_code == 400, response.text[:2000]
    body = response.json()
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert (body["rule"], body["column"], body["rows"]) == ("range", "Amount", [3])
    assert "[range] column 'Amount': 'Amount' is outside the model's valid" in body["message"]
    assert "Traceback" not in response.text
    # A stray word: the contract's `numeric` rule, as the service names it.
    frame = pd.read_csv(real_sample).head(10).astype({"V4": object})
    frame.loc[7, "V4"] = "twelve"  # ("n/a" would be a null, as in the service)
    body = _invocations(mlflow_url, frame.to_csv(index=False), "text/csv").json()
    assert (body["rule"], body["column"], body["rows"]) == ("numeric", "V4", [7])


def test_load_model_in_process(built, bento_scores: pd.DataFrame, real_sample: Path) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    from stages.lib.registry import resolve

    ws, env = built
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        model = mlflow.pyfunc.load_model(CHAMPION)
        _same_scores(model.predict(pd.read_csv(real_sample)), bento_scores)
        with pytest.raises(MlflowException, match=r"\[missing-columns\] column 'V3'"):
            model.predict(pd.read_csv(real_sample).drop(columns="V3"))
        # The contract the pyfunc applies is the Bento's, and the Spark job's resolve()
        # reads that same copy (checked against the version's contract tag).
        folder = Path(mlflow.artifacts.download_artifacts(CHAMPION))
        (bento_contract,) = (bento_dir(ws) / "models").glob("fraud_model/*/contract.json")
        assert (folder / "contract.json").read_bytes() == bento_contract.read_bytes()
        assert file_md5(folder / "model.pkl") == file_md5(ws / "models/model.pkl")
        resolved = resolve(CHAMPION)
        assert resolved.contract == Contract.read(bento_contract)
        assert resolved.md5 == file_md5(resolved.model_file) == file_md5(folder / "model.pkl")
    finally:
        mlflow.set_tracking_uri(None)


def test_a_model_without_its_contract_is_refused(built, tmp_path: Path) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    _, env = built
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        folder = Path(mlflow.artifacts.download_artifacts(CHAMPION, dst_path=str(tmp_path)))
    finally:
        mlflow.set_tracking_uri(None)
    contract = json.loads((folder / "contract.json").read_text())
    # A contract for another model file (say, copied from another version): refused.
    contract["lineage"]["model_md5"] = "0" * 32
    (folder / "contract.json").write_text(json.dumps(contract))
    with pytest.raises(MlflowException, match="rerun the package stage"):
        mlflow.pyfunc.load_model(str(folder))
    # No contract (a version package has not run for): refused, not served bare.
    (folder / "contract.json").unlink()
    with pytest.raises(MlflowException, match=r"Run the package stage"):
        mlflow.pyfunc.load_model(str(folder))
    shutil.rmtree(folder)


def test_spark_udf_scores_like_the_bento(
    built, bento_scores: pd.DataFrame, real_sample: Path
) -> None:
    """docs/scaling-out.md's spark_udf use: the contract columns as one struct, the three scores
    back as a struct, in Spark local mode (the batch job's own session settings)."""
    import mlflow
    from pyspark.sql import functions as F

    from batch.score import spark_session

    system_tool("java")
    _, env = built
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    spark = spark_session("local[1]", {})
    try:
        udf = mlflow.pyfunc.spark_udf(
            spark, CHAMPION, env_manager="local",
            result_type="fraud_probability double, is_fraud boolean, risk_band string",
        )  # fmt: skip
        frame = spark.read.option("header", True).option("inferSchema", True).csv(str(real_sample))
        features = [c for c in frame.columns if c != "Class"]
        scored = (
            frame.withColumn("row", F.monotonically_increasing_id())  # the file's order
            .withColumn("scores", udf(F.struct(*features)))
            .orderBy("row")
            .select("scores.*")
            .toPandas()
        )
    finally:
        spark.stop()
        mlflow.set_tracking_uri(None)
    _same_scores(scored, bento_scores)


def test_package_brings_the_pyfunc_serving_code_up_to_date(built_copy) -> None:
    """A serving change retrains the same model file, which keeps its registered version
    and so that version's logged model: package must refresh the code the pyfunc runs."""
    import mlflow
    from mlflow.tracking import MlflowClient

    ws, env = built_copy
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        before = MlflowClient().get_model_version_by_alias("fraud-detector", "champion")
        scoring = ws / "serving" / "scoring.py"
        scoring.write_text(scoring.read_text() + "\n# a serving change\n")
        run(["dvc", "repro"], ws, env)
        after = MlflowClient().get_model_version_by_alias("fraud-detector", "champion")
        assert after.version == before.version
        folder = Path(mlflow.artifacts.download_artifacts(CHAMPION))
        assert (folder / "code" / "serving" / "scoring.py").read_bytes() == scoring.read_bytes()
        model = mlflow.pyfunc.load_model(CHAMPION)  # and it still loads and scores
        assert len(model.predict(pd.read_parquet(ws / "data/split/test.parquet").head(3))) == 3
    finally:
        mlflow.set_tracking_uri(None)
