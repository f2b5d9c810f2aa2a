"""MLflow Model Registry: register a gated model as `candidate`, promote to `champion`.

A model is known by the md5 of its file (tag `model_md5` on the run, the logged model and
the registered version), so the same file is registered once however often the pipeline
reruns, and package can check that the registry's champion is the file evaluate chose.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import LoggedModel
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from serving.contract import Contract, ContractError
from stages.lib.project import file_md5
from stages.lib.tracking import MODEL_ARTIFACT

log = logging.getLogger("fraudops.registry")


@dataclass
class RegistryOutcome:
    registered_model: str
    candidate_version: int
    candidate_md5: str
    champion_version: int
    champion_md5: str
    champion_run_id: str
    promoted: bool
    previous_champion_version: int | None
    previous_champion_score: float | None
    champion_model: Any = None  # the champion's model, when it was re-scored and stays

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "champion_model"}


def _alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def champion_version(name: str) -> ModelVersion | None:
    """`name@champion` as the registry has it now, or None when it has no such alias."""
    return _alias(MlflowClient(), name, "champion")


def version_for(name: str, md5: str) -> ModelVersion | None:
    """The registered version holding this model file (one per md5, see _register)."""
    try:
        found = MlflowClient().search_model_versions(
            f"name = '{name}' and tags.model_md5 = '{md5}'"
        )
    except MlflowException:  # the registered model does not exist
        return None
    return max(found, key=lambda v: int(v.version)) if found else None


def _register(client: MlflowClient, model: LoggedModel, name: str, md5: str) -> ModelVersion:
    """The version holding this file, registering it only if no version does yet."""
    try:
        same = client.search_model_versions(f"name = '{name}' and tags.model_md5 = '{md5}'")
    except MlflowException:  # the registered model does not exist yet
        same = []
    if same:
        return max(same, key=lambda v: int(v.version))
    return mlflow.register_model(f"models:/{model.model_id}", name, tags={"model_md5": md5})


@dataclass
class _Verdict:
    promoted: bool
    reason: str
    champion_model: Any = None
    champion_score: float | None = None


def _judge(
    champion: ModelVersion | None,
    name: str,
    model_md5: str,
    candidate_score: float,
    score_champion: Callable[[Any], float],
    basis: str,
) -> _Verdict:
    """Whether the candidate takes `champion`'s place, and why. Only a champion that is
    another content-addressed file is loaded and re-scored."""
    champion_md5 = champion.tags.get("model_md5") if champion else None
    if champion is None:
        return _Verdict(True, "there was no champion")
    if champion_md5 == model_md5:
        return _Verdict(False, "it already is the champion")
    if champion_md5 is None:
        return _Verdict(True, f"champion v{champion.version} predates content-addressed models")
    from stages.lib.modeling import load_model  # scikit-learn: only when scoring one

    champion_model = load_model(download_model(name, "champion", champion_md5))
    champion_score = float(score_champion(champion_model))
    promoted = candidate_score > champion_score
    reason = (
        f"AP {candidate_score:.4f} {'>' if promoted else '<='} champion "
        f"v{champion.version}'s {champion_score:.4f} on {basis}"
    )
    return _Verdict(promoted, reason, None if promoted else champion_model, champion_score)


def register_and_promote(
    model: LoggedModel,
    name: str,
    model_md5: str,
    candidate_score: float,
    score_champion: Callable[[Any], float],
    basis: str = "this test data",
) -> RegistryOutcome:
    """Alias the model `candidate`; move `champion` to it only if it beats the current
    champion re-scored by `score_champion` on the same rows (`basis` names them)."""
    client = MlflowClient()
    candidate = _register(client, model, name, model_md5)
    client.set_registered_model_alias(name, "candidate", candidate.version)
    champion = _alias(client, name, "champion")
    verdict = _judge(champion, name, model_md5, candidate_score, score_champion, basis)
    if verdict.promoted:
        client.set_registered_model_alias(name, "champion", candidate.version)
    served = candidate if verdict.promoted or champion is None else champion
    log.info(
        "%s v%s is the candidate; champion %s (%s)",
        name,
        candidate.version,
        f"moved to v{candidate.version}" if verdict.promoted else f"stays v{served.version}",
        verdict.reason,
    )
    return RegistryOutcome(
        registered_model=name,
        candidate_version=int(candidate.version),
        candidate_md5=model_md5,
        champion_version=int(served.version),
        champion_md5=served.tags.get("model_md5", model_md5),
        champion_run_id=served.run_id,
        promoted=verdict.promoted,
        previous_champion_version=int(champion.version) if champion else None,
        previous_champion_score=verdict.champion_score,
        champion_model=verdict.champion_model,
    )


def download_model(name: str, alias: str, expected_md5: str) -> Path:
    """The model file behind `models:/name@alias`, checked against the md5 that the DVC
    chain recorded (so a moved alias cannot swap the model under a finished evaluate)."""
    client = MlflowClient()
    version = _alias(client, name, alias)
    if version is None:
        raise LookupError(f"registered model '{name}' has no '{alias}' alias")
    if version.tags.get("model_md5") != expected_md5:
        raise LookupError(
            f"'{name}@{alias}' is v{version.version} with md5 "
            f"{version.tags.get('model_md5')}, not {expected_md5} as the pipeline recorded; "
            "the alias moved since evaluate ran: run `dvc repro` again"
        )
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@{alias}")) / MODEL_ARTIFACT
    if file_md5(local) != expected_md5:
        raise LookupError(f"the registry's file for '{name}@{alias}' does not match its md5 tag")
    return local


CONTRACT_TAG = "contract"  # a version's tag: the run artifact holding its serving contract


def tag_version(
    name: str,
    md5: str,
    tags: dict[str, str],
    metrics: dict[str, float] | None = None,
    contract: bytes | None = None,
) -> None:
    """Tag the registered version of this model file; log `metrics` to its run. A serving
    `contract` goes to the run too (named by its md5: a new contract for the same model
    adds a file) and the version's CONTRACT_TAG points at it, so a job scoring from the
    registry (batch/) checks rows exactly as the service does. It is also added to the
    version's logged model as MODEL_CONTRACT, where the model's pyfunc flavor reads it
    (serving/mlflow_model.py): `mlflow models serve` then answers like the service."""
    client = MlflowClient()
    path = contract and f"contracts/{hashlib.md5(contract).hexdigest()}.json"
    for version in client.search_model_versions(f"name = '{name}' and tags.model_md5 = '{md5}'"):
        if contract:
            client.log_text(version.run_id, contract.decode(), path)
            _attach_contract(client, version, contract)
            client.set_model_version_tag(name, version.version, CONTRACT_TAG, path)
        for key, value in tags.items():
            client.set_model_version_tag(name, version.version, key, value)
        for key, value in (metrics or {}).items():
            client.log_metric(version.run_id, key, value)


@dataclass(frozen=True)
class RegisteredModel:
    """A registered version's model file and serving contract, both checked by md5."""

    name: str
    version: int
    md5: str
    model_file: Path
    contract: Contract


def resolve(uri: str) -> RegisteredModel:
    """`models:/name@alias` or `models:/name/version` to its checked model and contract."""
    match = re.fullmatch(r"models:/([^/@]+)(?:@([\w-]+)|/(\d+))", uri)
    if match is None:
        raise LookupError(f"'{uri}' is not models:/<name>@<alias> or models:/<name>/<version>")
    name, alias, number = match.groups()
    client = MlflowClient()
    try:
        version = (
            client.get_model_version_by_alias(name, alias)
            if alias
            else client.get_model_version(name, number)
        )
    except MlflowException as exc:
        raise LookupError(f"{uri}: not in the registry at {mlflow.get_tracking_uri()}") from exc
    md5, contract_path = version.tags.get("model_md5"), version.tags.get(CONTRACT_TAG)
    if md5 is None or contract_path is None:
        raise LookupError(
            f"{name} v{version.version} has no serving contract: only a version the package "
            "stage has built a Bento for can be scored (run `dvc repro` with it as champion)"
        )
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}"))
    if file_md5(folder / MODEL_ARTIFACT) != md5:
        raise LookupError(f"the registry's file for {name} v{version.version} fails its md5")
    # The copy in the model's folder is what its pyfunc serves; versions packaged before
    # it was attached there have the run's copy only.
    local = folder / MODEL_CONTRACT
    if not local.is_file():
        local = Path(
            mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=contract_path)
        )
    if f"contracts/{file_md5(local)}.json" != contract_path:
        raise LookupError(f"the contract of {name} v{version.version} fails its md5")
    try:
        contract = Contract.read(local)
    except ContractError as exc:
        raise LookupError(f"{name} v{version.version}: {exc}") from None
    return RegisteredModel(name, int(version.version), md5, folder / MODEL_ARTIFACT, contract)


MODEL_CONTRACT = "contract.json"  # serving/mlflow_model.py's CONTRACT_FILE


def _attach_contract(client: MlflowClient, version: ModelVersion, contract: bytes) -> None:
    """Add the contract to the logged model behind `version` (MLflow 3 logged models have
    their own artifact location, which the version's downloads read). Replaces an
    earlier package run's contract for the same model, as the version's tag moves."""
    model_id = _logged_model_id(version)
    if model_id is None:
        return
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / MODEL_CONTRACT
        local.write_bytes(contract)
        client.log_model_artifact(model_id, str(local))


def _logged_model_id(version: ModelVersion) -> str | None:
    # The registry leaves ModelVersion.model_id empty; a version registered from a logged
    # model (register_and_promote's `models:/<model id>`) has it as its source.
    match = re.fullmatch(r"models:/(m-[0-9a-f]+)", version.source or "")
    if match is None:
        log.warning("%s v%s (source %s) has no logged model to attach serving files to",
                    version.name, version.version, version.source)  # fmt: skip
    return match and match.group(1)


def attach_scoring_code(name: str, md5: str, files: list[Path]) -> None:
    """Replace the serving modules in the code/serving/ folder of the logged model behind
    each version of this model file (the pyfunc flavor imports them from there). A
    version keeps the logged model it was registered from, whose code is that of the
    first run that logged this file; the package stage brings it up to date."""
    client = MlflowClient()
    for version in client.search_model_versions(f"name = '{name}' and tags.model_md5 = '{md5}'"):
        model_id = _logged_model_id(version)
        if model_id is None:
            continue
        with tempfile.TemporaryDirectory() as scratch:
            code = Path(scratch) / "serving"
            code.mkdir()
            for file in files:
                shutil.copyfile(file, code / file.name)
            client.log_model_artifacts(model_id, scratch, artifact_path="code")


def training_run(name: str, md5: str) -> dict[str, dict]:
    """The metrics and tags of the run that trained this registered model file (for its
    model card); empty when the registry has no version of it."""
    version = version_for(name, md5)
    if version is None:
        return {"metrics": {}, "tags": {}}
    run = MlflowClient().get_run(version.run_id)
    return {"metrics": dict(run.data.metrics), "tags": dict(run.data.tags)}


CARD_FOLDER = "model_card"  # in the version's run, beside contracts/


def attach_model_card(name: str, md5: str, card_json: bytes, card_md: bytes) -> None:
    """The model card on every registered version of this model file: both files in its
    run (model_card/), the Markdown as the version's description (what the MLflow UI shows
    for the version) and its md5 as a tag."""
    from serving.contract import CARD_JSON, CARD_MD

    client = MlflowClient()
    for version in client.search_model_versions(f"name = '{name}' and tags.model_md5 = '{md5}'"):
        client.log_text(version.run_id, card_json.decode(), f"{CARD_FOLDER}/{CARD_JSON}")
        client.log_text(version.run_id, card_md.decode(), f"{CARD_FOLDER}/{CARD_MD}")
        client.update_model_version(name, version.version, description=card_md.decode())
        client.set_model_version_tag(name, version.version, "model_card_md5",
                                     hashlib.md5(card_json).hexdigest())  # fmt: skip
