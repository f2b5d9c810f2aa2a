"""champion: which model the registry serves now, with its threshold and test metrics.

The registry is state outside the DVC chain: another experiment, or a person in the MLflow
UI, may move `champion` after evaluate ran. So this stage runs on every `dvc repro`
(`always_changed` in dvc.yaml) and asks. Its output, models/champion.json, holds content
only (the champion's md5, threshold, costs, test metrics and lineage): it changes only when
the champion, the costs or the test split do, and only then does package rebuild the
Bento. An unchanged champion costs a few MLflow queries and no model load.

A checkout whose registry does not know the model at all (a teammate's clone that pulled
the artifacts from a DVC remote, with an empty MLflow store) keeps the champion.json it
pulled: that registry cannot say otherwise.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from stages.lib.params import costs
from stages.lib.project import (
    configure_environment,
    file_md5,
    setup_logging,
    stage_params,
    stage_paths,
    stage_timer,
    write_json,
)
from stages.lib.schema import TARGET

log = logging.getLogger("fraudops.champion")
RECORDED_METRICS = ("average_precision", "roc_auc", "brier", "precision", "recall")
RECORD_ORDER = ("registered_model", "model_md5", "model_family", "threshold", "costs")
RECORD_ORDER += ("test_metrics", "lineage")
OOF_ARTIFACT = "oof.parquet"  # the training run's out-of-fold scores (train logs them)


def still_current(held: dict[str, Any] | None, fresh: dict[str, Any]) -> bool:
    """Whether the record on disk already describes this champion, costs and test split,
    with lineage from the same run (so no model needs loading to tell)."""
    if held is None:
        return False
    same = ("registered_model", "model_md5", "costs")
    return all(held.get(k) == fresh[k] for k in same) and held.get("lineage") == fresh["lineage"]


def identity(md5: str, run: Any, cfg: dict, test_md5: str) -> dict[str, Any]:
    """Everything in the champion's record but the threshold and the test metrics."""
    return {
        "registered_model": cfg["registered_model"],
        "model_md5": md5,
        "model_family": run.data.tags.get("model_family"),
        "costs": costs(cfg),
        "lineage": {
            "train_data_md5": run.data.tags.get("train_data_md5"),
            "valid_data_md5": run.data.tags.get("valid_data_md5"),
            "test_data_md5": test_md5,
            "params": dict(sorted(run.data.params.items())),
        },
    }


def scored_record(fresh: dict[str, Any], run: Any, cfg: dict, test_path: Path) -> dict:
    """The champion's threshold (from its own run's out-of-fold scores) and its metrics on
    today's test split, around its identity."""
    import mlflow
    import pandas as pd

    # Only when the champion changed: scikit-learn's import alone costs ~1.5 s, which a
    # no-op `dvc repro` should not pay.
    from stages.lib.evaluation import evaluate_scores
    from stages.lib.modeling import fraud_probability, load_model
    from stages.lib.registry import download_model

    model = load_model(download_model(fresh["registered_model"], "champion", fresh["model_md5"]))
    test = pd.read_parquet(test_path)
    oof = pd.read_parquet(
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=OOF_ARTIFACT)
    )
    threshold, metrics = evaluate_scores(
        oof[TARGET].to_numpy(),
        oof["probability"].to_numpy(),
        test[TARGET].to_numpy(),
        fraud_probability(model, test),
        cfg,
    )
    record = {**fresh, "threshold": threshold}
    record["test_metrics"] = {k: metrics[k] for k in RECORDED_METRICS}
    return {k: record[k] for k in RECORD_ORDER}


def newest_run(md5: str) -> Any:
    """The newest run that trained this model file. The newest, not the one that first
    registered it: when the champion is the model this checkout just trained, that run has
    this checkout's params, so the record is the one a fresh clone with an empty registry
    writes (an older run of the same file may have had other params that do not change the
    model, such as the search's time cap)."""
    import mlflow

    from stages.lib.tracking import logged_model_for

    return mlflow.get_run(logged_model_for(md5).source_run_id)


def main() -> None:
    paths = stage_paths(__doc__, "split", "champion")
    setup_logging()
    configure_environment()
    from stages.lib.registry import champion_version

    cfg = stage_params("champion")["evaluate"]
    name = cfg["registered_model"]
    with stage_timer("champion"):
        held = json.loads(paths.champion.read_text()) if paths.champion.is_file() else None
        version = champion_version(name)
        if version is None:
            if held is None:
                log.error(
                    "the registry has no '%s@champion' and there is no %s", name, paths.champion
                )
                raise SystemExit(1)
            log.warning(
                "the registry has no '%s@champion': keeping %s (md5 %s), as pulled",
                name,
                paths.champion,
                held.get("model_md5"),
            )
            return
        md5 = version.tags.get("model_md5", "")
        run = newest_run(md5)
        fresh = identity(md5, run, cfg, file_md5(paths.split / "test.parquet"))
        if still_current(held, fresh):
            log.info("%s@champion is still v%s (md5 %s)", name, version.version, md5)
            return
        log.info(
            "%s@champion is v%s (md5 %s); was %s",
            name,
            version.version,
            md5,
            held.get("model_md5") if held else "none",
        )
        write_json(paths.champion, scored_record(fresh, run, cfg, paths.split / "test.parquet"))


if __name__ == "__main__":
    main()
