"""Shared helpers: the project root, free loopback ports, and real server processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from stages.lib.project import copy_checkout
from stages.lib.servers import (  # noqa: F401  (re-exported for the test modules)
    BIN,
    bento_dir,
    free_port,
    start_bento,
    start_server,
    stop,
    wait_until_ready,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
REAL_SAMPLE = SHARED_DATA / "creditcard_sample.csv"

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


@pytest.fixture(scope="session")
def real_sample() -> Path:
    if not REAL_SAMPLE.is_file():
        pytest.skip(f"team sample of the real file not present at {REAL_SAMPLE}")
    return REAL_SAMPLE


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The slow end-to-end modules run last so quick unit failures show first.
    items.sort(key=lambda item: "integration" in item.keywords)


def run(
    args: list[str], cwd: Path, env: dict[str, str], check: bool = True, timeout: int = 600
) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def stale_stages(workspace: Path, env: dict[str, str]) -> dict:
    """`dvc status --json` of a checkout, less the champion stage's standing "always
    changed": it asks the registry on every run (see dvc.yaml), so DVC always lists it."""
    status = json.loads(run(["dvc", "status", "--json"], workspace, env).stdout)
    if status.get("champion") == ["always changed"]:
        del status["champion"]
    return status


def ran_stages(output: str) -> list[str]:
    """The stages a `dvc repro` ran, in order, from its output."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def set_params(workspace: Path, **changes: object) -> None:
    path = workspace / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        node = params
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


GIT_ID = ["-c", "user.name=t", "-c", "user.email=t@t"]


def stores_env(base: Path) -> dict[str, str]:
    """The environment of a project checkout with its own MLflow store and BentoML home."""
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{base / 'mlflow.db'}",
        "BENTOML_HOME": str(base / "bentoml_home"),
        "DVC_NO_ANALYTICS": "1",
    }
    env.pop("DVC_ROOT", None)
    env.pop("VIRTUAL_ENV", None)
    return env


def small_checkout(base: Path) -> tuple[Path, dict[str, str]]:
    """Copy the project to `base/repo` on a small synthetic config, committed."""
    ws = base / "repo"
    copy_checkout(ROOT, ws)
    env = stores_env(base)
    set_params(
        ws,
        data__synthetic__rows=30_000,
        data__synthetic__fraud_rate=0.01,
        train__hgb__max_iter=60,
        train__search__trials=5,  # every family's defaults, then one proposal
    )
    run(["git", *GIT_ID, "commit", "-qam", "small"], ws, env)
    return ws, env


def build_workspace(base: Path) -> tuple[Path, dict[str, str]]:
    """A small checkout (own MLflow store and BentoML home) after a real `dvc repro`."""
    ws, env = small_checkout(base)
    run(["dvc", "repro"], ws, env)
    return ws, env


@pytest.fixture
def reliability(request: pytest.FixtureRequest):
    """record(**figures): what a reliability test measured, kept in the JSON file named
    by FRAUD_RELIABILITY_REPORT (`make test-reliability` renders it as a table)."""
    target = os.environ.get("FRAUD_RELIABILITY_REPORT")

    def record(**figures: object) -> None:
        if target:
            path = Path(target)
            runs = json.loads(path.read_text()) if path.exists() else {}
            runs[request.node.name] = figures
            path.write_text(json.dumps(runs, indent=2) + "\n")

    return record


def system_tool(name: str) -> str:
    """The path of a system program the tests drive for real (promtool, kubectl); missing,
    the test skips, except in CI, where .ci/run must have installed it."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is required in CI (make system-deps installs it)")
        pytest.skip(f"{name} not installed (see make system-deps)")
    return path
