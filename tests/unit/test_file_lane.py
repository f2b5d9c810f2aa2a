"""The file lane (serving/file_lane.py): a file request scored in-process exactly as the
model scores it, refusals as data, a cancelled job dropped, and the real child process
(spawned as in a worker) giving the same answer."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pandas as pd
import pytest

from serving.contract import OUTPUT_COLUMNS
from serving.file_lane import FileLane, FileRequest, Scorer, score_file_with
from serving.runtime import SklearnRuntime
from serving.settings import Settings
from stages.lib.schema import FEATURES

from .contract_fixture import THRESHOLD, small_model, transactions


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("model")
    contract, path = small_model(folder)
    settings = Settings.from_env({"FRAUD_MAX_ROWS": "500", "FRAUD_THREADS": "1"})
    return Scorer(contract, settings, SklearnRuntime(str(path), threads=1)), path


def _rows(n: int, seed: int = 0) -> pd.DataFrame:
    """Rows inside the contract's ranges: drawn from the training rows themselves."""
    return transactions().sample(n, random_state=seed, replace=n > 2_000).reset_index(drop=True)


def _request(tmp_path, frame: pd.DataFrame, fmt: str = "csv", name: str = "t.csv") -> FileRequest:
    upload = tmp_path / "upload"
    upload.write_bytes(frame.to_csv(index=False).encode())
    return FileRequest(str(upload), name, fmt, THRESHOLD, str(tmp_path / "out"))


def _expected(path, frame: pd.DataFrame) -> np.ndarray:
    fitted = pickle.loads(path.read_bytes())
    return fitted.predict_proba(frame[list(FEATURES)])[:, 1]


def test_a_file_is_scored_as_the_model_scores_it(model, tmp_path) -> None:
    scorer, path = model
    frame = _rows(300).assign(note="kept")
    outcome = score_file_with(scorer, _request(tmp_path, frame, fmt="parquet"))
    assert outcome["media"] == "application/vnd.apache.parquet" and outcome["rows"] == 300
    out = pd.read_parquet(tmp_path / "out")
    assert list(out.columns[-3:]) == list(OUTPUT_COLUMNS) and (out["note"] == "kept").all()
    expected = _expected(path, frame)
    assert np.max(np.abs(out["fraud_probability"].to_numpy() - expected)) < 1e-12
    assert (out["is_fraud"] == (expected >= THRESHOLD)).all()
    assert outcome["flagged"] == int((expected >= THRESHOLD).sum())
    assert set(outcome["features"]) == {"V14", "Amount"}  # the drift window's columns


def test_refusals_come_back_as_data_and_write_nothing(model, tmp_path) -> None:
    scorer, _ = model
    too_many = _rows(600)
    outcome = score_file_with(scorer, _request(tmp_path, too_many))
    assert outcome["error"] == 413 and outcome["body"]["rule"] == "max-rows"
    broken = _rows(10).drop(columns="V3")
    outcome = score_file_with(scorer, _request(tmp_path, broken))
    assert outcome["error"] == 400 and outcome["body"]["column"] == "V3"
    assert not (tmp_path / "out").exists()


def test_a_cancelled_job_stops_with_499(model, tmp_path) -> None:
    scorer, _ = model
    outcome = score_file_with(scorer, _request(tmp_path, _rows(10)), lambda: True)
    assert outcome["error"] == 499 and not (tmp_path / "out").exists()


def test_the_child_process_answers_as_in_process(model, tmp_path) -> None:
    scorer, path = model
    frame = _rows(200, seed=5)
    lane = FileLane(scorer.contract, {"model.pkl": str(path)}, scorer.settings)
    try:
        outcome = lane.submit(_request(tmp_path, frame)).result(timeout=120)
    finally:
        lane.close()
    scored = pd.read_csv(io.BytesIO((tmp_path / "out").read_bytes()))
    assert outcome["rows"] == 200
    assert np.max(np.abs(scored["fraud_probability"].to_numpy() - _expected(path, frame))) < 1e-9
