"""The decision log's cost (`make bench-outcomes`): in-process, group commit of 1-row
requests from concurrent threads and of a 100k-row file, and the realised-metrics refresh
at 1M decisions, on SQLite; over HTTP (bench/lib/outcomes_http.py), the log off, on SQLite and
on PostgreSQL beside BentoML's no-op floor, and /feedback. The tables go to
docs/benchmarks/outcomes.md, the figures to bench/results/outcomes.json."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from sqlalchemy import insert

from bench.lib import outcomes_http
from serving.contract import Costs
from serving.decisions import DECISIONS, LABELS, DecisionLog, Decisions, commit_or_refuse
from serving.performance import WINDOWS, measure

RESULTS = Path(__file__).resolve().parent / "results" / "outcomes.json"
DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "outcomes.md"
COSTS = Costs(cost_missed_fraud=100.0, cost_false_alarm=5.0)


def _decisions(rows: int, tag: str, rng: np.random.Generator) -> Decisions:
    return Decisions([f"{tag}:{i}" for i in range(rows)], rng.random(rows), 0.5,
                     rng.normal(size=(rows, 30)), tag[:16], "0" * 32, "onnx")  # fmt: skip


def one_row_requests(log: DecisionLog, threads: int, seconds: float = 5.0) -> dict:
    """1-row requests committed from `threads` threads: requests/s and commits made."""
    done, rng = [0] * threads, np.random.default_rng(1)
    stop = time.perf_counter() + seconds

    def client(n: int) -> None:
        while time.perf_counter() < stop:
            commit_or_refuse(log, _decisions(1, f"c{n}-{done[n]}", rng))
            done[n] += 1

    workers = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return {"threads": threads, "requests_per_s": round(sum(done) / seconds, 1)}


def big_file(log: DecisionLog, rows: int = 100_000) -> float:
    decided = _decisions(rows, "file", np.random.default_rng(2))
    started = time.perf_counter()
    commit_or_refuse(log, decided, seconds=600)
    return time.perf_counter() - started


def refresh_at(log: DecisionLog, rows: int = 1_000_000, labelled: float = 0.3) -> float:
    """Seconds for every window's figures once the log holds `rows` decisions."""
    rng = np.random.default_rng(3)
    now, chunk = time.time(), 100_000
    with log.engine.begin() as connection:
        for start in range(0, rows, chunk):
            decided = _decisions(chunk, f"m{start}", rng)
            connection.execute(insert(DECISIONS), decided.rows(now - rng.random() * 86_400))
            picked = [tid for tid in decided.transaction_ids if rng.random() < labelled]
            connection.execute(insert(LABELS), [
                {"transaction_id": t, "is_fraud": bool(rng.random() < 0.1),
                 "labelled_at": now, "received_at": now} for t in picked])  # fmt: skip
    started = time.perf_counter()
    for span in WINDOWS.values():
        measure(log.engine, now - span, COSTS)
    return time.perf_counter() - started


def render(figures: dict) -> str:
    lines = ["<!-- Written by `make bench-outcomes` (bench/outcomes.py); figures in "
             "bench/results/outcomes.json. Rerun it instead of editing. -->",
             "# Decision log: latest run", "",
             "What it measures: [benchmarks](../benchmarks.md#outcomes). SQLite (WAL, "
             "synchronous=FULL), in-process, one run on 2 cores.", "",
             "| case | measured | goal |", "|---|---|---|"]  # fmt: skip
    for run in figures["one_row"]:
        lines.append(f"| 1-row requests, {run['threads']} threads | "
                     f"{run['requests_per_s']:,} committed requests/s | |")  # fmt: skip
    lines.append(f"| a 100k-row file | logged in {figures['file_seconds']:.2f} s | within 10% "
                 "of its scoring time (~2.5 s: 0.25 s) |")  # fmt: skip
    lines.append(f"| realised metrics refresh, 1M decisions (30% labelled), 3 windows | "
                 f"{figures['refresh_seconds']:.2f} s | < 1 s |")  # fmt: skip
    if figures.get("http"):
        lines += outcomes_http.render(figures["http"])
    return "\n".join(lines) + "\n"


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        log = DecisionLog(f"sqlite:///{folder}/decisions.db")
        figures = {"one_row": [one_row_requests(log, n) for n in (1, 8, 32)],
                   "file_seconds": big_file(log)}  # fmt: skip
        fresh = DecisionLog(f"sqlite:///{folder}/refresh.db")
        figures["refresh_seconds"] = refresh_at(fresh)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")  # kept if the HTTP part fails
    figures["http"] = outcomes_http.measure()
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    DOC.write_text(render(figures))
    print(DOC.read_text(), end="")


if __name__ == "__main__":
    main()
