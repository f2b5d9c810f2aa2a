"""prepare: the raw transactions (synthetic by default, or the user's file), validated."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from stages.lib.project import (
    atomic_path,
    file_md5,
    setup_logging,
    stage_params,
    stage_paths,
    stage_timer,
    workspace_root,
    write_json,
)
from stages.lib.validation import DataValidationError, read_table, validate

log = logging.getLogger("fraudops.prepare")


def load_source(data: dict, raw_dir: Path) -> tuple[pd.DataFrame, str]:
    """Return the raw frame and a description of where it came from."""
    source = str(data["source"])
    if source == "synthetic":
        from stages.lib.synthetic import generate_from_params

        return generate_from_params(data["synthetic"]), "synthetic"
    path = (workspace_root() / source).resolve()
    # Only files under data/raw/ are a DVC dependency of this stage; anything else would
    # change without dvc repro noticing.
    if (workspace_root() / raw_dir).resolve() not in path.parents:
        raise DataValidationError(
            "source",
            f"data.source must be 'synthetic' or a file under {raw_dir}/ "
            f"(so dvc.lock hashes it), got '{source}'",
        )
    log.info("reading %s", path)
    return read_table(path), f"{source} (md5 {file_md5(path)})"


def main() -> None:
    paths = stage_paths(__doc__, "raw", "out", "report")
    setup_logging()
    params = stage_params("prepare")
    with stage_timer("prepare"):
        try:
            raw, origin = load_source(params["data"], paths.raw)
            clean, report = validate(raw, duplicates=params["data"]["duplicates"])
        except DataValidationError as exc:
            log.error("prepare stopped: %s", exc)
            raise SystemExit(1) from None
        log.info(
            "source %s: %d rows in, %d duplicate rows (%s), %d rows out, %d frauds (%.3f%%)",
            origin,
            report.rows_in,
            report.duplicate_rows,
            report.duplicates_policy,
            report.rows_out,
            report.frauds,
            100 * report.frauds / report.rows_out,
        )
        with atomic_path(paths.out) as tmp:
            clean.to_parquet(tmp, index=False)
        write_json(
            paths.report,
            {**asdict(report), "source": origin, "fraud_rate": report.frauds / report.rows_out},
        )


if __name__ == "__main__":
    main()
