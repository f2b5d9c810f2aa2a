"""A bounded demo load for the dashboard: mixed batch sizes, a few bad requests, and a
drifted population at the end. Loopback only; stops after --minutes.

    python monitoring/demo_load.py --url http://127.0.0.1:3000 --minutes 3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import requests

from stages.lib.project import pipeline_path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--minutes", type=float, default=3.0)
    args = parser.parse_args()
    rows = pd.read_parquet(pipeline_path("split", ROOT) / "test.parquet").drop(columns="Class")
    rng = np.random.default_rng(0)
    end = time.monotonic() + args.minutes * 60
    drift_from = time.monotonic() + args.minutes * 60 * 0.7
    sent = 0
    while time.monotonic() < end:
        size = int(rng.choice([1, 1, 1, 10, 100, 1000, 5000]))
        batch = rows.sample(size, random_state=int(rng.integers(1 << 31)))
        if time.monotonic() > drift_from:  # the last 30%: a shifted, fraud-like population
            batch = batch.assign(V14=batch["V14"] - 4, V12=batch["V12"] - 4)
        if size >= 1000:
            response = requests.post(
                f"{args.url}/predict_file",
                timeout=120,
                files={"file": ("b.csv", batch.to_csv(index=False))},
            )
        else:
            response = requests.post(
                f"{args.url}/predict",
                timeout=60,
                json={"transactions": batch.to_dict(orient="records")},
            )
        sent += size * (response.status_code == 200)
        if rng.random() < 0.1:
            requests.post(f"{args.url}/predict", json={"transactions": []}, timeout=10)
        time.sleep(float(rng.uniform(0.05, 0.5)))
    print(f"sent {sent} rows")


if __name__ == "__main__":
    main()
