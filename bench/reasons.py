"""Reason codes (`make bench-reasons`): what asking for them costs, in-process and over HTTP,
on the project's champion, in one run.

In-process: the service's own Explainer on the Bento's stored model, 1 row with 3 reasons
(p50/p99 of 300 calls), 100 and 10,000 rows (time of one call). Over HTTP (`bentoml serve`
of the Bento): 1-row JSON without and with 3 reasons, beside BentoML's no-op floor; a
100-row JSON request and a 10,000-row file with 3 reasons. Writes docs/benchmarks/reasons.md
and bench/results/reasons.json."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import requests

from bench.serving import single_rows, start_noop
from serving.reasons import Explainer
from stages.lib.environment import project_env
from stages.lib.project import pipeline_path
from stages.lib.schema import FEATURES
from stages.lib.servers import start_bento, stop

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "reasons.json"
DOC = ROOT / "docs" / "benchmarks" / "reasons.md"
K = 3


def in_process(bento: Path, test: pd.DataFrame) -> dict:
    (model,) = bento.glob("models/fraud_model/*/model.pkl")
    explainer = Explainer(str(model), FEATURES)
    one = test.head(1)
    explainer.explain(one).top(K)  # load the model once
    times = []
    for _ in range(300):
        started = time.perf_counter()
        explainer.explain(one).top(K)
        times.append(time.perf_counter() - started)
    figures = {"one_row_p50_ms": float(np.percentile(times, 50) * 1e3),
               "one_row_p99_ms": float(np.percentile(times, 99) * 1e3)}  # fmt: skip
    for rows in (100, 10_000):
        part = test.head(rows)
        started = time.perf_counter()
        explainer.explain(part).top(K)
        figures[f"rows_{rows}_s"] = time.perf_counter() - started
    print(json.dumps(figures), flush=True)
    return figures


def over_http(bento: Path, test: pd.DataFrame) -> dict:
    env = {
        **os.environ,
        **project_env(ROOT),
        "FRAUD_DECISIONS_URL": "off",
        "FRAUD_MAX_REASON_ROWS": "10000",
    }  # the 10,000-row file
    one = test.head(1).to_dict(orient="records")
    work = Path(tempfile.mkdtemp(prefix="bench-reasons-"))
    cases: list[dict] = []
    noop, noop_url = start_noop(env, work)
    try:
        cases += single_rows(noop_url, json.dumps({"transactions": one}).encode(),
                             "BentoML no-op floor")  # fmt: skip
    finally:
        stop(noop)
    process, url = start_bento(bento, {**env, "BENTOML_HOME": str(work)}, work / "serve.log")
    try:
        cases += single_rows(url, json.dumps({"transactions": one}).encode(), "no reasons")
        with_reasons = json.dumps({"transactions": one, "reasons": K}).encode()
        cases += single_rows(url, with_reasons, f"{K} reasons")
        batches = _batches(url, test)
    finally:
        stop(process)
    shutil.rmtree(work, ignore_errors=True)
    return {"single_row": cases, **batches}


def _batches(url: str, test: pd.DataFrame) -> dict:
    body = {"transactions": test.head(100).to_dict(orient="records"), "reasons": K}
    started = time.perf_counter()
    requests.post(f"{url}/predict", json=body, timeout=120).raise_for_status()
    figures = {"json_100_s": time.perf_counter() - started}
    upload = io.BytesIO()
    test.head(10_000).to_parquet(upload, index=False)
    started = time.perf_counter()
    answer = requests.post(f"{url}/predict_file", timeout=300, data={"reasons": str(K)},
                           files={"file": ("rows.parquet", upload.getvalue())})  # fmt: skip
    answer.raise_for_status()
    figures["file_10000_s"] = time.perf_counter() - started
    print(json.dumps(figures), flush=True)
    return figures


def render(figures: dict) -> str:
    local, http = figures["in_process"], figures["http"]
    lines = ["<!-- Written by `make bench-reasons` (bench/reasons.py); figures in "
             "bench/results/reasons.json. Rerun it instead of editing. -->",
             "# Reason codes: latest run", "",
             f"Champion: {figures['family']}. One run on 2 shared cores. What it measures: "
             "[benchmarks](../benchmarks.md#reasons).", "",
             "| case | measured | goal |", "|---|---|---|",
             f"| in-process, 1 row, {K} reasons | p50 {local['one_row_p50_ms']:.1f} ms, "
             f"p99 {local['one_row_p99_ms']:.1f} ms | p99 < 5 ms |",
             f"| in-process, 100 rows | {local['rows_100_s']:.3f} s | |",
             f"| in-process, 10,000 rows | {local['rows_10000_s']:.2f} s | < 2 s |",
             f"| HTTP, 100-row JSON with {K} reasons | {http['json_100_s']:.3f} s | |",
             f"| HTTP, 10,000-row Parquet file with {K} reasons | {http['file_10000_s']:.2f} s "
             "| |", "",
             "1-row JSON requests over HTTP (client "
             f"{http['single_row'][0]['client']}, 10 s per case):", "",
             "| case | concurrency | requests/s | p50 ms | p99 ms | errors |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for c in http["single_row"]:
        lines.append(f"| {c['case']} | {c['concurrency']} | {c['rows_per_s']:,.0f} | "
                     f"{c['p50_ms']:.1f} | {c['p99_ms']:.1f} | {c['errors']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    bento = pipeline_path("bento", ROOT)
    test = pd.read_parquet(pipeline_path("split", ROOT) / "test.parquet").drop(columns="Class")
    family = json.loads((ROOT / "metrics/search.json").read_text())["chosen"]
    figures = {"family": family, "in_process": in_process(bento, test)}
    figures["http"] = over_http(bento, test)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    DOC.write_text(render(figures))
    print(DOC.read_text(), end="")


if __name__ == "__main__":
    main()
