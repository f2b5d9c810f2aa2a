"""The loop after the score (issue 21), end to end with real parts, once on SQLite and once
on PostgreSQL: the real-format sample scored with ids through `bentoml serve`, its Class
posted back as labels, /metrics showing the realised figures an offline computation
gives; kill -9 of a worker during scoring loses no decision that was answered 200."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import psutil
import pytest
import requests
from sklearn.metrics import average_precision_score
from sqlalchemy import create_engine, select

from deploy.mlflow_server import Postgres
from serving.decisions import DECISIONS
from stages.lib.servers import free_port

from ..conftest import bento_dir, start_bento, stop

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def _postgres() -> Iterator[str]:
    if not (Path("/usr/lib/postgresql").exists() or shutil.which("pg_ctl")):
        pytest.skip("PostgreSQL server binaries not installed")
    base = Path(tempfile.mkdtemp(prefix="fraudops-decisions-"))
    base.chmod(0o755)  # PostgreSQL runs as `postgres` when the tests run as root
    server = Postgres(base / "postgres", port=free_port())
    server.initialise()
    server.start()
    try:
        server.ensure_database("fraud_decisions")
        yield server.uri("fraud_decisions")
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def loop(request, built, tmp_path_factory) -> Iterator[tuple[str, str, Path]]:
    """A server with its decision log on each database: (url, database url, workspace)."""
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
        yield url, database, ws


def _gauges(url: str, name: str) -> dict[str, float]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    found = re.findall(rf'^{name}\{{window="(\w+)"\}} (\S+)$', text, re.MULTILINE)
    return {window: float(value) for window, value in found}


def test_labels_give_the_realised_figures_an_offline_computation_gives(loop, real_sample):
    url, _, _ = loop
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
    alerted, fraud = out["is_fraud"].to_numpy(), sample["Class"].to_numpy(bool)
    expected = {
        "fraud_realised_alert_precision": (alerted & fraud).sum() / alerted.sum(),
        "fraud_realised_recall": (alerted & fraud).sum() / fraud.sum(),
        "fraud_realised_average_precision": average_precision_score(
            fraud, out["fraud_probability"]),
        "fraud_realised_labelled_frauds": fraud.sum(),
    }  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if _gauges(url, "fraud_realised_labelled_frauds").get("1d") == fraud.sum():
            break
        time.sleep(1)
    for name, value in expected.items():
        assert _gauges(url, name)["1d"] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def _workers(url: str) -> list[psutil.Process]:
    port = url.rsplit(":", 1)[1]
    (root,) = [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"] and "serve" in p.info["cmdline"] and port in p.info["cmdline"]
    ]
    return [p for p in root.children(recursive=True) if "--worker-id" in p.cmdline()]


def test_kill_9_of_a_worker_loses_no_answered_decision(loop, built) -> None:
    url, database, ws = loop
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
    time.sleep(3)
    _workers(url)[0].send_signal(signal.SIGKILL)
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
