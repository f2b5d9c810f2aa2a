"""The compiled (ONNX) model against scikit-learn, for every family the pipeline trains."""

from __future__ import annotations

import numpy as np
import onnx
import pandas as pd
import pytest
from onnx import numpy_helper

from serving import runtime
from serving.contract import Runtime
from stages.lib.compiled import INPUT, OUTPUT, NotCompilable, compile_model, session, verify
from stages.lib.modeling import fraud_probability, refit_calibrated
from stages.lib.schema import FEATURES
from stages.lib.synthetic import generate
from stages.package import CompiledMismatch, compiled_runtime

SMALL = {
    "hgb": {"max_iter": 40, "max_leaf_nodes": 15, "min_samples_leaf": 20},
    "lightgbm": {"n_estimators": 40, "num_leaves": 15, "n_jobs": 1},
    "extra_trees": {"n_estimators": 20, "min_samples_leaf": 5},
    "random_forest": {"n_estimators": 20, "min_samples_leaf": 5},
    "logreg": {"C": 0.1, "class_weight": "balanced"},
}
TRAIN = {"seed": 0, "calibration": "auto", "calibration_folds": 2}


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return generate(n_rows=8_000, fraud_rate=0.02, seed=11)


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    # Real-looking rows the models never saw, plus edge cases: zero amounts, Time exactly
    # on the hour-spline knots and a day later (the periodic wrap).
    fresh = generate(n_rows=3_000, fraud_rate=0.02, seed=12)
    edge = fresh.head(8).copy()
    edge["Amount"] = [0.0, 0.0, 1.0, 1e-2, 25_691.16, 0.0, 1.0, 1.0]
    edge["Time"] = [0.0, 14_400.0, 28_800.0, 86_400.0, 172_799.0, 43_200.5, 57_600.0, 72_000.0]
    return pd.concat([fresh, edge], ignore_index=True)


def fitted(frame: pd.DataFrame, families: list[str], calibration: str = "auto"):
    members = [{"family": f, "params": SMALL[f]} for f in families]
    model, _, _ = refit_calibrated(members, frame, {**TRAIN, "calibration": calibration}, True)
    return model


@pytest.mark.parametrize(
    "families",
    [["hgb"], ["lightgbm"], ["extra_trees"], ["random_forest"], ["logreg"], ["hgb", "lightgbm"]],
    ids=lambda f: "+".join(f),
)
def test_compiled_equals_sklearn(frame, rows, families) -> None:
    model = fitted(frame, families)
    compiled = compile_model(model).SerializeToString()
    check = verify(model, compiled, rows, threshold=0.05, tolerance=1e-6)
    assert check["ok"], check
    assert check["max_abs_difference"] < 1e-12
    assert check["flipped_decisions"] == 0 and check["rows_checked"] == len(rows)


def test_package_refuses_a_mismatching_conversion(frame, rows, monkeypatch) -> None:
    model = fitted(frame, ["hgb"])
    graph = compile_model(model)
    # A compiler bug stand-in: one tree's leaves all move a little.
    trees = next(n for n in graph.graph.node if n.op_type == "TreeEnsemble")
    weights = next(a for a in trees.attribute if a.name == "leaf_weights")
    values = numpy_helper.to_array(weights.t).copy()
    values[:50] += 0.05
    weights.t.CopyFrom(numpy_helper.from_array(values))
    monkeypatch.setattr("stages.package.compile_model", lambda _: graph)
    with pytest.raises(CompiledMismatch, match="differs from scikit-learn"):
        compiled_runtime(model, rows, threshold=0.05, tolerance=1e-6)


def test_model_without_a_conversion_is_served_by_sklearn(frame, rows) -> None:
    model = fitted(frame, ["hgb"], calibration="isotonic")
    with pytest.raises(NotCompilable):
        compile_model(model)
    compiled, runtime = compiled_runtime(model, rows, threshold=0.05, tolerance=1e-6)
    assert compiled is None and runtime.default == "sklearn" and runtime.reason


def test_serving_runtimes_agree(frame, rows, tmp_path) -> None:
    """The service's two runtimes, over model files as the Bento holds them."""
    model = fitted(frame, ["lightgbm"])
    compiled, contract_runtime = compiled_runtime(model, rows, 0.05, 1e-6)
    (tmp_path / "model.onnx").write_bytes(compiled)
    import pickle

    (tmp_path / "model.pkl").write_bytes(pickle.dumps(model))
    features = rows[list(FEATURES)]
    expected = fraud_probability(model, rows)
    for choice, name in (("auto", "onnx"), ("onnx", "onnx"), ("sklearn", "sklearn")):
        loaded = runtime.load_runtime(
            choice, contract_runtime, lambda f: str(tmp_path / f), threads=2
        )
        assert loaded.name == name
        for batch in (features.head(1), features):  # one thread, then the big-batch path
            got = loaded.probability(batch)
            assert np.max(np.abs(got - expected[: len(batch)])) < 1e-12
    without = Runtime(default="sklearn", reason="isotonic")
    assert runtime.load_runtime("auto", without, lambda f: str(tmp_path / f), 1).name == "sklearn"
    with pytest.raises(RuntimeError, match="no compiled form: isotonic"):
        runtime.load_runtime("onnx", without, lambda f: str(tmp_path / f), 1)


def test_graph_is_float64_and_checked(frame) -> None:
    graph = compile_model(fitted(frame, ["logreg"]))
    onnx.checker.check_model(graph, full_check=True)
    assert graph.graph.input[0].name == INPUT and graph.graph.output[0].name == OUTPUT
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    out = session(graph.SerializeToString()).run([OUTPUT], {INPUT: np.zeros((2, 30))})[0]
    assert out.dtype == np.float64 and out.shape == (2,)
