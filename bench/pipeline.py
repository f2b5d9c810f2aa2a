"""Benchmark: wall time and peak memory of each pipeline stage on the default data.

Runs in a scratch copy of the project with its own MLflow store and BentoML home, so the
user's stores are untouched. Each stage runs as `dvc repro -s <stage>` (DVC's own
overhead included); peak memory is the largest resident set of that command and its
children (wait4's rusage). Then a no-op `dvc repro`. Writes the table into
docs/benchmarks/pipeline.md and the figures into bench/results/pipeline.json.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from stages.lib.environment import TELEMETRY_OFF, stores
from stages.lib.project import copy_checkout

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks" / "pipeline.md"  # the table's one place
GOALS = {
    "pipeline_s": 120.0,  # with the model search (issue: model)
    "noop_s": 2.0,
    "peak_mb": 2048.0,
}


def timed(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of a command and everything it waited for."""
    start = time.perf_counter()
    process = subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{process.stderr.read().decode()[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    stages = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    with tempfile.TemporaryDirectory(prefix="fraudops-bench-") as scratch:
        base = Path(scratch)
        ws = base / "repo"
        copy_checkout(ROOT, ws)
        env = {
            **os.environ,
            "PATH": f"{BIN}:{os.environ['PATH']}",
            **TELEMETRY_OFF,
            **stores(base),  # the scratch checkout's own, beside it
        }
        rows = []
        for stage in stages:
            wall, peak = timed([str(BIN / "dvc"), "repro", "-s", stage], ws, env)
            rows.append({"stage": stage, "wall_s": round(wall, 2), "peak_mb": round(peak)})
            print(f"{stage:10s} {wall:6.1f} s {peak:7.0f} MB", flush=True)
        noop = [timed([str(BIN / "dvc"), "repro"], ws, env) for _ in range(3)]
    total = sum(r["wall_s"] for r in rows)
    peak = max(r["peak_mb"] for r in rows)
    noop_s = min(w for w, _ in noop)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "rows": params["data"]["synthetic"]["rows"]
        if params["data"]["source"] == "synthetic"
        else params["data"]["source"],
        "model": params["train"]["model"],
        "stages": rows,
        "pipeline_s": round(total, 1),
        "peak_mb": peak,
        "noop_repro_s": round(noop_s, 2),
        "goals": GOALS,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipeline.json").write_text(json.dumps(result, indent=2) + "\n")
    DOC.write_text(render(result))
    print(render(result))


def _met(value: float, goal: float) -> str:
    return "met" if value < goal else "not met"


def render(result: dict) -> str:
    """docs/benchmarks/pipeline.md from what main() measured (bench/results/pipeline.json)."""
    goals, total, peak = result["goals"], result["pipeline_s"], result["peak_mb"]
    noop_s = result["noop_repro_s"]
    lines = [
        "<!-- Written by `make bench` (bench/pipeline.py); figures in "
        "bench/results/pipeline.json. Rerun the benchmark instead of editing. -->",
        "# Pipeline benchmark: latest run",
        "",
        "Prose and history: [benchmarks](../benchmarks.md#pipeline).",
        "",
        f"{result['machine']}; {result['rows']} rows, model {result['model']}.",
        "",
        "| stage | wall (s) | peak memory (MB) |",
        "|---|---:|---:|",
        *[f"| {r['stage']} | {r['wall_s']:.1f} | {r['peak_mb']} |" for r in result["stages"]],
        f"| **whole pipeline, stage by stage** | **{total:.1f}** (goal < "
        f"{goals['pipeline_s']:.0f}: {_met(total, goals['pipeline_s'])}) | **{peak}** (goal < "
        f"{goals['peak_mb']:.0f}: {_met(peak, goals['peak_mb'])}) |",
        f"| no-op `dvc repro` (best of 3) | {noop_s:.2f} (goal < {goals['noop_s']:.0f}: "
        f"{_met(noop_s, goals['noop_s'])}) | |",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
