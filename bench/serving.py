"""Benchmark: the running Bento against the model in-process, side by side in one run.

1. In-process model time per runtime (the compiled ONNX graph and scikit-learn, loaded
   from the Bento as the service loads them): one-row p50/p99 and rows/s at 1, 100, 10k
   and 100k rows.
2. HTTP, `bentoml serve` of the project's Bento on a free loopback port: single-row JSON
   p50/p99 at concurrency 1, 8 and 32, beside BentoML's own floor (a no-op service served
   the same way, same run); JSON, CSV and Parquet batches of 1 to 100k rows.
3. Single rows again with a CPU hog (one busy process per core) beside the service, and
   while two clients post 100k-row Parquet files back to back.

Writes the tables into docs/benchmarks/serving.md and the figures into
bench/results/serving.json.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import requests

from serving.contract import Contract
from serving.runtime import load_runtime
from stages.lib.environment import project_env
from stages.lib.project import pipeline_path
from stages.lib.servers import BIN, free_port, start_bento, start_server, stop

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks" / "serving.md"  # the tables' one place
SIZES = (1, 100, 10_000, 100_000)
CONCURRENCY = (1, 8)
SINGLE_ROW_CONCURRENCY = (1, 8, 32)
CASE_SECONDS = 10.0  # each case stops issuing requests after this


# The same workers and traffic settings as serving/service.py, and a JSON endpoint that
# takes the same body and does nothing: what any BentoML service costs per request here.
NOOP_SERVICE = """
import bentoml

@bentoml.service(name="noop", workers="cpu_count", traffic={"timeout": 120})
class Noop:
    @bentoml.api(route="/predict")
    def predict(self, transactions: list[dict]) -> dict:
        return {"predictions": []}
"""


def start_noop(env: dict[str, str], workdir: Path) -> tuple[subprocess.Popen, str]:
    """BentoML's floor: a service that does nothing, served like the real one."""
    (workdir / "noop_service.py").write_text(NOOP_SERVICE)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [str(BIN / "bentoml"), "serve", "noop_service:Noop", "--host", "127.0.0.1",
            "--port", str(port), "--working-dir", str(workdir)]  # fmt: skip
    return start_server(args, env, workdir / "noop.log", f"{url}/readyz"), url


def load_runtimes(bento: Path, threads: int) -> dict:
    """The service's own runtime module over the Bento's model files (the Bento's src is
    built from this checkout's serving package)."""
    model_dir, contract = bento_model(bento)
    path_of = lambda name: str(model_dir / name)  # noqa: E731
    found = {"sklearn": load_runtime("sklearn", contract.runtime, path_of, threads)}
    if contract.runtime.onnx:
        found["onnx"] = load_runtime("onnx", contract.runtime, path_of, threads)
    return found


def bento_model(bento: Path) -> tuple[Path, Contract]:
    """The folder of the model inside an exported Bento, and its contract."""
    folder = next(p for p in (bento / "models").glob("*/*") if p.is_dir())
    return folder, Contract.read(folder / "contract.json")


def in_process(runtimes: dict, frame: pd.DataFrame) -> dict:
    out = {}
    for name, rt in runtimes.items():
        one = frame.head(1)
        rt.probability(one)
        times = []
        deadline = time.perf_counter() + 5.0
        while len(times) < 2000 and time.perf_counter() < deadline:
            times.append(_timed(lambda rt=rt, one=one: rt.probability(one)))
        ms = np.asarray(times) * 1000
        rates = {}
        for n in SIZES:
            rates[n] = n / min(_timed(lambda rt=rt, n=n: rt.probability(frame.head(n)))
                               for _ in range(3))  # fmt: skip
        out[name] = {"p50_ms": float(np.percentile(ms, 50)),
                     "p99_ms": float(np.percentile(ms, 99)), "rows_per_s": rates}  # fmt: skip
        print(f"in-process {name}: 1 row p50 {out[name]['p50_ms']:.3f} ms "
              f"p99 {out[name]['p99_ms']:.3f} ms; rows/s {rates}", flush=True)  # fmt: skip
    return out


@contextlib.contextmanager
def files_streaming(url: str, frame: pd.DataFrame, clients: int = 2):
    """100k-row Parquet files posted back to back by `clients` threads meanwhile: do
    single transactions wait behind them?"""
    parquet = io.BytesIO()
    frame.to_parquet(parquet, index=False)
    body, stop_at = parquet.getvalue(), threading.Event()
    scored = {"rows": 0, "errors": 0, "start": time.perf_counter()}

    def post() -> None:
        while not stop_at.is_set():
            response = requests.post(url + "/predict_file", files={"file": ("f.parquet", body)},
                                     data={"output_format": "parquet"}, timeout=300)  # fmt: skip
            if response.status_code == 200:
                scored["rows"] += len(frame)
            else:
                scored["errors"] += 1

    threads = [threading.Thread(target=post, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(2.0)  # the files are in flight before the first single row
    try:
        yield scored
    finally:
        stop_at.set()
        for thread in threads:
            thread.join(timeout=60)
        scored["rows_per_s"] = scored["rows"] / (time.perf_counter() - scored["start"])


def cpu_hog() -> list[subprocess.Popen]:
    code = "while True: pass"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(os.cpu_count() or 1)]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_case(
    url: str, kind: str, body: bytes, rows: int, concurrency: int, min_requests: int = 0
) -> dict:
    requests_total = max(concurrency * 2, min(400, 2_000_000 // max(rows, 1) // 10))
    requests_total = max(requests_total, min_requests)
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


def hey_case(
    url: str, body: bytes, concurrency: int, seconds: float = CASE_SECONDS, path: str = "/predict"
) -> dict:
    """One-row JSON requests with `hey` (a Go load generator: a Python client thread pool
    tops out near 300 requests/s on these machines and would measure itself)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as payload:
        payload.write(body)
        payload.flush()
        out = subprocess.run(
            ["hey", "-z", f"{seconds}s", "-c", str(concurrency), "-m", "POST",
             "-T", "application/json", "-D", payload.name, "-o", "csv", url + path],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    table = pd.read_csv(io.StringIO(out))
    lat = table["response-time"].to_numpy() * 1000
    wall = float((table["offset"] + table["response-time"]).max())
    return {"kind": "json", "rows": 1, "concurrency": concurrency, "requests": len(table),
            "errors": int((table["status-code"] != 200).sum()),
            "rows_per_s": len(table) / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99))}  # fmt: skip


def single_rows(url: str, body: bytes, label: str) -> list[dict]:
    cases = []
    for concurrency in SINGLE_ROW_CONCURRENCY:
        if shutil.which("hey"):
            case = hey_case(url, body, concurrency)
        else:
            case = run_case(url, "json", body, 1, concurrency, min_requests=400 * concurrency)
        case["client"] = "hey" if shutil.which("hey") else "python"
        case["case"] = label
        cases.append(case)
        print(f"1-row {label:28s} c={concurrency:2d} {case['rows_per_s']:7.0f} req/s "
              f"p50={case['p50_ms']:.1f} p99={case['p99_ms']:.1f} ms "
              f"errors={case['errors']}", flush=True)  # fmt: skip
    return cases


def main() -> None:
    env = {
        **os.environ,
        **project_env(ROOT),
        "FRAUD_MAX_JSON_ROWS": str(max(SIZES)),
    }
    bento = pipeline_path("bento", ROOT)  # the package stage's Bento folder
    test = pd.read_parquet(pipeline_path("split", ROOT) / "test.parquet").drop(columns="Class")
    frame = pd.concat([test] * (max(SIZES) // len(test) + 1), ignore_index=True).head(max(SIZES))
    runtimes = in_process(load_runtimes(bento, os.cpu_count() or 1), frame)
    served = "onnx" if "onnx" in runtimes else "sklearn"
    baseline = runtimes[served]["rows_per_s"]
    one_row = json.dumps({"transactions": frame.head(1).to_dict(orient="records")}).encode()
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    single: list[dict] = []
    noop, noop_url = start_noop(env, work)
    try:
        single += single_rows(noop_url, one_row, "BentoML no-op floor")
    finally:
        stop(noop)
    process, url = start_bento(bento, env, work / "serve.log")
    results = []
    try:
        single += single_rows(url, one_row, f"fraud service ({served})")
        hogs = cpu_hog()
        try:
            single += single_rows(url, one_row, f"fraud service, CPU hog ({served})")
        finally:
            for hog in hogs:
                hog.kill()
        with files_streaming(url, frame) as files:
            single += single_rows(url, one_row, f"fraud service, 100k-row files ({served})")
        files["ratio_to_in_process"] = files["rows_per_s"] / baseline[max(SIZES)]
        print(f"files meanwhile: {files}", flush=True)
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
        stop(process)
    write_report(runtimes, single, results, files)


def write_report(runtimes: dict, single: list[dict], results: list[dict],
                 files: dict) -> None:  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"in_process": runtimes, "single_row": single, "batches": results,
              "files_while_single_rows": files}  # fmt: skip
    (RESULTS / "serving.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    report = json.loads((RESULTS / "serving.json").read_text())  # render what is kept
    DOC.write_text(render(report))
    print(render(report))


def render(report: dict) -> str:
    """docs/benchmarks/serving.md from what main() measured (bench/results/serving.json)."""
    runtimes, single = report["in_process"], report["single_row"]
    results, files = report["batches"], report["files_while_single_rows"]
    served = "onnx" if "onnx" in runtimes else "sklearn"
    cores = os.cpu_count()
    lines = ["<!-- Written by `make bench-serving` (bench/serving.py); figures in "
             "bench/results/serving.json. Rerun the benchmark instead of editing. -->",
             "# Serving benchmark: latest run", "",
             "What each case measures, and the goals: "
             "[benchmarks](../benchmarks.md#serving).", "",
             f"Serving benchmark, one run on {cores} cores (`make bench-serving`).", "",
             "In-process model time per runtime (the Bento's own model files):", "",
             "| runtime | 1 row p50 ms | 1 row p99 ms | "
             + " | ".join(f"{n:,} rows/s" for n in SIZES) + " |",
             "|---|---:|---:|" + "---:|" * len(SIZES)]  # fmt: skip
    for name, r in runtimes.items():
        rates = " | ".join(f"{r['rows_per_s'][str(n)]:,.0f}" for n in SIZES)
        lines.append(f"| {name} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {rates} |")
    floor = {c["concurrency"]: c["p99_ms"] for c in single if "no-op" in c["case"]}
    client = single[0]["client"] if single else "hey"
    lines += ["", f"Single-row JSON requests over HTTP (`/predict`; client: {client}):", "",
              "| case | concurrency | requests | requests/s | p50 ms | p99 ms | p99 / no-op p99 "
              "| errors |", "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for c in single:
        ratio = c["p99_ms"] / floor[c["concurrency"]] if floor.get(c["concurrency"]) else 0
        lines.append(f"| {c['case']} | {c['concurrency']} | {c['requests']} | "
                     f"{c['rows_per_s']:,.0f} | {c['p50_ms']:.1f} | {c['p99_ms']:.1f} | "
                     f"{ratio:.1f}x | {c['errors']} |")  # fmt: skip
    lines += ["", f"Meanwhile the two clients' 100k-row Parquet files were scored at "
              f"{files['rows_per_s']:,.0f} rows/s ({files['ratio_to_in_process']:.2f} of "
              f"in-process), {files['errors']} errors.",
              "", f"Batches over HTTP against in-process {served} throughput, same rows:", "",
              "| input | rows/request | concurrency | requests | rows/s | p50 ms | p95 ms "
              "| p99 ms | service / in-process | errors |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for c in results:
        lines.append(
            f"| {c['kind']} | {c['rows']:,} | {c['concurrency']} | {c['requests']} | "
            f"{c['rows_per_s']:,.0f} | {c['p50_ms']:.1f} | {c['p95_ms']:.1f} | "
            f"{c['p99_ms']:.1f} | {c['ratio_to_in_process']:.2f} | {c['errors']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
