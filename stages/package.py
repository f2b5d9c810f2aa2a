"""package: the model and its contract into the BentoML store, built into a Bento, exported.

The exported archive under models/ is the DVC output, so the served artifact is hashed in
dvc.lock like every other stage's output.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import joblib
import pandas as pd

from stages.lib.contract import build_contract
from stages.lib.modeling import fraud_probability
from stages.lib.project import (
    atomic_path,
    configure_environment,
    file_md5,
    flatten,
    git_commit,
    load_params,
    setup_logging,
    stage_timer,
    workspace_root,
    write_json,
)

log = logging.getLogger("fraudops.package")
MODEL = Path("models/model.joblib")
REGISTRY = Path("models/registry.json")
METRICS = Path("metrics/evaluate.json")
CONTRACT = Path("models/contract.json")
BENTO_ARCHIVE = Path("models/fraud_scoring.bento")
BENTO_INFO = Path("models/bento.json")
SERVING_DIR = Path("serving")


def main() -> None:
    setup_logging()
    configure_environment()
    import bentoml
    import mlflow

    from stages.lib.tracking import resume_run

    params = load_params()
    cfg = params["package"]
    with stage_timer("package"):
        model = joblib.load(MODEL)
        registry = json.loads(REGISTRY.read_text())
        metrics = json.loads(METRICS.read_text())
        train = pd.read_parquet("data/split/train.parquet")
        valid = pd.read_parquet("data/split/valid.parquet")
        lineage = {
            "data_md5": file_md5("data/prepared/transactions.parquet"),
            "train_data_md5": file_md5("data/split/train.parquet"),
            "git_commit": git_commit(),
            "dvc_exp_name": os.environ.get("DVC_EXP_NAME"),
            "mlflow_run_id": registry["run_id"],
            "registered_model": registry["registered_model"],
            "model_version": registry["version"],
            "champion": registry["promoted_to_champion"],
            "model_family": params["train"]["model"],
            "params": flatten({k: params[k] for k in ("data", "split", "train", "evaluate")}),
        }
        contract = build_contract(
            train, valid, fraud_probability(model, valid), registry, metrics, lineage, cfg
        )

        labels = {
            "registered_model": registry["registered_model"],
            "model_version": str(registry["version"]),
            "git_commit": lineage["git_commit"][:40],
        }
        with bentoml.models.create(
            cfg["model_name"],
            labels=labels,
            metadata={"threshold": contract["threshold"], "mlflow_run_id": registry["run_id"]},
        ) as stored:
            joblib.dump(model, stored.path_of("model.joblib"))
            Path(stored.path_of("contract.json")).write_text(json.dumps(contract, indent=2))
        log.info("model stored as %s", stored.tag)

        # The service reads which model to bind from this variable when the Bento is built.
        os.environ["FRAUD_MODEL_TAG"] = str(stored.tag)
        bento = bentoml.bentos.build_bentofile(
            bentofile=str(workspace_root() / SERVING_DIR / "bentofile.yaml"),
            build_ctx=str(workspace_root() / SERVING_DIR),
            labels=labels,
        )
        log.info("bento built: %s", bento.tag)
        with atomic_path(BENTO_ARCHIVE) as tmp:
            exported = bentoml.bentos.export_bento(bento.tag, str(tmp.resolve()))
            os.replace(exported, tmp)
        write_json(CONTRACT, contract)
        write_json(
            BENTO_INFO,
            {
                "bento": str(bento.tag),
                "model": str(stored.tag),
                "archive": str(BENTO_ARCHIVE),
                "model_version": registry["version"],
            },
        )
        with resume_run(registry["run_id"]):
            mlflow.set_tags({"bento_tag": str(bento.tag), "bento_model_tag": str(stored.tag)})
            mlflow.log_dict(contract, "contract.json")


if __name__ == "__main__":
    main()
