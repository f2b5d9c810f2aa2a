"""The registered model as an MLflow pyfunc that answers like the service.

`mlflow.pyfunc.load_model`, `mlflow models serve` and `mlflow.pyfunc.spark_udf` call
this module's `_load_pyfunc` (the logged model's `python_function` loader, set by the
train stage) on the logged model's folder. It holds `model.pkl`, the scikit-learn model
that train logged, and `contract.json`, which the package stage adds to the same logged
model once the contract exists (threshold and ranges come from evaluate and package),
along with the current copy of this module and those it imports (code/serving/).
Without a contract, or with a contract for another model file, it refuses to load: the
model alone would answer bare probabilities with no checks, threshold or risk band.

Rows are checked and scored by the service's own code (scoring.validate, scoring.score)
with runtime.py's scikit-learn path, which package verified against the served ONNX
graph; a broken rule becomes MLflow's INVALID_PARAMETER_VALUE (HTTP 400) with the
service's rule, column and rows in the body.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST

from serving.contract import Contract, ContractError
from serving.runtime import SklearnRuntime
from serving.scoring import RequestError, score, validate

LOADER_MODULE = "serving.mlflow_model"  # importable from the logged model's code/ folder
# What the logged model carries under code/serving/: this module and what it imports.
SHIPPED = ("__init__.py", "contract.py", "errors.py", "mlflow_model.py", "parquet_upload.py",
           "runtime.py", "scoring.py")  # fmt: skip
MODEL_FILE = "model.pkl"  # mlflow.sklearn's file name for the pickle format
CONTRACT_FILE = "contract.json"  # added by the package stage


def invalid_input(problem: RequestError) -> MlflowException:
    """The service's RequestError as MLflow's client error: one line naming the rule,
    the column and the first rows (0-based positions in the batch), and the same
    fields as the service's error body."""
    body = problem.body
    where = f" column '{body['column']}'" if "column" in body else ""
    rows = f" (rows {', '.join(map(str, body['rows']))})" if body.get("rows") else ""
    extra = {k: v for k, v in body.items() if k != "error"}
    return MlflowException(
        f"[{body['rule']}]{where}: {body['error']}{rows}", INVALID_PARAMETER_VALUE, **extra
    )


class ContractModel:
    """Validated rows in, the service's per-row answer out."""

    def __init__(self, folder: Path) -> None:
        path = folder / CONTRACT_FILE
        if not path.is_file():
            raise MlflowException(
                f"{folder} has no {CONTRACT_FILE}: this model version has no serving contract "
                "yet. Run the package stage (`dvc repro`) with it as the champion",
                RESOURCE_DOES_NOT_EXIST,
            )
        try:
            self.contract = Contract.read(path)
        except ContractError as exc:
            raise MlflowException(str(exc), RESOURCE_DOES_NOT_EXIST) from None
        expected = self.contract.lineage.model_md5
        model = folder / MODEL_FILE
        # Pickle runs code on load: check the file is the contract's before unpickling.
        actual = hashlib.md5(model.read_bytes()).hexdigest()
        if actual != expected:
            raise MlflowException(
                f"{model} has md5 {actual}, but {CONTRACT_FILE} is for {expected}: "
                "rerun the package stage for this model",
                RESOURCE_DOES_NOT_EXIST,
            )
        self.runtime = SklearnRuntime(str(model), threads=os.cpu_count() or 1)
        self.threshold = self.contract.threshold

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Per row, in input order: fraud_probability, is_fraud, risk_band. `params` may
        hold a `threshold` in [0, 1] (the contract's otherwise), as the service takes."""
        threshold = (params or {}).get("threshold")
        try:
            if threshold is None:
                threshold = self.threshold
            elif not (isinstance(threshold, int | float) and 0.0 <= threshold <= 1.0):
                raise RequestError(
                    400, "threshold", "threshold must be a number in [0, 1]", column="threshold"
                )
            if isinstance(model_input, dict):  # MLflow's "inputs" JSON: column -> values
                model_input = pd.DataFrame(model_input)
            if not isinstance(model_input, pd.DataFrame):
                raise RequestError(400, "input-type", "the input must be a table of "
                                   f"transactions, not {type(model_input).__name__}")  # fmt: skip
            features = validate(model_input, self.contract)
        except RequestError as problem:
            raise invalid_input(problem) from None
        return score(self.runtime.probability, features, float(threshold), self.contract.risk_bands)


def _load_pyfunc(path: str) -> ContractModel:
    """MLflow's entry point: `path` is the logged model's folder."""
    return ContractModel(Path(path))
