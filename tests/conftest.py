"""Shared helpers: the project root, free loopback ports, real server processes, and the
small built workspace.

Two tiers: tests/unit/ (pure functions and the service's ASGI pieces in-process; `make
test-unit`) and tests/integration/ (real DVC, MLflow, BentoML, Spark, Prometheus,
PostgreSQL, browsers, or model fitting; marked `integration` here). The unit tier runs
first. No test depends on the order: pytest-randomly shuffles it every run.

The integration tier shares one small built workspace per session (`built`: one real
`dvc repro` of the 30k-row config). A test that only reads it (serves its Bento, asks its
registry, reads its outputs) takes `built`; a test that changes it (params, code, aliases,
dvc runs, push) takes `built_copy`, a private copy relocated to its own folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from stages.lib.environment import TELEMETRY_OFF, stores
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

for _name, _value in TELEMETRY_OFF.items():
    os.environ.setdefault(_name, _value)


@pytest.fixture(autouse=True)
def _mlflow_client_reset() -> Iterator[None]:
    """A test that points MLflow's client at a store (mlflow.set_tracking_uri) leaves it
    pointed nowhere for the next test, whichever that is."""
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def real_sample() -> Path:
    if not REAL_SAMPLE.is_file():
        pytest.skip(f"team sample of the real file not present at {REAL_SAMPLE}")
    return REAL_SAMPLE


INTEGRATION = ROOT / "tests" / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under tests/integration is an integration test, and that tier runs last
    # so quick unit failures show first (a stable sort: pytest-randomly's order, or the
    # collected one, stays within each tier).
    for item in items:
        if INTEGRATION in Path(item.path).parents and "integration" not in item.keywords:
            item.add_marker(pytest.mark.integration)
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
        **TELEMETRY_OFF,
        **stores(base),  # beside the checkout, not inside it
    }
    env.pop("DVC_ROOT", None)
    env.pop("VIRTUAL_ENV", None)
    return env


def link_venv(checkout: Path) -> None:
    """The checkout's `.venv` is this one's, already set up: its `make` targets must not
    set it up again from a scratch copy (`make setup` reinstalls when requirements.lock or
    pyproject.toml is newer than .venv/.installed, and `pip install -e .` of a temporary
    checkout would point the shared venv's packages at a folder about to be deleted)."""
    (checkout / ".venv").symlink_to(ROOT / ".venv")
    installed = ROOT / ".venv" / ".installed"
    if installed.exists():
        stamp = installed.stat().st_mtime
        for name in ("requirements.lock", "pyproject.toml"):
            path = checkout / name
            when = min(path.stat().st_mtime, stamp)
            os.utime(path, (when, when))


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
    # A whole build: minutes on a busy machine (the session's shared one must not fail
    # on a deadline meant for single commands).
    run(["dvc", "repro"], ws, env, timeout=1800)
    return ws, env


SQLITE = b"SQLite format 3\x00"


def _relocate_sqlite(path: Path, old: str, new: str) -> None:
    """Every text value of every column of every table: `old` (a folder, whole path
    components only) becomes `new`."""
    db = sqlite3.connect(path)
    try:
        with db:
            tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            for table in tables:
                for column in [row[1] for row in db.execute(f'PRAGMA table_info("{table}")')]:
                    c = f'"{column}"'
                    db.execute(
                        f'UPDATE "{table}" SET {c} = CASE WHEN {c} = :old THEN :new '
                        f"ELSE replace({c}, :old || '/', :new || '/') END "
                        f"WHERE typeof({c}) = 'text' AND ({c} = :old OR instr({c}, :old || '/'))",
                        {"old": old, "new": new},
                    )
    finally:
        db.close()


def sqlite_mentions(path: Path, text: str) -> list[tuple[str, str]]:
    """(table, column) of every text value in the database that contains `text`."""
    db = sqlite3.connect(path)
    try:
        found = []
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for column in [row[1] for row in db.execute(f'PRAGMA table_info("{table}")')]:
                query = f'SELECT 1 FROM "{table}" WHERE instr(CAST("{column}" AS TEXT), ?) LIMIT 1'
                if db.execute(query, (text,)).fetchone():
                    found.append((table, column))
        return found
    finally:
        db.close()


def relocate(base: Path, old: Path) -> None:
    """Make a copied workspace folder `base` (once at `old`) point only at itself.

    MLflow's SQLite store holds absolute paths into the folder it was built in (artifact
    locations of experiments, runs, logged models and model versions; source-file tags),
    and so do the MLmodel files of the logged models: rewritten, in every text column of
    every table. DVC keeps none that matter (its state is keyed by inode: a copy is
    rehashed), nor do git and the BentoML home; any other file that names `old` stops the
    copy, since a copy that still wrote into the original would make tests depend on
    each other.
    """
    old_s, new_s = str(old), str(base)
    needle = old_s.encode()
    for path in base.rglob("*"):
        if path.is_symlink() or not path.is_file() or ".dvc/cache/" in path.as_posix():
            continue
        data = path.read_bytes()
        if needle not in data:
            continue
        if data.startswith(SQLITE):
            _relocate_sqlite(path, old_s, new_s)
        elif "mlruns" in path.relative_to(base).parts:
            text = data.decode()
            path.write_text(text.replace(old_s + "/", new_s + "/"))
        else:
            raise AssertionError(f"{path} names {old_s}: relocate() does not know this file")


def copy_workspace(source: Path, dest: Path) -> tuple[Path, dict[str, str]]:
    """A copy of a built workspace's folder `source` (repo/ with its .git and .dvc/cache,
    mlflow.db, mlruns, bentoml_home, the DVC remote beside it) at `dest`, relocated to
    it: the copy's registry, artifacts and outputs are its own. Returns (repo, env)."""
    shutil.copytree(source, dest, symlinks=True, dirs_exist_ok=True)
    relocate(dest, source)
    return dest / "repo", stores_env(dest)


def _fingerprint(ws: Path, env: dict[str, str]) -> dict[str, object]:
    """What a reader must not change in the shared build: git's view of the checkout,
    dvc.lock, the registry's versions and aliases."""
    db = sqlite3.connect(env["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    try:
        registry = {
            "aliases": sorted(db.execute("SELECT * FROM registered_model_aliases")),
            "versions": sorted(db.execute("SELECT name, version FROM model_versions")),
        }
    finally:
        db.close()
    status = run(["git", "status", "--porcelain"], ws, env).stdout
    lock = hashlib.md5((ws / "dvc.lock").read_bytes()).hexdigest()
    return {"git": status, "dvc.lock": lock, **registry}


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """The small workspace (30k rows; tests/conftest.py's small_checkout) after one real
    `dvc repro`, built once per session and shared by every integration module that only
    reads it. (ws, env): env has its MLflow store and BentoML home. Changing it would make
    tests depend on their order, so the session ends with a check that nobody did."""
    ws, env = build_workspace(tmp_path_factory.mktemp("built"))
    before = _fingerprint(ws, env)
    yield ws, env
    assert _fingerprint(ws, env) == before, "a test changed the shared build: use built_copy"


@pytest.fixture
def built_copy(built, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A private copy of the shared build (copy_workspace), for one test that changes it."""
    return copy_workspace(built[0].parent, tmp_path / "copy")


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
