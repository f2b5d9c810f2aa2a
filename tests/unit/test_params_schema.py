"""params.yaml's check in-process: the schema, the lines it gives, and the minimum data
size it derives (the stages that run it, as DVC runs them: tests/integration/test_params.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import numpy as np
import pandas as pd
import pytest
import yaml

from stages.lib import params as schema
from stages.lib.splitting import SplitError, rows_needed_per_class, split_frame
from stages.lib.synthetic import generate

from ..conftest import ROOT, set_params

PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PATHS: dict[str, str] = PIPELINE["vars"][0]["paths"]
PARAMS: dict[str, Any] = yaml.safe_load((ROOT / "params.yaml").read_text())


def scratch_workspace(base: Path, edit: dict[str, Any] | None = None) -> Path:
    """A scratch workspace: dvc.yaml, params.yaml (with `edit`: dotted key -> value) and
    a good prepared file, so split has all it needs but the params."""
    ws = base / "ws"
    ws.mkdir()
    (ws / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    (ws / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    set_params(ws, **{key.replace(".", "__"): value for key, value in (edit or {}).items()})
    prepared = ws / PATHS["prepared"]
    prepared.parent.mkdir(parents=True)
    generate(n_rows=2_000, fraud_rate=0.02, seed=3).to_parquet(prepared, index=False)
    return ws


def test_committed_params_validate() -> None:
    assert schema.load_params(ROOT / "params.yaml") == PARAMS


def test_allowed_values_are_the_codes_own() -> None:
    """The schema's enums are the values the code accepts, so neither can drift."""
    from stages.lib.modeling import CALIBRATIONS, MODELS
    from stages.lib.search import SPACES
    from stages.lib.splitting import STRATEGIES
    from stages.lib.validation import DUPLICATE_POLICIES

    assert get_args(schema.DuplicatePolicy) == DUPLICATE_POLICIES
    assert get_args(schema.Strategy) == STRATEGIES
    assert get_args(schema.Family) == MODELS
    assert set(get_args(schema.Family)) == set(SPACES)
    assert get_args(schema.Calibration) == CALIBRATIONS


def _problems(tmp_path: Path, edit: dict[str, Any]) -> list[str]:
    """The lines the check gives for params.yaml with `edit`, in-process (the stage runs
    of tests/integration/test_params.py show these lines are what a stage prints, alone,
    with exit status 1)."""
    ws = scratch_workspace(tmp_path, edit)
    with pytest.raises(schema.ParamsError) as stopped:
        schema.load_params(ws / "params.yaml")
    assert stopped.value.code == "\n".join(stopped.value.lines)  # SystemExit: status 1
    return stopped.value.lines


@pytest.mark.parametrize(
    ("edit", "lines"),
    [
        # Stages use the raw value, so a quoted number is refused rather than coerced.
        (
            {"train.search.trials": "8"},
            ["params.yaml: train.search.trials: Input should be a valid integer (got '8')"],
        ),
        (
            {"train.search.folds": 1},
            ["params.yaml: train.search.folds: Input should be greater than or equal to 2 (got 1)"],
        ),
        (
            {"train.search.families": ["hgb", "xgboost"]},
            [
                "params.yaml: train.search.families.1: Input should be 'logreg', 'hgb', "
                "'random_forest', 'extra_trees' or 'lightgbm' (got 'xgboost')"
            ],
        ),
        (
            {"train.random_forest.max_features": "all"},
            [
                "params.yaml: train.random_forest.max_features: Input should be 'sqrt', "
                "'log2', a number of features >= 1 or a fraction in (0, 1] (got 'all')"
            ],
        ),
        (
            {"split.strategy": "random", "evaluate.cost_false_alarm": -5},
            [
                "params.yaml: split.strategy: Input should be 'time' or 'stratified' "
                "(got 'random')",
                "params.yaml: evaluate.cost_false_alarm: Input should be greater than 0 (got -5)",
            ],
        ),
    ],
    ids=["quoted-int", "one-fold", "unknown-family", "max-features", "two-problems"],
)
def test_problems_are_named_one_line_each(tmp_path: Path, edit: dict, lines: list[str]) -> None:
    assert _problems(tmp_path, edit) == lines


def test_missing_key_is_named(tmp_path: Path) -> None:
    ws = scratch_workspace(tmp_path)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    del params["evaluate"]["gate"]["min_roc_auc"]
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(schema.ParamsError) as stopped:
        schema.load_params(ws / "params.yaml")
    assert stopped.value.lines == ["params.yaml: evaluate.gate.min_roc_auc: Field required"]


def test_huge_value_is_cut(tmp_path: Path) -> None:
    (line,) = _problems(tmp_path, {"data.source": "data/raw/" + "x" * 5_000 + ".json"})
    assert line.startswith("params.yaml: data.source: Input should be 'synthetic' or the path")
    assert line.endswith("xxx...)") and len(line) < 200


def _every_block_has_both_classes(n_frauds: int) -> bool:
    """Split 1,000 rows with `n_frauds` spread evenly in time as the default params say,
    then cut the search's and the calibration's folds with the code train uses: does
    every part, and every fold's fitted and scored rows, hold both classes?"""
    from stages.lib.modeling import folds

    split, train = PARAMS["split"], PARAMS["train"]
    labels = np.zeros(1_000, dtype="int64")
    labels[((np.arange(n_frauds) + 0.5) * 1_000 / n_frauds).astype(int)] = 1
    frame = pd.DataFrame({"Time": np.arange(1_000.0), "Class": labels})
    try:
        parts = split_frame(
            frame, split["strategy"], split["valid_size"], split["test_size"], split["seed"]
        )
    except SplitError:
        return False
    fit_rows = pd.concat([parts["train"], parts["valid"]], ignore_index=True)
    time_ordered = split["strategy"] == "time"
    for rows, k in (
        (parts["train"], train["search"]["folds"]),
        (fit_rows, train["calibration_folds"]),
    ):
        y = rows["Class"].to_numpy()
        for fitted, scored in folds(k, time_ordered, train["seed"]).split(rows, y):
            if len(set(y[fitted])) < 2 or len(set(y[scored])) < 2:
                return False
    return True


def test_minimum_is_what_split_and_folds_need() -> None:
    """With the default params, the minimum prepare asks for is enough for frauds spread
    evenly in time, and one fewer is not: the count is tight, not a guess."""
    split, train = PARAMS["split"], PARAMS["train"]
    need = rows_needed_per_class(
        split["strategy"],
        split["valid_size"],
        split["test_size"],
        train["search"]["folds"],
        train["calibration_folds"],
    )
    assert _every_block_has_both_classes(need)
    assert not _every_block_has_both_classes(need - 1)
