"""Benchmark: the running Bento against the model in-process, side by side in one run.

Starts `bentoml serve` on a free loopback port (the project's built Bento), then drives it
from this process with bounded request counts and time: JSON and file (CSV) batches of
1, 100, 10,000 and 100,000 rows at concurrency 1 and 8; files as CSV in and out, and
as Parquet in and out. In the same run it times the
model's own predict_proba on the same rows, and reports service / in-process throughput.
Writes bench/results/serving.md and .json.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: `python bench/serving.py`
from stages.lib.modeling import load_model  # noqa: E402
from stages.lib.project import pipeline_path  # noqa: E402

BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "results"
SIZES = (1, 100, 10_000, 100_000)
CONCURRENCY = (1, 8)
CASE_SECONDS = 10.0  # each case stops issuing requests after this


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    bento = pipeline_path("bento", ROOT)  # the package stage's Bento folder
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "bentoml"), "serve", str(bento), "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            if requests.get(f"{url}/readyz", timeout=1).status_code == 200:
                return process, url
        except requests.RequestException:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("the service did not become ready")


def in_process_rows_per_s(model, frame: pd.DataFrame, repeats: int = 3) -> float:
    best = min(_timed(lambda: model.predict_proba(frame)) for _ in range(repeats))
    return len(frame) / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_case(url: str, kind: str, body: bytes, rows: int, concurrency: int) -> dict:
    requests_total = max(concurrency * 2, min(400, 2_000_000 // max(rows, 1) // 10))
    if rows >= 100_000:
        requests_total = concurrency * 2 if concurrency > 1 else 3
    data = None
    if kind == "json":
        path, headers, files = "/predict", {"Content-Type": "application/json"}, None
    elif kind == "csv":
        path, headers, files = "/predict_file", {}, {"file": ("batch.csv", body, "text/csv")}
    else:  # Parquet in, Parquet out
        path, headers, files = "/predict_file", {}, {"file": ("batch.parquet", body)}
        data = {"output_format": "parquet"}
    deadline = time.perf_counter() + CASE_SECONDS
    latencies: list[float] = []
    errors = 0

    def one(_: int) -> None:
        nonlocal errors
        if time.perf_counter() > deadline:
            return
        start = time.perf_counter()
        if files:
            response = requests.post(url + path, files=files, data=data, timeout=300)
        else:
            response = requests.post(url + path, data=body, headers=headers, timeout=300)
        latencies.append(time.perf_counter() - start)
        errors += response.status_code != 200

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(requests_total)))
    wall = time.perf_counter() - start
    lat = np.asarray(latencies) * 1000
    return {
        "kind": kind,
        "rows": rows,
        "concurrency": concurrency,
        "requests": len(lat),
        "errors": errors,
        "rows_per_s": rows * len(lat) / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def main() -> None:
    env = {
        **os.environ,
        "BENTOML_HOME": os.environ.get("BENTOML_HOME", str(ROOT / "bentoml_home")),
        "BENTOML_DO_NOT_TRACK": "true",
        "FRAUD_MAX_JSON_ROWS": str(max(SIZES)),
    }
    test = pd.read_parquet(ROOT / "data/split/test.parquet").drop(columns="Class")
    frame = pd.concat([test] * (max(SIZES) // len(test) + 1), ignore_index=True).head(max(SIZES))
    model = load_model(pipeline_path("model", ROOT))
    baseline = {n: in_process_rows_per_s(model, frame.head(n)) for n in SIZES}
    process, url = start_server(env)
    results = []
    try:
        for rows in SIZES:
            part = frame.head(rows)
            parquet = io.BytesIO()
            part.to_parquet(parquet, index=False)
            bodies = {
                "json": json.dumps({"transactions": part.to_dict(orient="records")}).encode(),
                "csv": part.to_csv(index=False).encode(),
                "parquet": parquet.getvalue(),
            }
            for kind, body in bodies.items():
                for concurrency in CONCURRENCY:
                    case = run_case(url, kind, body, rows, concurrency)
                    case["ratio_to_in_process"] = case["rows_per_s"] / baseline[rows]
                    results.append(case)
                    print(
                        f"{kind:4s} rows={rows:6d} c={concurrency} "
                        f"{case['rows_per_s']:10.0f} rows/s "
                        f"p50={case['p50_ms']:.1f} p99={case['p99_ms']:.1f} ms "
                        f"ratio={case['ratio_to_in_process']:.2f} errors={case['errors']}",
                        flush=True,
                    )
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)
    lines = [
        "Serving benchmark: bentoml serve on 127.0.0.1 vs in-process predict_proba, same rows, "
        f"same run ({os.cpu_count()} cores)",
        "",
        "| input | rows/request | concurrency | requests | rows/s | p50 ms | p95 ms | p99 ms "
        "| service / in-process | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in results:
        lines.append(
            f"| {c['kind']} | {c['rows']:,} | {c['concurrency']} | {c['requests']} | "
            f"{c['rows_per_s']:,.0f} | {c['p50_ms']:.1f} | {c['p95_ms']:.1f} | "
            f"{c['p99_ms']:.1f} | {c['ratio_to_in_process']:.2f} | {c['errors']} |"
        )
    lines += [
        "",
        "In-process predict_proba (best of 3): "
        + ", ".join(f"{n:,} rows {baseline[n]:,.0f} rows/s" for n in SIZES),
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serving.json").write_text(
        json.dumps({"cases": results, "in_process_rows_per_s": baseline}, indent=2) + "\n"
    )
    (RESULTS / "serving.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
