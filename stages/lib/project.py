"""Where the project lives, its params, and the side stores (MLflow, BentoML) inside it."""

from __future__ import annotations

import argparse
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

from stages.lib.environment import project_env
from stages.lib.lifecycle import PENDING, bind_to_pipeline
from stages.lib.params import load_params

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
    """Telemetry off and the MLflow / BentoML stores inside the project unless set by the
    user (stages/lib/environment.py)."""
    os.environ.update(project_env(project_root()))


def setup_logging() -> None:
    """Log lines for the stage; every stage calls this first, so it also ties the stage's
    life to the dvc that started it (stages/lib/lifecycle.py)."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("alembic", "mlflow", "urllib3", "bentoml", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    bind_to_pipeline()


class UndeclaredParamError(KeyError):
    """A stage read a params key that its `params:` list in dvc.yaml does not declare."""

    def __str__(self) -> str:
        return str(self.args[0])


class DeclaredParams(dict):
    """A params section holding only what a stage declared; anything else raises."""

    def __init__(self, values: dict[str, Any], stage: str, prefix: str) -> None:
        super().__init__(
            {
                k: DeclaredParams(v, stage, f"{prefix}{k}.") if isinstance(v, dict) else v
                for k, v in values.items()
            }
        )
        self.stage, self.prefix = stage, prefix

    def __missing__(self, key: str) -> Any:
        raise UndeclaredParamError(
            f"stage '{self.stage}' reads params key '{self.prefix}{key}', which its "
            "`params:` list in dvc.yaml does not declare (DVC would not rerun it on a change)"
        )

    def get(self, key: str, default: Any = None) -> Any:  # no silent default either
        return self[key]


def _select(params: dict[str, Any], dotted: str) -> dict[str, Any]:
    """{'a': {'b': 1, 'c': 2}}, 'a.b' -> {'a': {'b': 1}}"""
    head, _, rest = dotted.partition(".")
    if head not in params:
        raise KeyError(f"dvc.yaml declares params '{dotted}', which params.yaml lacks")
    if not rest:
        return {head: params[head]}
    return {head: _select(params[head], rest)}


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def declared_params(stage: str) -> list[str]:
    """The params keys `stage` declares in dvc.yaml (params.yaml entries only)."""
    with open(workspace_root() / "dvc.yaml") as fh:
        spec = yaml.safe_load(fh)["stages"][stage]
    keys: list[str] = []
    for entry in spec.get("params", []):
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, dict) and "params.yaml" in entry:
            keys.extend(entry["params.yaml"])
    return keys


def stage_params(stage: str) -> DeclaredParams:
    """params.yaml, cut down to the keys `stage` declares in dvc.yaml.

    Reading anything else raises UndeclaredParamError, so a stage cannot depend on a param
    that DVC does not hash for it. The whole file is checked against the schema in
    stages/lib/params.py first, whatever the stage declares: stages call this before they
    write anything, so a bad value anywhere stops the run at its first stage with one line
    per problem (ParamsError, a SystemExit: exit status 1, no traceback).
    """
    params = load_params(workspace_root() / "params.yaml")
    chosen: dict[str, Any] = {}
    for dotted in declared_params(stage):
        _merge(chosen, _select(params, dotted))
    return DeclaredParams(chosen, stage, "")


def pipeline_path(name: str, root: Path | None = None) -> Path:
    """A path from dvc.yaml's `vars: paths` (e.g. 'bento'), for code outside the stages:
    the Makefile, the stack, tests and benchmarks."""
    with open((root or workspace_root()) / "dvc.yaml") as fh:
        spec = yaml.safe_load(fh)
    for entry in spec.get("vars", []):
        if isinstance(entry, dict) and name in entry.get("paths", {}):
            return (root or workspace_root()) / entry["paths"][name]
    raise KeyError(f"dvc.yaml vars.paths has no '{name}'")


def stage_paths(description: str, *names: str) -> argparse.Namespace:
    """The stage's file paths, passed by its `cmd` in dvc.yaml (their one home)."""
    parser = argparse.ArgumentParser(description=description)
    for name in names:
        parser.add_argument(f"--{name}", required=True, type=Path)
    return parser.parse_args()


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
    PENDING.add(tmp)  # a stopped stage removes it instead of renaming it
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
        PENDING.discard(tmp)


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


def main() -> None:
    """`python -m stages.lib.project path NAME...`: dvc.yaml's paths, one per line (for
    the Makefile, so it names no pipeline path itself)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("command", choices=["path"])
    parser.add_argument("names", nargs="+")
    args = parser.parse_args()
    for name in args.names:
        print(pipeline_path(name).relative_to(workspace_root()))


if __name__ == "__main__":
    main()
