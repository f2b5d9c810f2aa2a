"""What keeps the pipeline's outputs the same bytes on every machine, checked without
running it (the runs themselves: tests/integration/test_sharing.py)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import yaml

from ..conftest import ROOT


def test_default_remote_is_configured() -> None:
    config = (ROOT / ".dvc" / "config").read_text()
    assert "remote = local" in config and "url = " in config


# numpy ufuncs whose float64 loops have CPU-specific kernels (AVX512F, or Intel's SVML on
# AVX512_SKX; numpy/_core/src/umath/loops_umath_fp.dispatch.c.src and
# loops_exponent_log.dispatch.c.src): their last bits depend on the CPU.
CPU_SPECIFIC_UFUNCS = {
    np.exp,
    np.log,
    np.exp2,
    np.log2,
    np.log10,
    np.expm1,
    np.log1p,
    np.cbrt,
    np.power,
    np.tan,
    np.arcsin,
    np.arccos,
    np.arctan,
    np.sinh,
    np.cosh,
    np.tanh,
    np.arcsinh,
    np.arccosh,
    np.arctanh,
}


@pytest.mark.parametrize("family", ["lightgbm", "hgb", "extra_trees", "logreg"])
def test_model_features_use_no_cpu_specific_numpy_kernels(family: str) -> None:
    """Tree thresholds are midpoints of the transformed feature values, so a transform
    whose last bits depend on the CPU changes the model file from machine to machine."""
    from sklearn.preprocessing import FunctionTransformer

    from stages.lib.modeling import build_estimator

    params = yaml.safe_load((ROOT / "params.yaml").read_text())["train"][family]
    estimator = build_estimator(family, params, seed=0)
    functions = [
        step.func
        for _, step in _walk(estimator)
        if isinstance(step, FunctionTransformer) and step.func is not None
    ]
    assert functions, "the feature pipeline has no function transformer to check"
    assert not [f for f in functions if f in CPU_SPECIFIC_UFUNCS], functions


def _walk(estimator) -> Iterator[tuple[str, object]]:
    """(name, step) of every step of Pipelines and ColumnTransformers, nested."""
    parts = getattr(estimator, "steps", []) + getattr(estimator, "transformers", [])
    for name, step, *_ in parts:
        yield name, step
        yield from _walk(step)
