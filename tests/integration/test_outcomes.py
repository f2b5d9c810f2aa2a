"""The loop after the score (issue 21), end to end with real parts, once on SQLite and once
on PostgreSQL: the real-format sample scored with ids through `bentoml serve`, its Class
posted back as labels, /metrics showing the realised figures an offline computation
gives; kill -9 of a worker during scoring loses no decision that was answered 200; the
labelled decisions exported (make export-labels) and a `dvc repro` with data.feedback
retraining on the older ones and judging the candidate on the newest."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import psutil
import pytest
import requests
from sklearn.metrics import average_precision_score
from sqlalchemy import create_engine, select

from deploy.mlflow_server import scratch_postgres
from serving.decisions import DECISIONS, LABELS
from stages.lib import feedback
from stages.lib.modeling import fraud_probability, load_model
from stages.lib.schema import FEATURES

from ..conftest import bento_dir, link_venv, run, set_params, start_bento, stop

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def _postgres() -> Iterator[str]:
    if not (Path("/usr/lib/postgresql").exists() or shutil.which("pg_ctl")):
        pytest.skip("PostgreSQL server binaries not installed")
    with scratch_postgres("fraud_decisions", "fraudops-decisions-") as uri:
        yield uri


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def loop(request, built, tmp_path_factory) -> Iterator[tuple[str, str, Path, dict]]:
    """A server with its decision log on each database: (url, database url, workspace,
    the server's environment)."""
    ws, env = built
    home = tmp_path_factory.mktemp(f"loop_{request.param}")
    with contextlib.ExitStack() as stack:
        if request.param == "postgresql":
            database = stack.enter_context(_postgres())
        else:
            database = f"sqlite:///{home}/decisions.db"
        env = {**env, "BENTOML_HOME": str(home), "FRAUD_DECISIONS_URL": database,
               "FRAUD_PERFORMANCE_SECONDS": "1"}  # fmt: skip
        process, url = start_bento(bento_dir(ws), env, home / "serve.log")
        stack.callback(stop, process)
        yield url, database, ws, env


def _gauges(url: str, name: str) -> dict[str, float]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    found = re.findall(rf'^{name}\{{window="(\w+)"\}} (\S+)$', text, re.MULTILINE)
    return {window: float(value) for window, value in found}


def test_labels_give_the_realised_figures_an_offline_computation_gives(loop, real_sample):
    url, database, _, _ = loop
    sample = pd.read_csv(real_sample)
    sample.insert(0, "transaction_id", [f"sample-{i}" for i in range(len(sample))])
    scored = requests.post(
        f"{url}/predict_file",
        timeout=120,
        files={"file": ("sample.csv", sample.drop(columns="Class").to_csv(index=False).encode())},
    )
    assert scored.status_code == 200, scored.text
    out = pd.read_csv(io.BytesIO(scored.content))
    assert out["transaction_id"].tolist() == sample["transaction_id"].tolist()
    labels = sample[["transaction_id"]].assign(is_fraud=sample["Class"].astype(bool))
    answer = requests.post(f"{url}/feedback", timeout=60, files={
        "file": ("labels.csv", labels.to_csv(index=False).encode())})  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert answer.json()["stored"] == len(sample) and answer.json()["unknown_total"] == 0
    again = requests.post(
        f"{url}/feedback", timeout=60, json={"labels": labels.head(5).to_dict(orient="records")}
    )
    assert again.json()["unchanged"] == 5  # idempotent
    # Offline, in pandas from the log's tables: every decision with its transaction's
    # latest label (the module's other tests may have labelled decisions of their own).
    joined = _labelled_decisions(database)
    assert set(sample["transaction_id"]) <= set(joined["transaction_id"])
    alerted, fraud = joined["is_fraud"].to_numpy(bool), joined["fraud"].to_numpy(bool)
    expected = {
        "fraud_realised_alert_precision": (alerted & fraud).sum() / alerted.sum(),
        "fraud_realised_recall": (alerted & fraud).sum() / fraud.sum(),
        "fraud_realised_average_precision": average_precision_score(
            fraud, joined["probability"]),
        "fraud_realised_labelled_frauds": fraud.sum(),
    }  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if _gauges(url, "fraud_realised_labelled_frauds").get("1d") == fraud.sum():
            break
        time.sleep(1)
    for name, value in expected.items():
        assert _gauges(url, name)["1d"] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def _labelled_decisions(database: str) -> pd.DataFrame:
    with create_engine(database).connect() as connection:
        decisions = pd.read_sql(select(DECISIONS.c.transaction_id, DECISIONS.c.probability,
                                       DECISIONS.c.is_fraud), connection)  # fmt: skip
        labels = pd.read_sql(select(LABELS.c.id, LABELS.c.transaction_id,
                                    LABELS.c.is_fraud.label("fraud")), connection)  # fmt: skip
    latest = labels.sort_values("id").drop_duplicates("transaction_id", keep="last")
    return decisions.merge(latest[["transaction_id", "fraud"]], on="transaction_id")


def _workers(url: str) -> list[psutil.Process]:
    port = url.rsplit(":", 1)[1]
    (root,) = [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"] and "serve" in p.info["cmdline"] and port in p.info["cmdline"]
    ]
    workers = []
    for child in root.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # a killed worker is a zombie for a moment
            if "--worker-id" in child.cmdline():
                workers.append(child)
    return workers


def _lock_holder(url: str) -> psutil.Process:
    """The worker computing the realised figures (it holds the data directory's lock)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for worker in _workers(url):
            with contextlib.suppress(psutil.Error):
                if any(f.path.endswith("performance.lock") for f in worker.open_files()):
                    return worker
        time.sleep(0.5)
    raise AssertionError("no worker holds performance.lock")


def test_kill_9_of_a_worker_loses_no_answered_decision(loop, tmp_path) -> None:
    _, database, ws, env = loop
    # A server of its own on the same database: the module's shared one keeps its workers.
    process, url = start_bento(bento_dir(ws), {**env, "BENTOML_HOME": str(tmp_path)},
                               tmp_path / "serve.log")  # fmt: skip
    try:
        answered = _kill_a_worker_under_load(url, database, ws)
        _realised_figures_follow_labels(url, database, answered[:40])
    finally:
        stop(process)


def _realised_figures_follow_labels(url: str, database: str, ids: list[str]) -> None:
    """After the worker computing the figures was killed, another takes over: labels posted
    afterwards show, and so does a correction that lowers a figure (a dead worker's last
    values must not win the merge of the workers' gauges)."""
    for is_fraud in (True, False):
        labels = [{"transaction_id": i, "is_fraud": is_fraud} for i in ids]
        answer = requests.post(f"{url}/feedback", timeout=60, json={"labels": labels})
        assert answer.status_code == 200, answer.text
        joined = _labelled_decisions(database)
        expected = float(joined["fraud"].astype(bool).sum())
        deadline, seen = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            seen = _gauges(url, "fraud_realised_labelled_frauds").get("1d")
            if seen == expected:
                break
            time.sleep(1)
        assert seen == expected, f"labelled frauds {seen}, the log says {expected}"


def _kill_a_worker_under_load(url: str, database: str, ws: Path) -> list[str]:
    """Kill -9 the worker computing the figures while 8 clients score; every decision
    answered 200 must be in the log. The answered transaction ids."""
    rows = pd.read_parquet(ws / "data/split/test.parquet").drop(columns="Class").head(20)
    answered: list[str] = []
    stop_at = time.monotonic() + 8

    def client(number: int) -> None:
        batch = 0
        while time.monotonic() < stop_at:
            records = rows.assign(transaction_id=[f"k{number}-{batch}-{i}" for i in range(20)])
            batch += 1
            with contextlib.suppress(requests.RequestException):
                answer = requests.post(
                    f"{url}/predict",
                    timeout=30,
                    json={"transactions": records.to_dict(orient="records")},
                )
                if answer.status_code == 200:
                    answered.extend(p["transaction_id"] for p in answer.json()["predictions"])

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    victim = _lock_holder(url)
    time.sleep(3)
    victim.send_signal(signal.SIGKILL)
    for thread in threads:
        thread.join()
    assert answered, "no request was answered"
    with create_engine(database).connect() as connection:
        logged = set(
            connection.execute(
                select(DECISIONS.c.transaction_id).where(DECISIONS.c.transaction_id.like("k%"))
            ).scalars()
        )
    missing = set(answered) - logged
    assert not missing, f"{len(missing)} answered decisions are not in the log"
    return answered


def _score_with_ids(url: str, rows: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """Score `rows` through the service with ids `prefix-<i>` and post their Class back."""
    ids = [f"{prefix}-{i}" for i in range(len(rows))]
    upload = rows.drop(columns="Class").assign(transaction_id=ids).to_csv(index=False).encode()
    scored = requests.post(f"{url}/predict_file", timeout=120,
                           files={"file": ("rows.csv", upload)})  # fmt: skip
    assert scored.status_code == 200, scored.text
    labels = pd.DataFrame({"transaction_id": ids, "is_fraud": rows["Class"].astype(bool)})
    answer = requests.post(f"{url}/feedback", timeout=60, files={
        "file": ("labels.csv", labels.to_csv(index=False).encode())})  # fmt: skip
    assert answer.status_code == 200 and answer.json()["stored"] == len(rows), answer.text
    return rows.assign(transaction_id=ids)


def test_labelled_decisions_retrain_the_model_through_the_dag(loop, built_copy) -> None:
    url, database, ws, _ = loop
    copy, env = built_copy
    test = pd.read_parquet(ws / "data/split/test.parquet")
    older = _score_with_ids(url, test.iloc[: len(test) // 2], "older")
    time.sleep(2)  # the two batches' decisions are seconds apart: the window falls between
    newer = _score_with_ids(url, test.iloc[len(test) // 2 :], "newer")
    env = {**env, "FRAUD_DECISIONS_URL": database}
    link_venv(copy)  # the copy's `make setup` must not build a venv of its own
    run(["make", "export-labels"], copy, env, timeout=600)
    assert (copy / "data/raw/feedback.dvc").is_file()
    ignored = run(["git", "check-ignore", "-q", "data/raw/feedback.dvc"], copy, env, check=False)
    assert ignored.returncode == 1  # git keeps the .dvc file; the data goes to DVC's cache
    exported = pd.read_parquet(copy / "data/raw/feedback/labelled.parquet")
    exported = exported.set_index("transaction_id")
    features = list(FEATURES)
    for part in (older, newer):  # the features the model saw, as the client sent them
        mine = exported.loc[part["transaction_id"]]
        np.testing.assert_array_equal(mine[features].to_numpy(), part[features].to_numpy())
        np.testing.assert_array_equal(mine["Class"].to_numpy(), part["Class"].to_numpy())
    decided = exported["decided_at"]
    newest, newer_first = decided.max(), decided.loc[newer["transaction_id"]].min()
    assert newer_first - decided.loc[older["transaction_id"]].max() > 1
    window_days = float(newest - newer_first + 0.5) / 86_400
    set_params(copy, data__feedback=True, data__recent_days=window_days,
               evaluate__recent_min_frauds=5)  # fmt: skip
    run(["dvc", "repro"], copy, env, timeout=1800)

    prepared = json.loads((copy / "metrics/prepare.json").read_text())
    source_rows = json.loads((ws / "metrics/prepare.json").read_text())["rows_out"]
    assert prepared["recent_rows"] == len(newer)
    assert prepared["feedback_rows"] == len(exported) - len(newer) >= len(older)
    # The newer rows are also source rows (the test split's): those leave training, so the
    # window judges the candidate on transactions it was not trained on.
    assert prepared["dropped_as_in_window"] >= len(newer)
    assert prepared["rows_out"] == (
        source_rows + prepared["feedback_rows"] - prepared["dropped_as_in_window"]
    )
    train = pd.concat(
        [pd.read_parquet(copy / f"data/split/{p}.parquet") for p in ("train", "valid")]
    )
    assert not feedback.same_transaction(train, newer).any()
    recent = pd.read_parquet(copy / "data/prepared/recent_labelled.parquet")
    np.testing.assert_array_equal(recent[list(FEATURES[1:])].to_numpy(),
                                  newer[list(FEATURES[1:])].to_numpy())  # fmt: skip
    source_end = pd.read_parquet(ws / "data/prepared/transactions.parquet")["Time"].max()
    assert recent["Time"].min() > source_end  # after the source data, hour of day kept
    np.testing.assert_allclose(recent["Time"] % 86_400, newer["Time"].to_numpy() % 86_400)

    metrics = json.loads((copy / "metrics/evaluate.json").read_text())["recent"]
    assert (metrics["rows"], metrics["frauds"]) == (len(newer), int(newer["Class"].sum()))
    candidate = load_model(copy / "models/model.pkl")
    assert metrics["average_precision"] == pytest.approx(average_precision_score(
        recent["Class"], fraud_probability(candidate, recent)), rel=1e-12)  # fmt: skip
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    registry = json.loads((copy / "models/registry.json").read_text())
    trained = mlflow.tracking.MlflowClient().get_run(registry["candidate_run_id"])
    assert trained.data.metrics["recent_average_precision"] == metrics["average_precision"]
    assert trained.data.tags["champion_rule_basis"].startswith("the recent labelled window")
