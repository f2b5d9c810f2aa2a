"""prepare: the raw transactions (synthetic by default, or the user's file), validated;
with data.feedback, the labelled decisions (make export-labels) after them in time order,
the newest data.recent_days of those held out for evaluate."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from stages.lib import feedback
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
from stages.lib.splitting import rows_needed_per_class
from stages.lib.validation import DataValidationError, ValidationReport, read_table, validate

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


def check_splittable(report: ValidationReport, params: dict) -> None:
    """Refuse data too small for split and train here, in one line, rather than with a
    traceback two stages later. The few split and train keys this reads are declared in
    prepare's `params:` in dvc.yaml, so changing them reruns this check."""
    split, train = params["split"], params["train"]
    settings = {
        "split.strategy": split["strategy"],
        "split.valid_size": float(split["valid_size"]),
        "split.test_size": float(split["test_size"]),
        "train.search.folds": int(train["search"]["folds"]),
        "train.calibration_folds": int(train["calibration_folds"]),
    }
    need = rows_needed_per_class(*settings.values())
    legit = report.rows_out - report.frauds
    if min(report.frauds, legit) < need:
        given = ", ".join(f"{k} {v}" for k, v in settings.items())
        raise DataValidationError(
            "too-small",
            f"split and train need at least {need} frauds and {need} legitimate rows "
            f"({given}); the data has {report.rows_out} rows: {report.frauds} fraud(s), "
            f"{legit} legitimate",
        )


def with_feedback(
    clean: pd.DataFrame, data: dict, folder: Path
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The source rows plus the older labelled decisions, the newest ones held out (the
    recent window evaluate judges on), and the counts; with data.feedback off, the source
    rows and an empty window."""
    counts = dict.fromkeys(("feedback_rows", "feedback_frauds", "recent_rows", "recent_frauds",
                            "dropped_as_in_window"), 0)  # fmt: skip
    if not data["feedback"]:
        return clean, clean.iloc[:0], counts
    labelled = feedback.read_folder(folder)
    if labelled.empty:
        raise DataValidationError(
            "feedback", f"data.feedback is true but {folder}/ holds no labelled decisions "
            "(make export-labels writes them)",
        )  # fmt: skip
    rows = feedback.in_time_order(labelled, clean["Time"].max())
    # The features' rules only: the labels came from /feedback as booleans, and one
    # export may hold a single class (the source supplies the other).
    features, _ = validate(rows.drop(columns="Class"), duplicates="keep", require_target=False)
    rows = features.assign(Class=rows["Class"].to_numpy())
    held = feedback.newest(labelled, float(data["recent_days"]))
    recent = rows[held].reset_index(drop=True)
    training = pd.concat([clean, rows[~held]], ignore_index=True)
    seen = feedback.same_transaction(training, recent)  # a row scored twice, or from the source
    training = training[~seen].reset_index(drop=True)
    counts.update(feedback_rows=int((~held).sum()), feedback_frauds=int(rows[~held]["Class"].sum()),
                  recent_rows=len(recent), recent_frauds=int(recent["Class"].sum()),
                  dropped_as_in_window=int(seen.sum()))  # fmt: skip
    log.info("feedback: %d labelled decisions appended (%d frauds), the newest %d held out "
             "(%d frauds); %d training rows dropped as the same transactions as the held-out "
             "ones", *counts.values())  # fmt: skip
    return training, recent, counts


def main() -> None:
    paths = stage_paths(__doc__, "raw", "feedback", "out", "recent", "report")
    setup_logging()
    params = stage_params("prepare")
    with stage_timer("prepare"):
        try:
            raw, origin = load_source(params["data"], paths.raw)
            clean, report = validate(raw, duplicates=params["data"]["duplicates"])
            clean, recent, added = with_feedback(clean, params["data"], paths.feedback)
            report.rows_out, report.frauds = len(clean), int(clean["Class"].sum())
            check_splittable(report, params)
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
        with atomic_path(paths.recent) as tmp:
            recent.to_parquet(tmp, index=False)
        write_json(
            paths.report,
            {**asdict(report), **added, "source": origin,
             "fraud_rate": report.frauds / report.rows_out},
        )  # fmt: skip


if __name__ == "__main__":
    main()
