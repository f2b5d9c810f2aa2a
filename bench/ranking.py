"""Do the families rank on the synthetic default as on real data? (issue 9, item 3)

hgb, extra_trees and logreg at their params.yaml defaults, on the real first day of the
ULB file (../shared/data/ulb_day1.parquet, skipped when absent) and on the synthetic
default drawn with several seeds, by two protocols:

- `time split`: the pipeline's 60/20/20 time split, fitted on train + valid, AP on test,
  with a stratified-bootstrap 95% interval (one window: 35 frauds on the real day);
- `rolling`: forward-chaining folds (stages/lib/family_ranking.py), mean AP of the blocks.

Writes the table into docs/benchmarks/ranking.md and the figures into
bench/results/ranking.json (both into --output instead when it is given).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from sklearn.metrics import average_precision_score

from stages.lib import modeling
from stages.lib.family_ranking import ap_interval, ranking, rolling_average_precision
from stages.lib.schema import FEATURES
from stages.lib.splitting import split_frame
from stages.lib.synthetic import generate_from_params
from stages.lib.validation import validate

ROOT = Path(__file__).resolve().parents[1]

REAL_DAY1 = ROOT.parent / "shared" / "data" / "ulb_day1.parquet"
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks" / "ranking.md"  # the table's one place
FAMILIES = ("hgb", "extra_trees", "logreg")
# Forests on both cores: the pipeline keeps one thread for bit-identical outputs, which
# moves an AP in the last digits only.
modeling.FOREST_JOBS = 2


def single_split(frame: pd.DataFrame, params: dict) -> dict[str, dict]:
    split = params["split"]
    parts = split_frame(frame, "time", float(split["valid_size"]), float(split["test_size"]), 42)
    fit = pd.concat([parts["train"], parts["valid"]], ignore_index=True)
    test = parts["test"]
    labels = test["Class"].to_numpy()
    out = {}
    for family in FAMILIES:
        model = modeling.build_estimator(family, params["train"][family], 42)
        model.fit(fit[list(FEATURES)], fit["Class"])
        scores = model.predict_proba(test[list(FEATURES)])[:, 1]
        out[family] = {
            "ap": float(average_precision_score(labels, scores)),
            "interval": ap_interval(labels, scores),
        }
    return {"test_frauds": int(labels.sum()), "families": out}


def measure(name: str, frame: pd.DataFrame, params: dict, folds: int) -> dict:
    start = time.perf_counter()
    clean, _ = validate(frame, duplicates=params["data"]["duplicates"])
    families = {f: dict(params["train"][f]) for f in FAMILIES}
    blocks = rolling_average_precision(clean, families, folds, 42)
    row = {
        "data": name,
        "single": single_split(clean, params),
        "rolling": {f: {"mean": float(np.mean(v)), "blocks": v} for f, v in blocks.items()},
        "rolling_order": ranking(blocks),
        "seconds": time.perf_counter() - start,
    }
    print(json.dumps(row), flush=True)
    return row


def _ap(row: dict, family: str, protocol: str) -> float:
    """A family's AP in one row: on the time split, or the rolling blocks' mean."""
    if protocol == "single":
        return row["single"]["families"][family]["ap"]
    return row["rolling"][family]["mean"]


def _order(aps: dict[str, float]) -> str:
    return " > ".join(sorted(aps, key=lambda f: -aps[f]))


def _split_real(rows: list[dict]) -> tuple[dict | None, list[dict]]:
    real = next((r for r in rows if r["data"] == "real day 1"), None)
    return real, [r for r in rows if r is not real]


def table(rows: list[dict]) -> list[str]:
    """One line per dataset (docs/benchmarks/ranking.md): time-split AP with its bootstrap
    interval, rolling mean AP, rolling order; then the mean over the synthetic seeds."""
    lines = [
        "| data | test frauds | split hgb | split extra_trees | split logreg "
        "| rolling hgb | rolling extra_trees | rolling logreg | rolling order |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        single = r["single"]["families"]
        split = " | ".join(
            "{:.3f} [{:.2f}, {:.2f}]".format(single[f]["ap"], *single[f]["interval"])
            for f in FAMILIES
        )
        rolling = {f: _ap(r, f, "rolling") for f in FAMILIES}
        cells = " | ".join(f"{rolling[f]:.3f}" for f in FAMILIES)
        frauds = r["single"]["test_frauds"]
        lines.append(f"| {r['data']} | {frauds} | {split} | {cells} | {_order(rolling)} |")
    _, synthetic = _split_real(rows)
    if synthetic:
        means = {
            p: {f: float(np.mean([_ap(r, f, p) for r in synthetic])) for f in FAMILIES}
            for p in ("single", "rolling")
        }
        split = " | ".join(f"{means['single'][f]:.3f}" for f in FAMILIES)
        cells = " | ".join(f"**{means['rolling'][f]:.3f}**" for f in FAMILIES)
        lines.append(
            f"| **synthetic, mean of {len(synthetic)} seeds** | | {split} | {cells} "
            f"| {_order(means['rolling'])} |"
        )
    return lines


def verdict(rows: list[dict]) -> list[str]:
    """Per protocol: each synthetic seed, then the mean over seeds, against the real day.
    One seed is one draw of about 100 test frauds, so the mean is the criterion."""
    real, synthetic = _split_real(rows)
    if real is None or not synthetic:
        return []
    out = []
    for protocol, label in (("single", "time split"), ("rolling", "rolling")):
        truth = {f: _ap(real, f, protocol) for f in FAMILIES}
        cases = [(r["data"], {f: _ap(r, f, protocol) for f in FAMILIES}) for r in synthetic]
        means = {f: float(np.mean([aps[f] for _, aps in cases])) for f in FAMILIES}
        cases.append((f"mean of {len(synthetic)} synthetic seeds", means))
        for name, aps in cases:
            gaps = ", ".join(f"{f} {aps[f] - truth[f]:+.3f}" for f in FAMILIES)
            same = "same order" if _order(aps) == _order(truth) else "order differs"
            near = all(abs(aps[f] - truth[f]) <= 0.05 for f in FAMILIES)
            out.append(
                f"- {label}, {name} vs real: {same}, "
                f"{'all' if near else 'not all'} within 0.05 (AP minus real: {gaps})"
            )
    return out


def render(rows: list[dict]) -> str:
    """docs/benchmarks/ranking.md from what main() measured (bench/results/ranking.json)."""
    head = [
        "<!-- Written by `make bench-ranking` (bench/ranking.py); figures in "
        "bench/results/ranking.json. Rerun the benchmark instead of editing. -->",
        "# Family ranking benchmark: latest run",
        "",
        "Protocols and reading: [benchmarks](../benchmarks.md#family-ranking).",
        "",
    ]
    return "\n".join(head + table(rows) + [""] + verdict(rows)) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="42,7,11,3,5", help="synthetic generator seeds")
    parser.add_argument("--folds", type=int, default=4, help="forward-chaining folds")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    rows = []
    if REAL_DAY1.is_file():
        rows.append(measure("real day 1", pd.read_parquet(REAL_DAY1), params, args.folds))
    else:
        print(f"skipping the real data: {REAL_DAY1} is absent")
    for seed in (int(s) for s in args.seeds.split(",")):
        cfg = dict(params["data"]["synthetic"], seed=seed)
        rows.append(
            measure(f"synthetic seed {seed}", generate_from_params(cfg), params, args.folds)
        )
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "ranking.json").write_text(json.dumps(rows, indent=2) + "\n")
    doc = DOC if args.output.resolve() == RESULTS else args.output / DOC.name
    doc.write_text(render(rows))
    print(render(rows))


if __name__ == "__main__":
    main()
