"""The environment every fraudops process runs with, written once: telemetry off, and the
MLflow store and BentoML home inside the project unless the user has set them.

Read by configure_environment() (stages, the batch job, the served check), by the tests'
and benches' scratch checkouts (their own stores), and by the Makefile, which runs
`python -m stages.lib.environment` and passes what it prints to every command.
Light on purpose (standard library only): the Makefile calls it before each command.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

TELEMETRY_OFF = {
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "BENTOML_DO_NOT_TRACK": "true",
    "GIT_PYTHON_REFRESH": "quiet",  # MLflow's git lookup: no warning outside a git checkout
}


def stores(root: Path) -> dict[str, str]:
    """The MLflow tracking store and BentoML home kept under `root`."""
    return {
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "BENTOML_HOME": str(root / "bentoml_home"),
    }


def project_env(root: Path, current: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Telemetry off and `root`'s stores, except where `current` already sets a value."""
    return {k: current.get(k, v) for k, v in {**TELEMETRY_OFF, **stores(root)}.items()}


def main() -> None:
    for key, value in project_env(Path.cwd().resolve()).items():
        print(f"{key}={value}")


if __name__ == "__main__":
    main()
