"""Compile a fitted fraud model into one ONNX graph that runs in float64 on ONNX Runtime.

skl2onnx builds tree ensembles in float32 (its float64 TreeEnsembleClassifier does not
load in onnxruntime 1.32, and its HGB converter fails under protobuf 7), and float32
split thresholds move scores by ~1e-5 and flip rows that sit on a split. This module
writes the graph itself with ONNX's `TreeEnsemble` operator (ai.onnx.ml opset 5), which
takes float64 splits and leaf weights, so the compiled model computes what scikit-learn
computes up to rounding (~1e-15), and `package` verifies that on every validation and
test row before it ships it. The fitted trees are read through treelite's importers,
which keep them in float64, not from scikit-learn's or LightGBM's private attributes.

It compiles exactly the shapes `stages.lib.modeling` fits: the feature ColumnTransformer
(periodic hour spline, log1p(Amount), V1..V28, optionally standardised), HGB, LightGBM,
ExtraTrees, RandomForest or logistic regression, their soft average, and the sigmoid
calibration on top. Anything else raises `NotCompilable` and the service keeps
scikit-learn for it.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import onnx
import pandas as pd
from onnx import TensorProto, helper, numpy_helper
from sklearn.calibration import CalibratedClassifierCV, _SigmoidCalibration
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import (
    ExtraTreesClassifier,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
    StackingClassifier,
    VotingClassifier,
)
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, SplineTransformer, StandardScaler

from stages.lib.modeling import LOG_AMOUNT
from stages.lib.schema import FEATURES

INPUT = "transactions"  # float64 [rows, len(FEATURES)], columns in FEATURES order
OUTPUT = "fraud_probability"  # float64 [rows]
OPSETS = [helper.make_opsetid("", 21), helper.make_opsetid("ai.onnx.ml", 5)]
DOUBLE = TensorProto.DOUBLE
# TreeEnsemble (ai.onnx.ml opset 5) attribute codes
BRANCH_LEQ, AGGREGATE_AVERAGE, AGGREGATE_SUM = 0, 0, 1
# treelite's codes (include/treelite/enum/): TreeNodeType::kNumericalTestNode,
# Operator::kLE, TaskType::kBinaryClf and kMultiClf
TL_NUMERICAL, TL_LEQ, TL_BINARY, TL_MULTICLASS = 1, 3, 0, 2
# The graph's spline and log(1 + x) features are within a few ulps (~2e-15) of sklearn's,
# not equal. HGB puts split thresholds on training values (its quantile bins, where
# values tie), so a row equal to a threshold, which sklearn sends left, could go right.
# Thresholds move up by this much (relative; absolute below 1): values equal to them stay
# left, and no real value lies between a threshold and this margin above it (package
# verifies every row). Smaller than the noise sklearn's own spline leaves where a basis
# function is zero (5e-14 seen), so that noise stays on the side it was trained on.
SPLIT_MARGIN = 1e-14


class NotCompilable(ValueError):
    """The model has a part this compiler does not translate (served by scikit-learn)."""


class _Graph:
    """Accumulates nodes and constants with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value: Any, hint: str = "c", dtype: Any = np.float64) -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str = "", **attrs: Any) -> str:
        out = self.name(hint or op_type.lower())
        domain = "ai.onnx.ml" if op_type == "TreeEnsemble" else ""
        self.nodes.append(helper.make_node(op_type, inputs, [out], domain=domain, **attrs))
        return out

    def column(self, x: str, index: int) -> str:
        """Column `index` of a 2-D tensor, kept 2-D: [rows, 1]."""
        starts, ends = (
            self.const([index], "start", np.int64),
            self.const([index + 1], "end", np.int64),
        )
        axes = self.const([1], "axis", np.int64)
        return self.op("Slice", [x, starts, ends, axes], "col")

    def linear(self, x: str, scale: float, offset: float) -> str:
        """scale * x + offset, in the order numpy evaluates `a * x + b`."""
        return self.op("Add", [self.op("Mul", [x, self.const(scale)]), self.const(offset)])

    def sigmoid(self, x: str) -> str:
        return self.op("Sigmoid", [x])


# ---------------------------------------------------------------- features


def _periodic_spline(g: _Graph, x: str, spline: SplineTransformer) -> str:
    """The fitted periodic B-spline basis as piecewise cubics (one per knot interval),
    coefficients taken from the fitted transformer itself at four points per interval."""
    bspline = spline.bsplines_[0]
    k = bspline.k
    breaks = np.asarray(bspline.t[k : bspline.t.size - k])  # knots spanning one period
    start, period = breaks[0], breaks[-1] - breaks[0]
    widths = np.diff(breaks)
    nodes = np.array([0.05, 0.35, 0.65, 0.95])  # inside each interval, well conditioned
    vandermonde = np.vander(nodes, 4, increasing=True)
    coefficients = []
    for left, width in zip(breaks[:-1], widths, strict=True):
        points = left + nodes * width
        names = getattr(spline, "feature_names_in_", None)
        points = pd.DataFrame({names[0]: points}) if names is not None else points.reshape(-1, 1)
        values = spline.transform(points)  # [4, n_basis]
        coefficients.append(np.linalg.solve(vandermonde, values))  # [4 powers, n_basis]
    table = np.stack(coefficients)  # [intervals, 4, n_basis]
    # sklearn: x = t[k] + (X - t[k]) % period
    wrapped = g.op(
        "Add",
        [g.op("Mod", [g.op("Sub", [x, g.const(start)]), g.const(period)], fmod=1), g.const(start)],
    )
    # interval index: how many interior breaks are <= x
    interior = g.const(breaks[1:-1].reshape(1, -1))
    index = g.op(
        "ReduceSum",
        [g.op("Cast", [g.op("GreaterOrEqual", [wrapped, interior])], to=TensorProto.INT64),
         g.const([1], "axis", np.int64)],
        keepdims=1,
    )  # fmt: skip
    index = g.op("Squeeze", [index, g.const([1], "axis", np.int64)])  # [rows]
    left = g.op("Gather", [g.const(breaks[:-1]), index], axis=0)
    width = g.op("Gather", [g.const(widths), index], axis=0)
    u = g.op("Div", [g.op("Sub", [g.op("Squeeze", [wrapped, g.const([1], "a", np.int64)]), left]),
                     width])  # fmt: skip
    u = g.op("Unsqueeze", [u, g.const([1], "axis", np.int64)])  # [rows, 1]
    rows = g.op("Gather", [g.const(table), index], axis=0)  # [rows, 4, n_basis]

    def power(p: int) -> str:
        got = g.op("Gather", [rows, g.const(p, "p", np.int64)], axis=1)  # [rows, n_basis]
        return got

    value = power(3)
    for p in (2, 1, 0):  # Horner
        value = g.op("Add", [g.op("Mul", [value, u]), power(p)])
    return value


def _features(g: _Graph, x: str, prep: Any) -> str:
    """The ColumnTransformer (and optional StandardScaler) as a [rows, n] float64 tensor."""
    scaler = None
    if isinstance(prep, Pipeline):
        steps = [s for _, s in prep.steps]
        if len(steps) != 2 or not isinstance(steps[1], StandardScaler):
            raise NotCompilable(f"feature pipeline {prep}")
        prep, scaler = steps
    if not isinstance(prep, ColumnTransformer):
        raise NotCompilable(f"features are {type(prep).__name__}, not a ColumnTransformer")
    if prep.remainder != "drop" and any(name == "remainder" for name, *_ in prep.transformers_):
        raise NotCompilable("ColumnTransformer remainder")
    parts = []
    for name, transformer, columns in prep.transformers_:
        if name == "remainder" or transformer == "drop":
            continue
        indices = [FEATURES.index(c) for c in columns]
        # a fitted ColumnTransformer holds "passthrough" as an identity FunctionTransformer
        identity = isinstance(transformer, FunctionTransformer) and transformer.func is None
        if transformer == "passthrough" or identity:
            parts.append(g.op("Gather", [x, g.const(indices, "cols", np.int64)], axis=1))
        elif isinstance(transformer, SplineTransformer) and len(indices) == 1:
            if transformer.extrapolation != "periodic":
                raise NotCompilable("only periodic splines are compiled")
            parts.append(_periodic_spline(g, g.column(x, indices[0]), transformer))
        elif (
            isinstance(transformer, FunctionTransformer)
            and transformer.func is LOG_AMOUNT
            and transformer.kw_args is None
        ):
            cols = g.op("Gather", [x, g.const(indices, "cols", np.int64)], axis=1)
            # log(1 + x): the formula scipy's log1p uses above 0.414, within an ulp of
            # it below; verified by package
            parts.append(g.op("Log", [g.op("Add", [cols, g.const(1.0)])]))
        else:
            raise NotCompilable(f"feature transformer {name}: {transformer}")
    features = g.op("Concat", parts, axis=1)
    if scaler is not None:
        mean = scaler.mean_ if scaler.with_mean else np.zeros(scaler.n_features_in_)
        scale = scaler.scale_ if scaler.with_std else np.ones(scaler.n_features_in_)
        features = g.op("Div", [g.op("Sub", [features, g.const(mean)]), g.const(scale)])
    return features


# ---------------------------------------------------------------- trees


def _tree_ensemble(
    g: _Graph,
    x: str,
    trees: list[dict[str, np.ndarray]],
    aggregate: int,
    base: float = 0.0,
    margin: float = SPLIT_MARGIN,
) -> str:
    """One TreeEnsemble node over trees given as arrays: feature, threshold, left, right
    (-1 for a leaf), value (leaves), missing_left. Returns a [rows] tensor."""
    feature, split, true_ids, true_leaf, false_ids, false_leaf, missing = ([] for _ in range(7))
    roots, leaf_weights = [], []
    for tree in trees:
        internal = np.flatnonzero(tree["left"] >= 0)
        if internal.size == 0:  # a single leaf: a split no row fails, both sides that leaf
            roots.append(len(feature))
            leaf = len(leaf_weights)
            leaf_weights.append(float(tree["value"][0]))
            feature.append(0)
            split.append(np.inf)
            true_ids.append(leaf), true_leaf.append(1), false_ids.append(leaf)
            false_leaf.append(1), missing.append(1)
            continue
        node_id = {n: len(feature) + i for i, n in enumerate(internal)}
        leaves = np.flatnonzero(tree["left"] < 0)
        leaf_id = {n: len(leaf_weights) + i for i, n in enumerate(leaves)}
        leaf_weights.extend(float(tree["value"][n]) for n in leaves)
        roots.append(node_id[0])
        for n in internal:
            feature.append(int(tree["feature"][n]))
            threshold = float(tree["threshold"][n])
            split.append(threshold + margin * max(1.0, abs(threshold)))
            missing.append(int(bool(tree["missing_left"][n])))
            for child, ids, is_leaf in (
                (tree["left"][n], true_ids, true_leaf),
                (tree["right"][n], false_ids, false_leaf),
            ):
                if tree["left"][child] < 0:
                    ids.append(leaf_id[child]), is_leaf.append(1)
                else:
                    ids.append(node_id[child]), is_leaf.append(0)
    out = g.op(
        "TreeEnsemble",
        [x],
        "trees",
        aggregate_function=aggregate,
        n_targets=1,
        post_transform=0,
        tree_roots=roots,
        nodes_featureids=feature,
        nodes_splits=numpy_helper.from_array(np.asarray(split, dtype=np.float64)),
        nodes_modes=numpy_helper.from_array(np.full(len(feature), BRANCH_LEQ, dtype=np.uint8)),
        nodes_truenodeids=true_ids,
        nodes_trueleafs=true_leaf,
        nodes_falsenodeids=false_ids,
        nodes_falseleafs=false_leaf,
        nodes_missing_value_tracks_true=missing,
        leaf_targetids=[0] * len(leaf_weights),
        leaf_weights=numpy_helper.from_array(np.asarray(leaf_weights, dtype=np.float64)),
    )
    flat = g.op("Squeeze", [out, g.const([1], "axis", np.int64)])
    return g.op("Add", [flat, g.const(base)]) if base else flat


def _imported(clf: Any) -> Any:
    """The fitted trees as a treelite model. Its importers copy scikit-learn's and
    LightGBM's float64 thresholds and leaf values as fitted (LightGBM's through the model
    text, written with round-trip precision), so this module reads neither library's
    private tree attributes. treelite is imported here: only `package` compiles."""
    import treelite

    if type(clf).__name__ == "LGBMClassifier":
        # treelite sends a missing value where 0.0 goes unless the split learned a side for
        # NaN, as LightGBM does; it does not record zero-as-missing (zeros to that side)
        if clf.booster_.params.get("zero_as_missing"):
            raise NotCompilable("LightGBM zero_as_missing")
        return treelite.frontend.from_lightgbm(clf.booster_)
    return treelite.sklearn.import_model(clf)


def _copied(accessor: Any, name: str) -> np.ndarray | str:
    """A field of a treelite model's header or tree, copied: get_field's array views the
    model's memory without holding the model, and would dangle once the model is freed."""
    value = accessor.get_field(name)
    return value if isinstance(value, str) else np.array(value)


def _header(model: Any, task: int, postprocessor: str, classes: int) -> dict[str, Any]:
    """Checks the imported model is a binary classifier of the expected kind (boosting:
    one raw score; forest: two class shares per leaf). Returns its averaging and base."""
    field = partial(_copied, model.get_header_accessor())
    kind = (int(field("task_type")[0]), field("postprocessor"))
    shape = (field("num_target").tolist(), field("num_class").tolist())
    if kind != (task, postprocessor) or shape != ([1], [classes]):
        raise NotCompilable(f"trees of a {kind[1]} model with {shape[1]} classes")
    if postprocessor == "sigmoid" and float(field("sigmoid_alpha")[0]) != 1.0:
        raise NotCompilable("sigmoid with a slope other than 1")
    return {"average": bool(field("average_tree_output")[0]), "base": field("base_scores")}


def _trees(model: Any, leaf_class: int | None = None) -> list[dict[str, np.ndarray]]:
    """The imported trees as the arrays `_tree_ensemble` takes. A leaf is its scalar value
    or, with `leaf_class`, that class's entry in its class-share vector (forests)."""
    trees = []
    for index in range(model.num_tree):
        field = partial(_copied, model.get_tree_accessor(index))
        left = field("cleft").astype(np.int64)  # -1 at a leaf; node 0 is the root
        internal = left >= 0
        numerical = field("node_type")[internal] == TL_NUMERICAL
        if not (numerical.all() and (field("cmp")[internal] == TL_LEQ).all()):
            raise NotCompilable("a categorical split or a split other than <=")
        value = field("leaf_value")
        if leaf_class is not None:
            at = np.where(internal, 0, field("leaf_vector_begin").astype(np.int64) + leaf_class)
            value = np.where(internal, 0.0, field("leaf_vector")[at])
        trees.append(
            {
                "feature": field("split_index"),
                "threshold": field("threshold"),
                "left": left,
                "right": field("cright").astype(np.int64),
                "value": value,
                "missing_left": field("default_left"),
            }
        )
    return trees


def _boosted_raw(g: _Graph, x: str, clf: Any) -> str:
    """decision_function of HGB or LightGBM: base score + sum of the leaf values (the
    learning rate is already in them), `<=` on float64 values, missing values to the side
    the fit chose (LightGBM without NaN-aware splits: the side of 0.0)."""
    model = _imported(clf)
    header = _header(model, TL_BINARY, "sigmoid", 1)
    if header["average"]:  # LightGBM's rf mode: treelite averages, LightGBM 4.7 sums
        raise NotCompilable("averaged boosted trees")
    return _tree_ensemble(g, x, _trees(model), AGGREGATE_SUM, float(header["base"][0]))


def _forest_proba(g: _Graph, x: str, forest: Any) -> str:
    """Mean of the trees' leaf fraud shares (treelite divides each leaf's class counts by
    their sum, as this did). scikit-learn trees compare float32 inputs, so the features
    are rounded to float32 first, as predict_proba does."""
    model = _imported(forest)
    header = _header(model, TL_MULTICLASS, "identity_multiclass", 2)
    if not header["average"] or np.any(header["base"] != 0.0):
        raise NotCompilable("a forest that does not average its trees")
    trees = _trees(model, leaf_class=1)  # predict_proba's column 1: fraud
    as_float32 = g.op("Cast", [g.op("Cast", [x], to=TensorProto.FLOAT)], to=DOUBLE)
    # float32 rounding already absorbs the graph's few-ulp differences: exact thresholds
    return _tree_ensemble(g, as_float32, trees, AGGREGATE_AVERAGE, margin=0.0)


def _linear(g: _Graph, x: str, clf: LogisticRegression) -> str:
    if clf.coef_.shape[0] != 1:
        raise NotCompilable("multi-class logistic regression")
    product = g.op("MatMul", [x, g.const(clf.coef_.ravel())])
    return g.op("Add", [product, g.const(float(clf.intercept_[0]))])


# ---------------------------------------------------------------- models


def _pipeline_output(g: _Graph, x: str, pipe: Any, want: str) -> str:
    """A feature pipeline + classifier: `want` is "proba" or "decision"."""
    if not isinstance(pipe, Pipeline) or len(pipe.steps) != 2:
        raise NotCompilable(f"model is {type(pipe).__name__}, not a 2-step Pipeline")
    features = _features(g, x, pipe.steps[0][1])
    clf = pipe.steps[1][1]
    if isinstance(clf, HistGradientBoostingClassifier) or type(clf).__name__ == "LGBMClassifier":
        raw = _boosted_raw(g, features, clf)  # decision_function: the raw margin
    elif isinstance(clf, LogisticRegression):
        raw = _linear(g, features, clf)
    elif isinstance(clf, (ExtraTreesClassifier, RandomForestClassifier)):
        if want == "decision":
            raise NotCompilable("forests have no decision_function")
        return _forest_proba(g, features, clf)
    else:
        raise NotCompilable(f"classifier {type(clf).__name__}")
    return raw if want == "decision" else g.sigmoid(raw)


def _probability(g: _Graph, x: str, model: Any) -> str:
    """predict_proba[:, 1] of an uncalibrated model: a pipeline or a soft vote."""
    if isinstance(model, VotingClassifier):
        if model.voting != "soft" or model.weights is not None:
            raise NotCompilable("only unweighted soft voting")
        members = [_pipeline_output(g, x, m, "proba") for m in model.estimators_]
        total = members[0]
        for member in members[1:]:
            total = g.op("Add", [total, member])
        return g.op("Div", [total, g.const(float(len(members)))])
    return _pipeline_output(g, x, model, "proba")


def _unfrozen(model: Any) -> Any:
    return model.estimator if isinstance(model, FrozenEstimator) else model


def _calibrated(g: _Graph, x: str, model: Any) -> str:
    if isinstance(model, CalibratedClassifierCV):
        if len(model.calibrated_classifiers_) != 1:
            raise NotCompilable("calibration ensembles")
        fitted = model.calibrated_classifiers_[0]
        calibrator = fitted.calibrators[0]
        if not isinstance(calibrator, _SigmoidCalibration):
            raise NotCompilable(f"calibrator {type(calibrator).__name__}")
        inner = _unfrozen(fitted.estimator)
        score = _pipeline_output(g, x, inner, "decision")
        # sklearn: expit(-(a * score + b))
        return g.sigmoid(g.op("Neg", [g.linear(score, calibrator.a_, calibrator.b_)]))
    if isinstance(model, StackingClassifier):
        if len(model.estimators_) != 1 or model.stack_method_ != ["predict_proba"]:
            raise NotCompilable("stacking other than one model's probability")
        if model.passthrough:
            raise NotCompilable("stacking passthrough")
        probability = _probability(g, x, _unfrozen(model.estimators_[0]))
        head = model.final_estimator_
        steps = dict(head.steps) if isinstance(head, Pipeline) else {}
        clip, logit, platt = steps.get("clip"), steps.get("logit"), steps.get("platt")
        if not (
            isinstance(clip, FunctionTransformer)
            and clip.func is np.clip
            and isinstance(logit, FunctionTransformer)
            and getattr(logit.func, "__name__", "") == "logit"
            and isinstance(platt, LogisticRegression)
            and len(steps) == 3
        ):
            raise NotCompilable("stacking head other than Platt on clipped log-odds")
        low, high = clip.kw_args["a_min"], clip.kw_args["a_max"]
        clipped = g.op("Clip", [probability, g.const(low), g.const(high)])
        log_odds = g.op("Log", [g.op("Div", [clipped, g.op("Sub", [g.const(1.0), clipped])])])
        score = g.linear(log_odds, float(platt.coef_.ravel()[0]), float(platt.intercept_[0]))
        return g.sigmoid(score)
    return _probability(g, x, model)


def compile_model(model: Any) -> onnx.ModelProto:
    """The fitted model's predict_proba[:, 1] as a float64 ONNX graph, or NotCompilable."""
    g = _Graph()
    probability = _calibrated(g, INPUT, model)
    g.nodes.append(helper.make_node("Identity", [probability], [OUTPUT]))
    graph = helper.make_graph(
        g.nodes,
        "fraud_probability",
        [helper.make_tensor_value_info(INPUT, DOUBLE, [None, len(FEATURES)])],
        [helper.make_tensor_value_info(OUTPUT, DOUBLE, [None])],
        initializer=g.initializers,
    )
    compiled = helper.make_model(graph, opset_imports=OPSETS, producer_name="fraudops")
    onnx.checker.check_model(compiled, full_check=True)
    return compiled


def session(compiled: bytes, threads: int = 1) -> Any:
    """An onnxruntime session over the compiled bytes, as the service makes one."""
    from serving.runtime import onnx_session

    return onnx_session(compiled, threads)


def verify(
    model: Any, compiled: bytes, frame: Any, threshold: float, tolerance: float
) -> dict[str, Any]:
    """Score `frame` with scikit-learn and with the compiled graph: the largest absolute
    difference of probabilities and how many decisions (probability >= threshold) differ.
    `ok` only if none differs and the difference is within `tolerance`."""
    expected = model.predict_proba(frame[list(FEATURES)])[:, 1]
    got = session(compiled, threads=2).run(
        [OUTPUT], {INPUT: frame[list(FEATURES)].to_numpy(dtype=np.float64)}
    )[0]
    difference = float(np.max(np.abs(got - expected))) if len(frame) else 0.0
    flips = int(np.sum((got >= threshold) != (expected >= threshold)))
    return {
        "rows_checked": int(len(frame)),
        "max_abs_difference": difference,
        "flipped_decisions": flips,
        "tolerance": float(tolerance),
        "ok": flips == 0 and difference <= tolerance,
    }
