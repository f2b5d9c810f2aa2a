"""Log the trained model as an MLflow model that scores like the service.

One MLflow model, two flavors:
- `sklearn`: mlflow.sklearn's own pickle (`model.pkl`), exactly as before, so the DVC
  output, the registered version and the Bento's model keep one file and one md5, and
  `mlflow.sklearn.load_model` still returns the estimator;
- `python_function`: loaded by serving/mlflow_model.py (shipped in the model's `code/`),
  which applies the serving contract that the package stage adds to this logged model
  later: the service's checks, threshold and risk band, for `mlflow models serve`,
  `mlflow models predict`, `mlflow.pyfunc.load_model` and `spark_udf`.

This is MLflow's custom-flavor mechanism: `Model.log(flavor=<module with save_model>)`,
and `mlflow.pyfunc.add_to_model` naming the loader module (mlflow/models/model.py,
mlflow/pyfunc/__init__.py; how mlflow.sklearn itself logs).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import Model, ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from serving import mlflow_model as loader
from serving.contract import OUTPUT_TYPES

# No input schema: MLflow would refuse the real file's integer `Time` ("Can not safely
# convert int64 to float64") and name missing columns itself; the contract's checks
# (serving/scoring.py) cast and refuse as the service does instead.
SIGNATURE = ModelSignature(
    inputs=None,
    outputs=Schema([ColSpec(t, n) for n, t in OUTPUT_TYPES.items()]),
    # The service's optional threshold override; None: the contract's.
    params=ParamSchema([ParamSpec("threshold", "double", None)]),
)


def save_model(path: str, mlflow_model: Model, sk_model: Any, code_dir: str, **kwargs: Any) -> None:
    """The flavor's save (Model.log calls it): mlflow.sklearn's save, then its
    python_function flavor pointed at our loader."""
    kwargs.pop("validate_serving_input", None)  # Model.log's option, not a save option
    mlflow.sklearn.save_model(
        sk_model, path, mlflow_model=mlflow_model, code_paths=[code_dir], **kwargs
    )
    pyfunc = mlflow_model.flavors[mlflow.pyfunc.FLAVOR_NAME]
    mlflow.pyfunc.add_to_model(
        mlflow_model,
        loader_module=loader.LOADER_MODULE,
        code=pyfunc["code"],
        conda_env=pyfunc["env"]["conda"],
        python_env=pyfunc["env"]["virtualenv"],
        model_path=loader.MODEL_FILE,
    )
    mlflow_model.save(str(Path(path) / "MLmodel"))


def log_scoring_model(model: Any, example: pd.DataFrame, pip_requirements: list[str]) -> ModelInfo:
    """Log `model` to the active run as the logged model `model` (both flavors)."""
    import numpy
    import pyarrow

    with tempfile.TemporaryDirectory() as scratch:
        # Only the modules the loader imports, as the package `serving` (so the model's
        # code/ folder holds serving/mlflow_model.py, serving/scoring.py, ...).
        code = Path(scratch) / "serving"
        code.mkdir()
        for name in loader.SHIPPED:  # the files this process imported, not a checkout's
            shutil.copyfile(Path(loader.__file__).with_name(name), code / name)
        return Model.log(
            artifact_path=None,  # deprecated in MLflow 3 (`name` instead), yet required
            name="model",
            flavor=sys.modules[__name__],  # this module: its save_model above
            sk_model=model,
            serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_PICKLE,
            code_dir=str(code),
            input_example=example,
            signature=SIGNATURE,
            # The example cannot be scored yet: the contract comes with package.
            validate_serving_input=False,
            pip_requirements=[
                *pip_requirements,
                f"pandas=={pd.__version__}",
                f"numpy=={numpy.__version__}",
                f"pyarrow=={pyarrow.__version__}",
            ],
        )
