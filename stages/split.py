"""split: train / validation / test, by time (the honest fraud protocol) or stratified."""

from __future__ import annotations

import logging

import pandas as pd

from stages.lib.project import (
    atomic_path,
    setup_logging,
    stage_params,
    stage_paths,
    stage_timer,
    write_json,
)
from stages.lib.schema import TARGET
from stages.lib.splitting import SplitError, split_frame

log = logging.getLogger("fraudops.split")


def main() -> None:
    paths = stage_paths(__doc__, "data", "out", "report")
    setup_logging()
    cfg = stage_params("split")["split"]
    with stage_timer("split"):
        frame = pd.read_parquet(paths.data)
        try:
            parts = split_frame(
                frame,
                strategy=cfg["strategy"],
                valid_size=float(cfg["valid_size"]),
                test_size=float(cfg["test_size"]),
                seed=int(cfg["seed"]),
            )
        except SplitError as exc:
            log.error("split stopped: %s", exc)
            raise SystemExit(1) from None
        report = {}
        for name, part in parts.items():
            with atomic_path(paths.out / f"{name}.parquet") as tmp:
                part.to_parquet(tmp, index=False)
            frauds = int(part[TARGET].sum())
            report[name] = {
                "rows": len(part),
                "frauds": frauds,
                "fraud_rate": frauds / len(part),
                "time_min": float(part["Time"].min()),
                "time_max": float(part["Time"].max()),
            }
            log.info(
                "%-5s %7d rows, %4d frauds (%.3f%%)",
                name,
                len(part),
                frauds,
                100 * frauds / len(part),
            )
        write_json(paths.report, report)


if __name__ == "__main__":
    main()
