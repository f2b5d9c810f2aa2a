"""The training-serving contract, typed: the one definition both sides read.

The package stage builds a `Contract` (stages/lib/contract.py) and writes it as
contract.json beside the model; the service, the batch job, the MLflow pyfunc and the
tests load it with `Contract.read` and read attributes. Training and serving share this
contract, not code: this module needs only pydantic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, ValidationError

CONTRACT_VERSION = 1
# Probabilities of fraud crowd near 0, so the score's bins are log-spaced there: the drift
# reference's bins and the Prometheus histogram's buckets (serving/metrics.py).
SCORE_EDGES = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 0.6, 1.0)
# The columns every scoring path adds (service, file outputs, MLflow pyfunc, Spark job),
# with their MLflow signature types.
OUTPUT_TYPES = {"fraud_probability": "double", "is_fraud": "boolean", "risk_band": "string"}
OUTPUT_COLUMNS = tuple(OUTPUT_TYPES)
# Added only when a request asks for reason codes (serving/reasons.py): per row, the top-k
# features by contribution (JSON: a list of objects; files: text such as "V14 = -9.1 (+2.3)").
REASONS_COLUMN = "reasons"
# The champion's model card (stages/lib/model_card.py), beside the contract in the Bento's
# model and attached to the registered version in MLflow; served at /model-card.
CARD_JSON, CARD_MD = "model_card.json", "model_card.md"
# A transaction's id: the client's (JSON field, file column, or a Parquet file's index), or
# "<request id>:<row>" assigned by the service; echoed in every output, the key of the
# decision log and of the labels that come back.
ID_COLUMN = "transaction_id"
ID_RULE = "1 to 64 characters of A-Z a-z 0-9 . _ : - (or an integer)"


class ContractError(ValueError):
    """A contract that cannot be served: unreadable, unknown version, or malformed. The
    message is one line, naming the file and the first problem."""


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Column(_Part):
    """An input column and the range a value must lie in (None: unbounded)."""

    name: str
    valid_min: float | None = None
    valid_max: float | None = None


class Feature(Column):
    """A model feature: the range seen in training, and the range serving accepts (the
    training range widened by package.range_margin)."""

    dtype: Literal["float64"] = "float64"
    train_min: float
    train_max: float
    valid_min: float
    valid_max: float


class InputSchema(_Part):
    """What input validation needs: the columns with their ranges, and the columns that
    may come along and are ignored (the label). A model's contract is one; the prepare
    stage checks raw data against one built from the schema alone."""

    features: list[Column]
    ignored_columns: list[str] = []

    @property
    def feature_names(self) -> list[str]:
        """The model's input columns, in the order it was trained on."""
        return [f.name for f in self.features]

    def feature(self, name: str) -> Column:
        return next(f for f in self.features if f.name == name)


class Binned(_Part):
    """A reference distribution: bin edges (None = open-ended) and each bin's share."""

    edges: list[float | None]
    fractions: list[float]


class ScoreReference(Binned):
    mean: float


class Reference(_Part):
    """What the drift checks compare live traffic with (the test split)."""

    rows: int
    fraud_rate: float
    flagged_ratio: float
    score: ScoreReference
    features: dict[str, Binned]


class RiskBand(_Part):
    name: str
    min: float  # lower edge of fraud probability


class Costs(_Part):
    cost_missed_fraud: float
    cost_false_alarm: float


class Lineage(_Part):
    registered_model: str
    model_md5: str
    model_family: str
    train_data_md5: str
    valid_data_md5: str
    test_data_md5: str
    params: dict[str, str]


class CompiledSpec(_Part):
    """The ONNX file and the check package ran against scikit-learn before shipping it."""

    file: str
    md5: str
    input: str
    output: str
    rows_checked: int
    max_abs_difference: float
    flipped_decisions: int
    tolerance: float
    ok: bool


class Runtime(_Part):
    default: Literal["onnx", "sklearn"]
    onnx: CompiledSpec | None = None
    reason: str | None = None  # why there is no compiled form


class Contract(InputSchema):
    contract_version: Literal[1] = CONTRACT_VERSION
    features: list[Feature]
    output: dict[str, str]
    threshold: float
    costs: Costs
    risk_bands: list[RiskBand]
    reference: Reference
    test_metrics: dict[str, float]
    # How far realised alert precision or average precision may fall below the test
    # metrics before an alert (params.yaml package.performance_margin).
    performance_margin: float = 0.1
    lineage: Lineage
    runtime: Runtime

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), indent=2).encode()

    @classmethod
    def parse(cls, raw: bytes | str, source: str = "contract.json") -> Contract:
        """The contract in `raw`, or ContractError in one line."""
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ContractError(f"{source} is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ContractError(f"{source} is not a JSON object")
        version = data.get("contract_version")
        if version != CONTRACT_VERSION:
            raise ContractError(
                f"{source} has contract_version {version!r}; this code reads version "
                f"{CONTRACT_VERSION} (rebuild the Bento with `dvc repro package`)"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "(top level)"
            raise ContractError(
                f"{source}: {where}: {first['msg']} ({exc.error_count()} problem(s))"
            ) from None

    @classmethod
    def read(cls, path: str | Path) -> Contract:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ContractError(f"cannot read {path}: {exc.strerror}") from None
        return cls.parse(raw, str(path))


class Limits(BaseModel):
    """The service's request limits, as GET /schema publishes them."""

    max_rows_per_request: int
    max_json_rows_per_request: int
    max_payload_bytes: int
    max_json_payload_bytes: int
    body_timeout_seconds: float
    unknown_columns: Literal["ignore", "reject"]


class ServedRuntime(Runtime):
    serving: str  # the runtime this service scores with


class PublishedContract(InputSchema):
    """GET /schema: the contract less its reference distributions, with the runtime in
    use, the model's tag and the service's limits. Clients (the UI) read it by attribute;
    fields a newer service adds are ignored, so an older client keeps working."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    contract_version: Literal[1]
    features: list[Feature]
    output: dict[str, str]
    threshold: float
    costs: Costs
    risk_bands: list[RiskBand]
    test_metrics: dict[str, float]
    lineage: Lineage
    runtime: ServedRuntime
    model_tag: str
    limits: Limits

    @classmethod
    def of(cls, contract: Contract, serving: str, model_tag: str, limits: Limits) -> Self:
        public = contract.model_dump(exclude={"reference"})
        public["runtime"] = {**public["runtime"], "serving": serving}
        return cls(**public, model_tag=model_tag, limits=limits)
