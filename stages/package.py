"""package: the registry's champion and its contract into a Bento, exported as a folder.

The Bento holds the champion's model file exactly as the registry stores it (checked by
md5) and a contract built from content alone. The model and Bento versions are hashes of
what goes in, and creation times in the exported metadata are pinned, so the same
champion, data and serving code give the same bytes (and the same dvc.lock) anywhere.
The real build time and the Bento tag are recorded in MLflow instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from serving.contract import CARD_JSON, CARD_MD, CompiledSpec, Contract, Lineage, Runtime
from serving.sealed import SEAL
from stages.lib.compiled import INPUT, OUTPUT, NotCompilable, compile_model, verify
from stages.lib.contract import build_contract
from stages.lib.modeling import fraud_probability, load_model
from stages.lib.project import (
    configure_environment,
    setup_logging,
    stage_params,
    stage_paths,
    stage_timer,
    workspace_root,
)

log = logging.getLogger("fraudops.package")
BENTOFILE = "bentofile.yaml"
# Like SOURCE_DATE_EPOCH in reproducible builds: a fixed time in the exported metadata.
PINNED_CREATION_TIME = "1970-01-01T00:00:00+00:00"


def content_version(*parts: bytes) -> str:
    """A BentoML version (lowercase, <= 63 chars) naming exactly these bytes."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:20]


def source_bytes(serving: Path) -> bytes:
    """Every file the Bento build reads from the serving folder, in a stable order."""
    names = sorted(
        p.relative_to(serving).as_posix()
        for p in serving.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    return b"".join(name.encode() + b"\0" + (serving / name).read_bytes() for name in names)


def _pin(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: PINNED_CREATION_TIME if k == "creation_time" else _pin(v) for k, v in node.items()
        }
    if isinstance(node, list):
        return [_pin(v) for v in node]
    return node


def pin_creation_times(bento_dir: Path) -> None:
    """Replace every build-time stamp in the exported bento.yaml and model.yaml files."""
    for meta in [bento_dir / "bento.yaml", *bento_dir.glob("models/*/*/model.yaml")]:
        meta.write_text(yaml.safe_dump(_pin(yaml.safe_load(meta.read_text())), sort_keys=False))


def decade_ceiling(value: float) -> float:
    """The smallest power of ten at or above `value` (0 stays 0): 3.3e-16 -> 1e-15."""
    return 0.0 if value <= 0 else float(f"1e{math.ceil(math.log10(value))}")


class CompiledMismatch(RuntimeError):
    """The compiled model does not score like scikit-learn: refuse to ship it."""


def compiled_runtime(
    model: Any, rows: pd.DataFrame, threshold: float, tolerance: float
) -> tuple[bytes | None, Runtime]:
    """The model compiled to ONNX and checked on `rows` (validation + test), or None with
    the reason when this model has no compiled form (then scikit-learn serves it)."""
    try:
        compiled = compile_model(model).SerializeToString()
    except NotCompilable as exc:
        log.warning("no compiled runtime for this model (%s): serving uses scikit-learn", exc)
        return None, Runtime(default="sklearn", reason=str(exc))
    check = verify(model, compiled, rows, threshold, tolerance)
    log.info(
        "compiled model vs scikit-learn on %d rows: max |difference| %.3g, %d decisions flip",
        check["rows_checked"],
        check["max_abs_difference"],
        check["flipped_decisions"],
    )
    if not check["ok"]:
        raise CompiledMismatch(
            f"the compiled model differs from scikit-learn on {check['rows_checked']} rows: "
            f"max |difference| {check['max_abs_difference']:.3g} (tolerance "
            f"{tolerance:g}), {check['flipped_decisions']} decisions flip at the threshold"
        )
    # md5: the service refuses to start on a file that is not this one (corrupt or swapped)
    md5 = hashlib.md5(compiled).hexdigest()
    # The exact maximum depends on the CPU's ONNX Runtime kernels (AVX2 and AVX-512 ones
    # differ in the last bits); the contract, hashed into the Bento, keeps its power-of-ten
    # ceiling, which says the same to a reader and is the same on every machine.
    check["max_abs_difference"] = decade_ceiling(check["max_abs_difference"])
    spec = CompiledSpec(file="model.onnx", md5=md5, input=INPUT, output=OUTPUT, **check)
    return compiled, Runtime(default="onnx", onnx=spec)


def build_contract_for(
    model: Any, champion: dict[str, Any], split: Path, cfg: dict[str, Any]
) -> tuple[Contract, bytes | None]:
    """The champion's contract, with its compiled model checked on valid + test."""
    train = pd.read_parquet(split / "train.parquet")
    valid = pd.read_parquet(split / "valid.parquet")
    # Drift reference: the test split, the only rows the model was not fitted on (it
    # is refitted on train + valid); evaluate has already used it, nothing learns from it.
    test = pd.read_parquet(split / "test.parquet")
    compiled, runtime = compiled_runtime(
        model,
        pd.concat([valid, test], ignore_index=True),
        float(champion["threshold"]),
        float(cfg["compiled_tolerance"]),
    )
    scores = fraud_probability(model, test)
    return build_contract(train, test, scores, champion, cfg, runtime), compiled


def model_card_for(
    model: Any, model_file: Path, contract: Contract, split: Path
) -> dict[str, bytes]:
    """model_card.json and model_card.md (stages/lib/model_card.py) of the champion."""
    from stages.lib import model_card
    from stages.lib.registry import training_run

    lineage = contract.lineage
    test = pd.read_parquet(split / "test.parquet")
    budget = int(stage_params("evaluate")["evaluate"]["review_budget"])
    run = training_run(lineage.registered_model, lineage.model_md5)
    card = model_card.build(contract, model_file, split, fraud_probability(model, test), run,
                            budget)  # fmt: skip
    return {CARD_JSON: model_card.to_json(card), CARD_MD: model_card.to_markdown(card).encode()}


def store_model(tag_name: str, model_file: Path, contract: Contract, compiled: bytes | None,
                card: dict[str, bytes]) -> Any:  # fmt: skip
    """The BentoML model of these exact bytes (its version is their hash), made once."""
    import bentoml
    from bentoml.exceptions import NotFound

    contract_bytes = contract.to_json()
    files = {"model.pkl": model_file.read_bytes(), "contract.json": contract_bytes, **card}
    if compiled is not None:
        files[contract.runtime.onnx.file] = compiled
    # model.yaml pins every file the service loads (serving/sealed.py checks it first).
    seal = {name: hashlib.md5(data).hexdigest() for name, data in files.items()}
    tag = f"{tag_name}:" + content_version(*files.values(), SEAL.encode())
    try:
        return bentoml.models.get(tag)
    except NotFound:
        pass
    lineage = contract.lineage
    with bentoml.models.create(
        tag,
        labels={"registered_model": lineage.registered_model, "model_md5": lineage.model_md5},
        metadata={"threshold": contract.threshold, SEAL: seal},
    ) as stored:
        for name, data in files.items():
            Path(stored.path_of(name)).write_bytes(data)
    return stored


def build_bento(serving: Path, model_tag: str, lineage: Lineage) -> Any:
    """The Bento of this serving code around this model, built from the repository root
    so its src/ holds the serving package under its own name."""
    import bentoml
    from bentoml.exceptions import NotFound

    args = {"model_tag": model_tag}
    version = content_version(source_bytes(serving), json.dumps(args, sort_keys=True).encode())
    try:
        return bentoml.bentos.get(f"fraud_scoring:{version}")
    except NotFound:
        return bentoml.bentos.build_bentofile(
            bentofile=str(serving / BENTOFILE),
            build_ctx=str(serving.parent),
            version=version,
            labels={"registered_model": lineage.registered_model, "model_md5": lineage.model_md5},
            args=args,
        )


def export_folder(bento_tag: Any, out: Path) -> None:
    """The Bento as a folder at `out`, replaced whole (never half-written)."""
    import bentoml

    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    bentoml.bentos.export_bento(bento_tag, str(staging), output_format="folder")
    pin_creation_times(staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def record_in_registry(contract: Contract, bento: Any, stored: Any, serving: Path,
                       card: dict[str, bytes]) -> None:  # fmt: skip
    """Tag the registered version with what serves it, and attach the contract, the model
    card and this Bento's scoring code to it."""
    from serving.mlflow_model import SHIPPED
    from stages.lib.registry import attach_model_card, attach_scoring_code, tag_version

    name, md5 = contract.lineage.registered_model, contract.lineage.model_md5
    check = contract.runtime.onnx
    tag_version(
        name,
        md5,
        {
            "bento_tag": str(bento.tag),
            "bento_model_tag": str(stored.tag),
            "runtime": contract.runtime.default,
        },
        {
            f"compiled_{k}": float(getattr(check, k))
            for k in ("max_abs_difference", "flipped_decisions", "rows_checked")
        }
        if check
        else {},
        # The contract travels with the registered version too: batch jobs score from
        # the registry (batch/score.py) and check rows as this Bento's service does.
        contract=contract.to_json(),
    )
    # The version's pyfunc runs this Bento's serving code, not that of the run that
    # first logged this model file (a retrained identical file keeps its version).
    attach_scoring_code(name, md5, [serving / file for file in SHIPPED])
    attach_model_card(name, md5, card[CARD_JSON], card[CARD_MD])


def main() -> None:
    paths = stage_paths(__doc__, "champion", "split", "serving", "out")
    setup_logging()
    configure_environment()
    from stages.lib.registry import download_model

    cfg = stage_params("package")["package"]
    with stage_timer("package"):
        champion = json.loads(paths.champion.read_text())
        name, md5 = champion["registered_model"], champion["model_md5"]
        model_file = download_model(name, "champion", md5)
        model = load_model(model_file)
        contract, compiled = build_contract_for(model, champion, paths.split, cfg)
        card = model_card_for(model, model_file, contract, paths.split)
        stored = store_model(cfg["model_name"], model_file, contract, compiled, card)
        log.info("champion %s (md5 %s) stored as %s", name, md5, stored.tag)
        serving = (workspace_root() / paths.serving).resolve()
        bento = build_bento(serving, str(stored.tag), contract.lineage)
        log.info("bento %s", bento.tag)
        export_folder(bento.tag, (workspace_root() / paths.out).resolve())
        record_in_registry(contract, bento, stored, serving, card)


if __name__ == "__main__":
    main()
