"""Model benchmark: the searched model against each family at its defaults, on the real
first day of the ULB file (../shared/data/ulb_day1.parquet, skipped when absent) and on
the default synthetic data, with the pipeline's own protocol.

Protocol, per dataset and split strategy (time, stratified): the pipeline's 60/20/20
split; the search on the train split (params.yaml's train.search); every model refitted
on train + valid with out-of-fold calibration; threshold from the out-of-fold scores;
metrics on the untouched test split.

Writes the table into docs/benchmarks/model.md and the figures into
bench/results/model.json (both into --output instead when it is given, e.g. for one part).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import yaml

from stages.lib.evaluation import choose_threshold, score_metrics
from stages.lib.modeling import fraud_probability, refit_calibrated
from stages.lib.search import run_search
from stages.lib.splitting import split_frame
from stages.lib.synthetic import generate_from_params
from stages.lib.validation import validate

ROOT = Path(__file__).resolve().parents[1]

REAL_DAY1 = ROOT.parent / "shared" / "data" / "ulb_day1.parquet"
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks" / "model.md"  # the table's one place


def evaluate(members: list[dict], train, valid, test, params, time_ordered) -> dict:
    costs = {
        "cost_missed_fraud": float(params["evaluate"]["cost_missed_fraud"]),
        "cost_false_alarm": float(params["evaluate"]["cost_false_alarm"]),
    }
    rows = pd.concat([train, valid], ignore_index=True)
    labels = rows["Class"].to_numpy()
    model, oof_rows, oof_p = refit_calibrated(members, rows, params["train"], time_ordered)
    threshold, _ = choose_threshold(labels[oof_rows], oof_p, **costs)
    test_y = test["Class"].to_numpy()
    metrics = score_metrics(
        test_y, fraud_probability(model, test), threshold, review_budget=100, **costs
    )
    return {
        k: metrics[k]
        for k in ("average_precision", "roc_auc", "recall_at_1pct_fpr", "expected_cost")
    }


def bench_one(name: str, frame: pd.DataFrame, strategy: str, params: dict) -> list[dict]:
    split = params["split"]
    parts = split_frame(
        frame,
        strategy=strategy,
        valid_size=float(split["valid_size"]),
        test_size=float(split["test_size"]),
        seed=int(split["seed"]),
    )
    time_ordered = strategy == "time"
    cfg = params["train"]
    out = []
    start = time.perf_counter()
    defaults = {f: dict(cfg[f]) for f in cfg["search"]["families"]}
    result = run_search(parts["train"], cfg["search"], defaults, int(cfg["seed"]), time_ordered)
    row = evaluate(
        result.members, parts["train"], parts["valid"], parts["test"], params, time_ordered
    )
    seconds = time.perf_counter() - start
    out.append({"data": name, "split": strategy, "model": f"searched: {result.name}", **row,
                "seconds": seconds, "cv_ap": result.cv_average_precision})  # fmt: skip
    print(out[-1], flush=True)
    for family in cfg["search"]["families"]:
        start = time.perf_counter()
        members = [{"family": family, "params": dict(cfg[family])}]
        row = evaluate(members, parts["train"], parts["valid"], parts["test"], params, time_ordered)
        out.append({"data": name, "split": strategy, "model": f"{family} (defaults)", **row,
                    "seconds": time.perf_counter() - start,
                    "cv_ap": result.best_by_family.get(family)})  # fmt: skip
        print(out[-1], flush=True)
    return out


def render(results: list[dict]) -> str:
    """docs/benchmarks/model.md from what main() measured (bench/results/model.json)."""
    lines = [
        "<!-- Written by `make bench-model` (bench/model.py); figures in "
        "bench/results/model.json. Rerun the benchmark instead of editing. -->",
        "# Model benchmark: latest run",
        "",
        "Protocol and reading: [benchmarks](../benchmarks.md#model).",
        "",
        "| data | split | model | test AP | ROC AUC | recall@1%FPR | expected cost (EUR) "
        "| CV AP (search) | fit+search s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        cv = "" if r["cv_ap"] is None else f"{r['cv_ap']:.3f}"
        lines.append(
            f"| {r['data']} | {r['split']} | {r['model']} | {r['average_precision']:.3f} "
            f"| {r['roc_auc']:.3f} | {r['recall_at_1pct_fpr']:.3f} | {r['expected_cost']:,.0f} "
            f"| {cv} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=("real", "synthetic"), nargs="+",
                        default=["real", "synthetic"])  # fmt: skip
    parser.add_argument("--split", choices=("time", "stratified"), nargs="+",
                        default=["time", "stratified"])  # fmt: skip
    parser.add_argument("--output", type=Path, default=RESULTS,
                        help="folder for model.json (and model.md unless default)")  # fmt: skip
    args = parser.parse_args()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    datasets = {}
    if "real" in args.data:
        if REAL_DAY1.is_file():
            datasets["real day 1"] = pd.read_parquet(REAL_DAY1)
        else:
            print(f"skipping the real data: {REAL_DAY1} is absent")
    if "synthetic" in args.data:
        datasets["synthetic (default)"] = generate_from_params(params["data"]["synthetic"])
    results = []
    for name, frame in datasets.items():
        clean, _ = validate(frame, duplicates=params["data"]["duplicates"])
        for strategy in args.split:
            results.extend(bench_one(name, clean, strategy, params))
    output = args.output
    output.mkdir(parents=True, exist_ok=True)
    (output / "model.json").write_text(json.dumps(results, indent=2) + "\n")
    doc = DOC if output.resolve() == RESULTS else output / DOC.name  # a part stays out of the docs
    doc.write_text(render(results))
    print(render(results))
    ranks = {}
    for r in results:
        if "(defaults)" in r["model"] and r["split"] == "time":
            ranks.setdefault(r["data"], {})[r["model"]] = r["average_precision"]
    for data, by_model in ranks.items():
        order = sorted(by_model, key=lambda m: -by_model[m])
        print(f"{data}, time split, families by test AP: {' > '.join(order)}")


if __name__ == "__main__":
    main()
