"""Shared helpers: the project root, free loopback ports, and real server processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from stages.lib.project import copy_checkout, pipeline_path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
REAL_SAMPLE = SHARED_DATA / "creditcard_sample.csv"
BIN = Path(sys.executable).parent

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ready(url: str, process: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before {url} answered")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def start_server(
    args: list[str], env: dict[str, str], log_path: Path, ready_url: str
) -> subprocess.Popen:
    """Start a server in its own process group, logging to `log_path`; return it once
    `ready_url` answers 200 (or raise with the log's tail)."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until_ready(ready_url, process)
    except Exception:
        stop(process)
        raise RuntimeError(f"{args[0]} failed; log:\n{log_path.read_text()[-3000:]}") from None
    return process


def bento_dir(workspace: Path) -> Path:
    """The package stage's Bento folder in `workspace` (its path comes from dvc.yaml)."""
    return pipeline_path("bento", workspace)


def start_bento(
    bento: Path | str, env: dict[str, str], log_path: Path
) -> tuple[subprocess.Popen, str]:
    """`bentoml serve` a Bento folder (or tag) on a free loopback port; return the process
    and base URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [str(BIN / "bentoml"), "serve", str(bento), "--host", "127.0.0.1", "--port", str(port)]
    return start_server(args, env, log_path, f"{url}/readyz"), url


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


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
