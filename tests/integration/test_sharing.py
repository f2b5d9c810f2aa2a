"""Reproducible and shareable: a fresh clone rebuilds the same bytes, and a teammate's
clone gets every artifact through the DVC remote instead of recomputing it.

The origin is a copy of the session's shared build (built from empty stores), committed
and pushed. That the committed dvc.lock at the default params is what a fresh clone
builds from empty stores is checked by `.ci/run` before the tests (`make pipeline` in its
fresh clone, then `git status`); here, the default data against that lock.
(The checks that need no DVC run: tests/unit/test_reproducibility.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import yaml

from stages.lib.modeling import load_model
from stages.lib.project import file_md5, pipeline_path

from ..conftest import (
    GIT_ID,
    ROOT,
    bento_dir,
    copy_workspace,
    ran_stages,
    run,
    stale_stages,
    start_bento,
    stop,
    stores_env,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def origin(built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict, Path]]:
    """A small project after `dvc repro` (a copy of the shared build), committed, pushed
    to a remote of its own. The tests only clone it."""
    base = tmp_path_factory.mktemp("origin")
    ws, env = copy_workspace(built[0].parent, base)
    run(["git", "add", "-A"], ws, env)
    run(["git", *GIT_ID, "commit", "-qm", "built"], ws, env)
    remote = base / "remote"
    # --local: the checkout's own .dvc/config.local; the committed default stays as it is.
    run(["dvc", "remote", "modify", "--local", "local", "url", str(remote)], ws, env)
    run(["dvc", "push"], ws, env)
    yield ws, env, remote


def _clone(origin_ws: Path, base: Path) -> tuple[Path, dict[str, str]]:
    base.mkdir(exist_ok=True)
    clone = base / "repo"
    env = stores_env(base)  # a teammate: own (empty) MLflow store and BentoML home
    run(["git", "clone", "-q", str(origin_ws), str(clone)], base, env)
    return clone, env


# What another CPU would run: other BLAS kernels and numpy's baseline SIMD paths. (numpy's
# AVX-512 paths cannot be switched on here; the model avoids the transcendental ones, see
# tests/unit/test_reproducibility.py.)
OTHER_KERNELS = {"OPENBLAS_CORETYPE": "Prescott", "NPY_DISABLE_CPU_FEATURES": "X86_V3"}


def test_fresh_clone_reproduces_bit_for_bit(origin, tmp_path: Path) -> None:
    """No cache, no remote, empty stores, other CPU kernels: `dvc repro` rebuilds every
    output, and git sees no change (dvc.lock and the metrics are byte for byte the
    committed ones)."""
    ws, _, _ = origin
    clone, env = _clone(ws, tmp_path)
    result = run(["dvc", "repro"], clone, {**env, **OTHER_KERNELS}, timeout=1800)  # a whole build
    assert "Running stage 'package'" in result.stdout
    assert run(["git", "status", "--porcelain"], clone, env).stdout == ""


def test_teammate_pulls_what_the_committed_lock_names(origin, tmp_path: Path) -> None:
    """Day one of a team: A built from empty stores, committed and pushed (the origin); B,
    a fresh clone of that commit with empty stores of its own, only pulls, and serves A's
    model."""
    a, _, remote = origin
    b, env_b = _clone(a, tmp_path / "b")
    run(["dvc", "remote", "modify", "--local", "local", "url", str(remote)], b, env_b)
    run(["dvc", "pull"], b, env_b)
    assert stale_stages(b, env_b) == {}
    # B's registry is empty: the champion check keeps the pulled record, nothing reruns.
    result = run(["dvc", "repro"], b, env_b)
    assert ran_stages(result.stdout) == ["champion"], result.stdout
    assert "keeping models/champion.json" in result.stderr + result.stdout
    assert run(["git", "status", "--porcelain"], b, env_b).stdout == ""

    rows = pd.read_parquet(b / "data/split/test.parquet").head(40)
    process, url = start_bento(bento_dir(b), env_b, tmp_path / "serve.log")
    try:
        response = requests.post(
            f"{url}/predict", timeout=30, json={"transactions": rows.to_dict(orient="records")}
        )
        assert response.status_code == 200, response.text
        served = [p["fraud_probability"] for p in response.json()["predictions"]]
    finally:
        stop(process)
    expected = load_model(a / "models/model.pkl").predict_proba(rows.drop(columns="Class"))
    # The service answers with the compiled ONNX model: package checked it against
    # scikit-learn on every validation and test row (max |difference| ~3e-16).
    np.testing.assert_allclose(served, expected[:, 1], rtol=0, atol=1e-15)


def _prepared_md5_in_lock() -> str:
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())
    prepared = pipeline_path("prepared", ROOT).relative_to(ROOT).as_posix()
    (out,) = [o for o in lock["stages"]["prepare"]["outs"] if o["path"] == prepared]
    return out["md5"]


@pytest.mark.parametrize("cpu_env", [{}, OTHER_KERNELS], ids=["this-cpu", "other-kernels"])
def test_default_data_matches_dvc_lock(tmp_path: Path, cpu_env: dict[str, str]) -> None:
    """The committed dvc.lock's hash of the default synthetic data, regenerated."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if params["data"]["source"] != "synthetic":
        pytest.skip("params.yaml does not use the synthetic default")
    out = tmp_path / "transactions.parquet"
    env = {**os.environ, **cpu_env}
    args = [sys.executable, "-m", "stages.prepare", "--raw", "data/raw",
            "--feedback", "data/raw/feedback", "--out", str(out),
            "--recent", str(tmp_path / "recent_labelled.parquet")]  # fmt: skip
    subprocess.run(
        [*args, "--report", str(tmp_path / "report.json")],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    assert file_md5(out) == _prepared_md5_in_lock()
