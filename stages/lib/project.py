"""Where the project lives, its params, and the side stores (MLflow, BentoML) inside it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("fraudops")

# Queued and --temp DVC experiments run in a scratch copy under .dvc/tmp/exps/; the
# MLflow store and BentoML home must still be the user's, so resolve past that copy.
_EXP_SCRATCH = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep


def workspace_root() -> Path:
    """The directory holding dvc.yaml for this run (a scratch copy for queued experiments).

    DVC runs every stage from there; DVC_ROOT is not used, since under a queued
    experiment it names the user's checkout rather than the copy with the overrides.
    """
    return Path.cwd().resolve()


def project_root() -> Path:
    """The user's project checkout, even when running inside a queued experiment copy."""
    root = str(workspace_root())
    if _EXP_SCRATCH in root + os.sep:
        return Path(root[: (root + os.sep).index(_EXP_SCRATCH)])
    return Path(root)


def configure_environment() -> None:
    """Telemetry off and the MLflow / BentoML stores inside the project unless set by the user."""
    root = project_root()
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    os.environ.setdefault("BENTOML_HOME", str(root / "bentoml_home"))
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("alembic", "mlflow", "urllib3", "bentoml", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    with open(workspace_root() / path) as fh:
        return yaml.safe_load(fh)


def git_commit() -> str:
    """HEAD's commit, suffixed with '-dirty' when tracked files differ from it."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=workspace_root(),
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            cwd=workspace_root(),
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'hgb': {'max_iter': 3}}} -> {'train.hgb.max_iter': 3}"""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def file_md5(path: str | Path, chunk: int = 1 << 20) -> str:
    """md5 of a file's bytes: the same digest DVC records for it in dvc.lock."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it into place only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Keep the suffix: some writers pick the format from it.
    tmp = target.with_name(f".{target.stem}.tmp-{os.getpid()}{target.suffix}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | Path, payload: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


@contextmanager
def stage_timer(name: str) -> Iterator[None]:
    start = time.perf_counter()
    log.info("stage %s: start", name)
    yield
    log.info("stage %s: done in %.1f s", name, time.perf_counter() - start)


def copy_checkout(source: Path, dest: Path) -> None:
    """Copy a checkout's files (tracked, and untracked but not ignored) into `dest` and
    commit them there as a fresh git repo: a scratch project for tests and benchmarks."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=source,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if (source / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, dest / name)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        [
            "git",
            "-c",
            "user.name=scratch",
            "-c",
            "user.email=scratch@localhost",
            "commit",
            "-qm",
            "scratch copy",
        ],
    ):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
