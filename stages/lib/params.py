"""The schema of params.yaml: every section and key, its type and its rule.

`stages.lib.project.stage_params` checks the whole file against `Params` before any
stage reads a key, so a bad value stops the stage with one line naming the key instead
of a traceback deep in the code that uses it. The defaults live in params.yaml only:
every key it holds today is required here, and unknown keys are refused (a typo would
otherwise be silently ignored while the stage uses the real key's value).

Validation is strict: a value must already have the type the stage will use (`8`, not
`"8"` or `8.0`, for an int), because stages read the raw values from params.yaml, not
the values this schema would coerce them to. Ints are accepted where floats are.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from stages.lib.schema import FEATURES

# The allowed values, as the code that uses them spells them (tests/unit/test_params_schema.py
# checks these against validation.DUPLICATE_POLICIES, splitting.STRATEGIES,
# modeling.MODELS, modeling.CALIBRATIONS and search.SPACES, so the two cannot drift apart).
DuplicatePolicy = Literal["drop", "keep", "fail"]
Strategy = Literal["time", "stratified"]
Family = Literal["logreg", "hgb", "random_forest", "extra_trees", "lightgbm"]
Calibration = Literal["auto", "sigmoid", "isotonic"]

PositiveInt = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=0)]  # numpy and scikit-learn refuse negative seeds
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
OpenFraction = Annotated[float, Field(gt=0, lt=1)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Folds = Annotated[int, Field(ge=2)]  # scikit-learn's splitters need at least two


def one_rule(kind: Any, rule: str) -> Any:
    """`kind` (a union) whose failure reads as one rule, not one error per union member
    (pydantic reports 'sqrt'-or-int-or-float as three errors under three odd keys)."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("one_rule", rule) from None

    return Annotated[kind, WrapValidator(check)]


def unique(kind: Any) -> Any:
    """A non-empty list of `kind` without repeats (pydantic 2 has no unique-items rule)."""

    def check(value: list, handler: ValidatorFunctionWrapHandler) -> list:
        value = handler(value)
        if len(set(value)) != len(value):
            raise PydanticCustomError("unique", "List should not repeat an item")
        return value

    return Annotated[list[kind], Field(min_length=1), WrapValidator(check)]


# read_table's formats; whether the file sits under the raw-data folder is prepare's rule,
# since that folder comes from dvc.yaml.
Source = one_rule(
    Literal["synthetic"] | Annotated[str, Field(pattern=r"(?i)\.(csv|parquet|pq)$")],
    "Input should be 'synthetic' or the path of a .csv or .parquet file",
)
ClassWeight = one_rule(
    Literal["balanced", "balanced_subsample"] | dict[int, Positive] | None,
    "Input should be 'balanced', 'balanced_subsample', a {class: weight} map or null",
)
MaxFeatures = one_rule(
    Literal["sqrt", "log2"] | PositiveInt | Annotated[float, Field(gt=0, le=1)],
    "Input should be 'sqrt', 'log2', a number of features >= 1 or a fraction in (0, 1]",
)
Families = unique(Family)
DriftFeatures = unique(Literal[FEATURES])
EarlyStopping = one_rule(Literal["auto"] | bool, "Input should be 'auto', true or false")
# BentoML's tag rule (bentoml._internal.tag): package.model_name becomes a model tag.
BentoName = Annotated[str, Field(pattern=r"^[a-z0-9]([-._a-z0-9]*[a-z0-9])?$", max_length=63)]


class Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", protected_namespaces=())


class Synthetic(Section):
    rows: Annotated[int, Field(ge=100)]  # synthetic.generate's own floor
    fraud_rate: Annotated[float, Field(gt=0, lt=0.5)]
    seed: Seed
    camouflaged_fraud_share: Fraction
    fraud_like_legit_share: NonNegative


class Data(Section):
    source: Source
    duplicates: DuplicatePolicy
    synthetic: Synthetic
    feedback: bool
    recent_days: Positive


class Split(Section):
    strategy: Strategy
    valid_size: OpenFraction
    test_size: OpenFraction
    seed: Seed

    @model_validator(mode="after")
    def train_keeps_rows(self) -> Split:
        total = self.valid_size + self.test_size
        if total >= 1:
            raise PydanticCustomError(
                "split_sizes",
                "valid_size + test_size should be below 1, so train keeps rows "
                "(got {valid_size} + {test_size})",
                {"valid_size": self.valid_size, "test_size": self.test_size},
            )
        return self


class Search(Section):
    families: Families
    trials: PositiveInt
    timeout_seconds: Positive
    folds: Folds
    negative_fraction: Annotated[float, Field(gt=0, le=1)]
    average_top_two: bool
    average_min_gain: NonNegative


class Logreg(Section):
    C: Positive
    class_weight: ClassWeight


class Hgb(Section):
    learning_rate: Positive
    max_iter: PositiveInt
    max_leaf_nodes: Annotated[int, Field(ge=2)]
    min_samples_leaf: PositiveInt
    l2_regularization: NonNegative
    early_stopping: EarlyStopping


class Forest(Section):
    n_estimators: PositiveInt
    min_samples_leaf: PositiveInt
    max_features: MaxFeatures
    class_weight: ClassWeight


class Lightgbm(Section):
    n_estimators: PositiveInt
    learning_rate: Positive
    num_leaves: Annotated[int, Field(ge=2)]
    min_child_samples: Annotated[int, Field(ge=0)]
    colsample_bytree: Annotated[float, Field(gt=0, le=1)]
    reg_lambda: NonNegative
    n_jobs: PositiveInt  # a fixed count: -1 (all cores) would differ from machine to machine


class Train(Section):
    model: Literal["auto"] | Family
    calibration: Calibration
    calibration_folds: Folds
    seed: Seed
    search: Search
    logreg: Logreg
    hgb: Hgb
    random_forest: Forest
    lightgbm: Lightgbm
    extra_trees: Forest


class Gate(Section):
    min_average_precision: Fraction
    min_roc_auc: Fraction


class Evaluate(Section):
    cost_missed_fraud: Positive
    cost_false_alarm: Positive
    review_budget: PositiveInt
    registered_model: Annotated[str, Field(min_length=1)]
    recent_min_frauds: PositiveInt
    gate: Gate


class Package(Section):
    model_name: BentoName
    range_margin: NonNegative
    drift_features: DriftFeatures
    compiled_tolerance: Positive
    performance_margin: NonNegative


class Params(Section):
    data: Data
    split: Split
    train: Train
    evaluate: Evaluate
    package: Package


class ParamsError(SystemExit):
    """params.yaml is unreadable or breaks the schema. A SystemExit, so a stage that does
    not catch it prints the message (one line per problem) and exits 1, no traceback."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        super().__init__("\n".join(lines))


SHOWN_VALUE = 60  # characters of an offending value quoted in a message


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN_VALUE else text[: SHOWN_VALUE - 3] + "..."


def error_lines(error: ValidationError, name: str = "params.yaml") -> list[str]:
    """One line per problem: the dotted key, pydantic's rule, and the value it got."""
    lines = []
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        # A missing key, or a rule across a section's keys, gets the whole section as its
        # input: the message says what matters. Any other input is the offending value.
        whole_section = isinstance(problem["input"], dict) and problem["type"] != "extra_forbidden"
        got = "" if whole_section else f" (got {_shown(problem['input'])})"
        lines.append(f"{name}: {key}: {problem['msg']}{got}")
    return lines


def load_params(path: Any) -> dict[str, Any]:
    """params.yaml's content, checked against `Params`; raises ParamsError otherwise."""
    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh)
    except OSError as exc:
        raise ParamsError([f"params.yaml: cannot read {path}: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ParamsError([f"params.yaml: not valid YAML{where}: {reason}"]) from None
    try:
        Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(error_lines(exc)) from None
    return raw


def costs(evaluate: dict[str, Any]) -> dict[str, float]:
    """The two business costs of the `evaluate` params, as the metrics take them."""
    return {
        "cost_missed_fraud": float(evaluate["cost_missed_fraud"]),
        "cost_false_alarm": float(evaluate["cost_false_alarm"]),
    }
