"""Reason codes through `bentoml serve` of the session's Bento: JSON and files (in the worker
and in the file lane) give each row the top-k reasons the stored model's exact attribution
gives in-process; bad or over-large asks get a 4xx and record no decision. The model card
served at /model-card is the Bento's and the registered version's in MLflow."""

from __future__ import annotations

import io
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests

from serving.reasons import Explainer, as_text
from stages.lib.schema import FEATURES

from ..conftest import bento_dir, start_bento, stop

pytestmark = pytest.mark.integration
MAX_REASON_ROWS = 600


@pytest.fixture(scope="module")
def served(built, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """(url, the server's data directory)."""
    ws, env = built
    home = tmp_path_factory.mktemp("reasons_home")
    env = {**env, "BENTOML_HOME": str(home), "FRAUD_MAX_REASON_ROWS": str(MAX_REASON_ROWS),
           "FRAUD_LANE_MIN_BYTES": "20000"}  # fmt: skip
    process, url = start_bento(bento_dir(ws), env, home / "serve.log")
    yield url, home / "fraud_data"
    stop(process)


@pytest.fixture(scope="module")
def rows(built) -> pd.DataFrame:
    test = pd.read_parquet(built[0] / "data/split/test.parquet")
    frauds = test[test["Class"] == 1].head(20)
    return pd.concat([frauds, test.head(480)]).drop(columns="Class").reset_index(drop=True)


@pytest.fixture(scope="module")
def explainer(built) -> Explainer:
    (model,) = bento_dir(built[0]).glob("models/fraud_model/*/model.pkl")
    return Explainer(str(model), FEATURES)


def _decisions(data: Path) -> int:
    with sqlite3.connect(data / "decisions.db") as connection:
        return connection.execute("SELECT count(*) FROM decisions").fetchone()[0]


def test_json_rows_get_the_stored_models_exact_reasons(served, rows, explainer) -> None:
    url, _ = served
    part = rows.head(25)
    ask = {"transactions": part.to_dict(orient="records"), "reasons": 3}
    answer = requests.post(f"{url}/predict", timeout=60, json=ask)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    expected = explainer.explain(part)
    assert body["reasons_unit"] == expected.unit
    assert [p["reasons"] for p in body["predictions"]] == expected.top(3)
    first = body["predictions"][0]["reasons"]  # a fraud: its top reason pushes the score up
    assert len(first) == 3 and first[0]["contribution"] > 0
    plain = requests.post(f"{url}/predict", timeout=60,
                          json={"transactions": part.to_dict(orient="records")}).json()  # fmt: skip
    assert "reasons" not in plain["predictions"][0] and "reasons_unit" not in plain
    none = requests.post(f"{url}/predict", timeout=60, json={**ask, "reasons": 0})
    assert none.status_code == 200 and "reasons" not in none.json()["predictions"][0]
    scores = [p["fraud_probability"] for p in plain["predictions"]]
    assert scores == [p["fraud_probability"] for p in body["predictions"]]


@pytest.mark.parametrize("size", ["small", "lane"])
def test_files_get_a_reasons_column(served, rows, explainer, size) -> None:
    url, _ = served
    # The lane takes files over 20 kB. Few rows: the test build's champion may be a forest,
    # whose exact reasons cost ~55 ms a row.
    part = rows.head(8) if size == "small" else rows.head(50)
    upload = part.to_csv(index=False).encode()
    assert (len(upload) > 20_000) == (size == "lane")
    for output in ("csv", "parquet"):
        answer = requests.post(f"{url}/predict_file", timeout=120,
                               data={"reasons": "2", "output_format": output},
                               files={"file": ("rows.csv", upload)})  # fmt: skip
        assert answer.status_code == 200, answer.text
        reader = pd.read_csv if output == "csv" else pd.read_parquet
        scored = reader(io.BytesIO(answer.content))
        expected = [as_text(r) for r in explainer.explain(part).top(2)]
        assert scored["reasons"].tolist() == expected


@pytest.mark.parametrize("k", [11, -1, "3", True, 2.5])
def test_a_bad_reasons_value_is_a_400(served, rows, k) -> None:
    url, _ = served
    answer = requests.post(f"{url}/predict", timeout=30,
                           json={"transactions": rows.head(2).to_dict(orient="records"),
                                 "reasons": k})  # fmt: skip
    assert answer.status_code == 400, answer.text
    assert "reasons" in answer.text


def test_too_many_rows_for_reasons_is_a_413_and_records_nothing(served, rows) -> None:
    url, data = served
    many = pd.concat([rows, rows.head(MAX_REASON_ROWS + 1 - len(rows))], ignore_index=True)
    before = _decisions(data)
    ask = {"transactions": many.to_dict(orient="records"), "reasons": 1}
    answer = requests.post(f"{url}/predict", timeout=60, json=ask)
    assert answer.status_code == 413, answer.text
    assert answer.json()["rule"] == "max-reason-rows" and answer.json()["column"] == "reasons"
    upload = {"file": ("many.csv", many.to_csv(index=False).encode())}
    refused = requests.post(f"{url}/predict_file", timeout=120, data={"reasons": "1"},
                            files=upload)  # fmt: skip
    assert refused.status_code == 413 and refused.json()["rule"] == "max-reason-rows"
    assert _decisions(data) == before
    fine = requests.post(f"{url}/predict", timeout=60,
                         json={"transactions": many.to_dict(orient="records")})  # fmt: skip
    assert fine.status_code == 200  # the cap is for reasons only


def test_explain_gives_the_reasons_and_logs_nothing(served, rows, explainer) -> None:
    url, data = served
    part = rows.head(5).assign(transaction_id=[f"x-{i}" for i in range(5)])
    before = _decisions(data)
    records = part.to_dict(orient="records")
    answer = requests.post(f"{url}/explain", timeout=60,
                           json={"transactions": records, "reasons": 4})  # fmt: skip
    assert answer.status_code == 200, answer.text
    explained = answer.json()["explanations"]
    assert [e["transaction_id"] for e in explained] == part["transaction_id"].tolist()
    assert [e["reasons"] for e in explained] == explainer.explain(part).top(4)
    assert _decisions(data) == before
    zero = requests.post(f"{url}/explain", timeout=60,
                         json={"transactions": records, "reasons": 0})  # fmt: skip
    assert zero.status_code == 400 and zero.json()["rule"] == "reasons"


def test_the_model_card_is_the_bentos_and_the_registrys(served, built) -> None:
    url, _ = served
    ws, env = built
    card = requests.get(f"{url}/model-card", timeout=10)
    text = requests.get(f"{url}/model-card?format=md", timeout=10)
    assert card.status_code == text.status_code == 200
    assert text.headers["content-type"].startswith("text/markdown")
    (folder,) = (card.parent for card in bento_dir(ws).glob("models/fraud_model/*/contract.json"))
    assert card.content == (folder / "model_card.json").read_bytes()
    assert text.content == (folder / "model_card.md").read_bytes()
    body = card.json()
    evaluated = json.loads((ws / "metrics/evaluate.json").read_text())
    for name in ("average_precision", "roc_auc", "recall_at_1pct_fpr"):  # evaluate's figures
        assert body["test_metrics"][name]["value"] == pytest.approx(evaluated[name], rel=1e-12)
    assert body["test_metrics"]["cost"]["value"] == evaluated["expected_cost"]
    champion = json.loads((ws / "models/champion.json").read_text())
    client = mlflow.tracking.MlflowClient(env["MLFLOW_TRACKING_URI"])
    (version,) = client.search_model_versions(
        f"name = '{champion['registered_model']}' and tags.model_md5 = '{champion['model_md5']}'"
    )
    assert version.description == text.text  # what `mlflow` shows for the version
    logged = mlflow.artifacts.download_artifacts(
        run_id=version.run_id, artifact_path="model_card/model_card.json",
        tracking_uri=env["MLFLOW_TRACKING_URI"])  # fmt: skip
    assert Path(logged).read_bytes() == card.content
