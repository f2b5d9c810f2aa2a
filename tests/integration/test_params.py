"""params.yaml is checked once, up front: a bad value stops a stage with one line naming
the key and the rule, exit status 1, and nothing written. Data too small to split and
fold stops prepare the same way.

The stages run as DVC runs them (their commands from dvc.yaml), in a scratch workspace
holding params.yaml, dvc.yaml and the stage's input, with the project's code on
PYTHONPATH: the only defect in each case is the one under test. (The check itself,
in-process: tests/unit/test_params_schema.py.)
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from stages.lib.environment import TELEMETRY_OFF
from stages.lib.project import copy_checkout

from ..conftest import ROOT, run, set_params, stores_env
from ..unit.test_params_schema import PATHS, PIPELINE, scratch_workspace

FORMAT_FIXTURE = ROOT / "tests" / "fixtures" / "creditcard_format.csv"


def _resolve(text: str) -> str:
    return re.sub(r"\$\{paths\.(\w+)\}", lambda m: PATHS[m.group(1)], text)


def _command(stage: str) -> list[str]:
    """The stage's dvc.yaml command, run by this interpreter instead of stages/python."""
    words = shlex.split(_resolve(PIPELINE["stages"][stage]["cmd"]))
    return [sys.executable, *words[1:]]


def _files(workspace: Path) -> dict[str, int]:
    """Every file and folder under the workspace and its modification time: any write,
    new file or new folder changes it."""
    return {
        str(p.relative_to(workspace)): p.stat().st_mtime_ns
        for p in workspace.rglob("*")
        if p.is_file() or p.is_dir()
    }


def _run_stage(stage: str, workspace: Path) -> subprocess.CompletedProcess:
    env = {
        "PYTHONPATH": str(ROOT),
        "PATH": "/usr/bin:/bin",
        "HOME": str(workspace.parent),
        **TELEMETRY_OFF,
    }
    return subprocess.run(
        _command(stage), cwd=workspace, env=env, capture_output=True, text=True, timeout=180
    )


def _stopped(result: subprocess.CompletedProcess) -> list[str]:
    """The stage failed cleanly: exit 1, no traceback; returns its stderr lines."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()


CASES = [
    (
        {"train.search.trials": "eight"},
        "params.yaml: train.search.trials: Input should be a valid integer (got 'eight')",
    ),
    (
        {"split.test_size": 1.5},
        "params.yaml: split.test_size: Input should be less than 1 (got 1.5)",
    ),
    (
        {"data.duplicates": "sometimes"},
        "params.yaml: data.duplicates: Input should be 'drop', 'keep' or 'fail' (got 'sometimes')",
    ),
    (
        {"split.sead": 7},
        "params.yaml: split.sead: Extra inputs are not permitted (got 7)",
    ),
    (
        {"split.valid_size": 0.5, "split.test_size": 0.5},
        "params.yaml: split: valid_size + test_size should be below 1, so train keeps rows "
        "(got 0.5 + 0.5)",
    ),
]


@pytest.mark.parametrize(("edit", "line"), CASES, ids=[next(iter(c[0])) for c in CASES])
def test_bad_param_stops_split_in_one_line(tmp_path: Path, edit: dict, line: str) -> None:
    """Split reads only `split`, yet a bad key anywhere stops it: the whole file is
    checked at the start of every stage, before anything is written."""
    ws = scratch_workspace(tmp_path, edit)
    before = _files(ws)
    assert _stopped(_run_stage("split", ws)) == [line]
    assert _files(ws) == before


def test_not_yaml_one_line(tmp_path: Path) -> None:
    ws = scratch_workspace(tmp_path)
    (ws / "params.yaml").write_text("split:\n  strategy: [time\n")
    (line,) = _stopped(_run_stage("split", ws))
    assert line.startswith("params.yaml: not valid YAML at line 3, column 1: ")


@pytest.mark.parametrize("stage", sorted(PIPELINE["stages"]))
def test_every_stage_checks_params_before_anything(tmp_path: Path, stage: str) -> None:
    """Every stage in dvc.yaml, run as DVC runs it, stops at the params check: no input
    read (this workspace has none but split's), no output, no MLflow or BentoML store."""
    ws = scratch_workspace(tmp_path, {"package.range_margin": "wide"})
    before = _files(ws)
    assert _stopped(_run_stage(stage, ws)) == [
        "params.yaml: package.range_margin: Input should be a valid number (got 'wide')"
    ]
    assert _files(ws) == before


def test_dvc_repro_stops_at_the_first_stage(tmp_path: Path) -> None:
    ws = tmp_path / "repo"
    copy_checkout(ROOT, ws)
    set_params(ws, train__search__trials="eight")
    result = run(["dvc", "repro"], ws, stores_env(tmp_path), check=False)
    assert result.returncode != 0
    line = "params.yaml: train.search.trials: Input should be a valid integer (got 'eight')"
    assert line in result.stderr.splitlines()
    assert "Traceback" not in result.stderr + result.stdout
    assert "failed to reproduce 'prepare'" in result.stderr
    assert not (ws / PATHS["prepared"]).exists() and not (ws / "mlflow.db").exists()


def test_too_small_data_stops_prepare_in_one_line(tmp_path: Path) -> None:
    ws = scratch_workspace(tmp_path, {"data.source": "data/raw/x.csv"})
    header, *rows = FORMAT_FIXTURE.read_text().splitlines()
    three = [rows[0], rows[1], next(r for r in rows if r.endswith('"1"'))]  # one fraud
    (ws / PATHS["raw"]).mkdir(parents=True)
    (ws / PATHS["raw"] / "x.csv").write_text("\n".join([header, *three]) + "\n")
    before = _files(ws)
    errors = [line for line in _stopped(_run_stage("prepare", ws)) if "ERROR" in line]
    assert len(errors) == 1
    assert errors[0].endswith(
        "prepare stopped: [too-small] split and train need at least 6 frauds and 6 "
        "legitimate rows (split.strategy time, split.valid_size 0.2, split.test_size 0.2, "
        "train.search.folds 3, train.calibration_folds 2); the data has 3 rows: "
        "1 fraud(s), 2 legitimate"
    )
    assert _files(ws) == before


def test_frauds_bunched_in_time_stop_split_in_one_line(tmp_path: Path) -> None:
    """Enough frauds for prepare's count, all early: the time split's test part has none,
    and split says so in one line instead of a traceback."""
    ws = scratch_workspace(tmp_path)
    prepared = ws / PATHS["prepared"]
    frame = pd.read_parquet(prepared)
    late = frame["Time"] > frame["Time"].quantile(0.5)
    frame.assign(Class=frame["Class"].where(~late, 0)).to_parquet(prepared, index=False)
    before = _files(ws)
    errors = [line for line in _stopped(_run_stage("split", ws)) if "ERROR" in line]
    assert len(errors) == 1 and errors[0].endswith(
        "split stopped: the valid split (400 rows) has a single class: use more rows, "
        "other split sizes, or split.strategy: stratified"
    )
    assert _files(ws) == before


def test_params_module_imports_without_warnings() -> None:
    """Every stage imports the schema (through project.py): pydantic must not warn on it
    (a field named model_* would), nor need anything beyond requirements.txt."""
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import stages.lib.project"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
