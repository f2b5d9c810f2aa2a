"""The runtimes that turn validated transactions into fraud probabilities.

`onnx`: the graph the package stage compiled and verified against scikit-learn (max
difference and flipped decisions are in the contract). `sklearn`: the pickled model
itself, the fallback for a model with no verified compiled form.

Threads fit the work: a small batch runs on one thread (fanning one row out to worker
threads costs more than it saves, and with a busy neighbour on the machine spinning
threads made one-row predictions take seconds); a big batch uses `threads`.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import pandas as pd
import sklearn
from threadpoolctl import threadpool_limits

from serving.contract import CompiledSpec
from serving.contract import Runtime as ContractRuntime

SMALL_BATCH = 1_000  # rows: below this, one thread


def onnx_session(model: str | bytes, threads: int = 1) -> Any:
    """The one onnxruntime session factory (serving, and package's check of the compiled
    graph): CPU only, `threads` intra-op threads, idle threads sleeping."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle workers must sleep, not spin: spinning fights neighbours for the CPUs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class Runtime(Protocol):
    name: str

    def probability(self, features: pd.DataFrame) -> np.ndarray: ...


class OnnxRuntime:
    name = "onnx"

    def __init__(self, path: str, spec: CompiledSpec, threads: int) -> None:
        self.input, self.output = spec.input, spec.output
        self.small = onnx_session(path, 1)
        self.large = onnx_session(path, threads) if threads > 1 else self.small

    def probability(self, features: pd.DataFrame) -> np.ndarray:
        rows = features.to_numpy(dtype=np.float64)  # contract column order
        run = self.small if len(rows) < SMALL_BATCH else self.large
        return run.run([self.output], {self.input: rows})[0]


class SklearnRuntime:
    name = "sklearn"

    def __init__(self, path: str, threads: int) -> None:
        # Pickle runs code on load: the Bento carries only the file package checked by md5.
        with open(path, "rb") as fh:
            self.model = pickle.load(fh)
        self.threads = threads

    def probability(self, features: pd.DataFrame) -> np.ndarray:
        threads = 1 if len(features) < SMALL_BATCH else self.threads
        # validate() has already checked every value is a finite number; skipping
        # sklearn's own re-checks saves ~2 ms a call.
        with (
            threadpool_limits(limits=threads),
            sklearn.config_context(assume_finite=True, skip_parameter_validation=True),
        ):
            return self.model.predict_proba(features)[:, 1]


def load_runtime(
    choice: str, verified: ContractRuntime, path_of: Callable[[str], str], threads: int
) -> Runtime:
    """`choice` (auto | onnx | sklearn) against what the contract says was verified."""
    spec = verified.onnx
    if choice == "onnx" and spec is None:
        reason = verified.reason or "the contract names none"
        raise RuntimeError(f"FRAUD_RUNTIME=onnx but this model has no compiled form: {reason}")
    if choice in ("auto", "onnx") and spec is not None:
        return OnnxRuntime(path_of(spec.file), spec, threads)
    return SklearnRuntime(path_of("model.pkl"), threads)
