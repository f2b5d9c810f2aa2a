"""The decision log over HTTP (part of `make bench-outcomes`): 1-row requests at
concurrency 1, 8 and 32 to `bentoml serve` of the project's Bento with the log off, on
SQLite and on PostgreSQL, beside BentoML's no-op floor, in one run; then /feedback
throughput (1,000-label JSON batches from 4 clients, and 1-label requests)."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import requests

from bench.serving import hey_case, single_rows, start_noop
from deploy.mlflow_server import scratch_postgres
from stages.lib.environment import project_env
from stages.lib.project import pipeline_path
from stages.lib.servers import start_bento, stop

ROOT = Path(__file__).resolve().parents[2]
LABEL_BATCH = 1_000
LABEL_ROWS = 40_000


def feedback_rates(url: str, rows: pd.DataFrame) -> dict:
    """Labels stored per second in 1,000-label batches from 4 clients, over ids the
    service has just scored, and 1-label requests per second (the same label: unchanged)."""
    ids = [f"fb-{i}" for i in range(len(rows))]
    upload = io.BytesIO()
    rows.assign(transaction_id=ids).to_parquet(upload, index=False)
    scored = requests.post(f"{url}/predict_file", timeout=300,
                           files={"file": ("rows.parquet", upload.getvalue())})  # fmt: skip
    scored.raise_for_status()
    batches = [ids[i : i + LABEL_BATCH] for i in range(0, len(ids), LABEL_BATCH)]

    def post(batch: list[str]) -> int:
        labels = [{"transaction_id": t, "is_fraud": False} for t in batch]
        answer = requests.post(f"{url}/feedback", json={"labels": labels}, timeout=120)
        answer.raise_for_status()
        return answer.json()["stored"]

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=4) as pool:
        stored = sum(pool.map(post, batches))
    seconds = time.perf_counter() - started
    one = json.dumps({"labels": [{"transaction_id": ids[0], "is_fraud": False}]}).encode()
    single = hey_case(url, one, 8, path="/feedback") if shutil.which("hey") else None
    return {"labels_per_s": round(stored / seconds), "stored": stored,
            "one_label_requests_per_s": round(single["rows_per_s"]) if single else None,
            "one_label_p99_ms": single["p99_ms"] if single else None,
            "one_label_errors": single["errors"] if single else None}  # fmt: skip


def measure() -> dict:
    env = {**os.environ, **project_env(ROOT)}
    bento = pipeline_path("bento", ROOT)
    test = pd.read_parquet(pipeline_path("split", ROOT) / "test.parquet").drop(columns="Class")
    one_row = json.dumps({"transactions": test.head(1).to_dict(orient="records")}).encode()
    work = Path(tempfile.mkdtemp(prefix="bench-outcomes-"))
    cases: list[dict] = []
    noop, noop_url = start_noop(env, work)
    try:
        cases += single_rows(noop_url, one_row, "BentoML no-op floor")
    finally:
        stop(noop)
    feedback = None
    with scratch_postgres("fraud_decisions", "fraudops-bench-pg-") as pg_url:
        for label, database in (("log off", "off"),
                                ("log on, SQLite", f"sqlite:///{work}/decisions.db"),
                                ("log on, PostgreSQL", pg_url)):  # fmt: skip
            home = work / label.replace(" ", "_").replace(",", "")
            served = {**env, "FRAUD_DECISIONS_URL": database, "BENTOML_HOME": str(home)}
            process, url = start_bento(bento, served, work / f"{home.name}.log")
            try:
                cases += single_rows(url, one_row, label)
                if label == "log on, SQLite":
                    rows = pd.concat([test] * (LABEL_ROWS // len(test) + 1)).head(LABEL_ROWS)
                    feedback = feedback_rates(url, rows.reset_index(drop=True))
            finally:
                stop(process)
    shutil.rmtree(work, ignore_errors=True)
    return {"single_row": cases, "feedback": feedback}


def render(http: dict) -> list[str]:
    """The HTTP tables of docs/benchmarks/outcomes.md."""
    off = {c["concurrency"]: c["rows_per_s"] for c in http["single_row"] if c["case"] == "log off"}
    lines = ["", "1-row JSON requests over HTTP (`bentoml serve` of the project's Bento, "
             f"{http['single_row'][0]['client']} as the client, 10 s per case; goal: the log "
             "costs at most 20% of 1-row throughput):", "",
             "| case | concurrency | requests/s | p50 ms | p99 ms | errors | vs log off |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for c in http["single_row"]:
        ratio = c["rows_per_s"] / off[c["concurrency"]]
        lines.append(f"| {c['case']} | {c['concurrency']} | {c['rows_per_s']:,.0f} | "
                     f"{c['p50_ms']:.1f} | {c['p99_ms']:.1f} | {c['errors']} | "
                     f"{ratio:.2f} |")  # fmt: skip
    fb = http["feedback"]
    lines += ["", "`/feedback` on the SQLite log:", "",
              "| case | measured |", "|---|---|",
              f"| {LABEL_BATCH:,}-label JSON batches, 4 clients ({fb['stored']:,} new labels) "
              f"| {fb['labels_per_s']:,} labels/s |"]  # fmt: skip
    if fb["one_label_requests_per_s"] is not None:
        lines.append(f"| 1-label requests, concurrency 8 | {fb['one_label_requests_per_s']:,} "
                     f"requests/s, p99 {fb['one_label_p99_ms']:.1f} ms, "
                     f"{fb['one_label_errors']} errors |")  # fmt: skip
    return lines
