"""MLflow Model Registry: register a gated model as `candidate`, promote to `champion`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

log = logging.getLogger("fraudops.registry")


def register_and_promote(
    model_uri: str,
    name: str,
    candidate_score: float,
    score_champion: Callable[[Any], float],
    tags: dict[str, str],
) -> dict:
    """Register `model_uri`, alias it `candidate`, and move `champion` to it only if it
    beats the current champion re-scored by `score_champion` on the same test data."""
    client = MlflowClient()
    version = mlflow.register_model(model_uri, name, tags=tags).version
    client.set_registered_model_alias(name, "candidate", version)
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        champion = None
    champion_score = None
    if champion is not None and champion.version != version:
        champion_model = mlflow.sklearn.load_model(f"models:/{name}@champion")
        champion_score = float(score_champion(champion_model))
    promoted = champion is None or (champion_score is not None and candidate_score > champion_score)
    if promoted:
        client.set_registered_model_alias(name, "champion", version)
    outcome = {
        "registered_model": name,
        "version": int(version),
        "candidate_average_precision": candidate_score,
        "previous_champion_version": int(champion.version) if champion else None,
        "previous_champion_average_precision": champion_score,
        "promoted_to_champion": promoted,
    }
    log.info(
        "registered %s v%s as candidate; champion %s",
        name,
        version,
        "moved to it"
        if promoted
        else f"stays v{champion.version} "
        f"(AP {champion_score:.4f} >= {candidate_score:.4f} on this test data)",
    )
    return outcome
