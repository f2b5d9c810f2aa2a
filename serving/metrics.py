"""Prometheus metrics of the scoring service, beside BentoML's own bentoml_service_*."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import psutil
from prometheus_client import Counter, Gauge, Histogram, multiprocess

from serving.contract import SCORE_EDGES, Lineage

ROWS_SCORED = Counter("fraud_rows_scored_total", "Transactions scored")
ROWS_FLAGGED = Counter("fraud_rows_flagged_total", "Transactions at or above the threshold")
VALIDATION_FAILURES = Counter(
    "fraud_validation_failures_total", "Rejected requests, by the rule they broke", ["reason"]
)
LABELS_RECEIVED = Counter("fraud_labels_received_total", "Labels received on /feedback")
BATCH_ROWS = Histogram(
    "fraud_batch_rows",
    "Rows per scored request",
    buckets=(1, 10, 100, 1_000, 10_000, 100_000, 300_000),
)
INFERENCE_SECONDS = Histogram(
    "fraud_inference_seconds",
    "Model time per scored request, by batch size band",
    ["batch_band"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PROBABILITY = Histogram(
    "fraud_probability",
    "Fraud probabilities returned",
    buckets=SCORE_EDGES[1:],
)
# Gauges below are per process; "livemax" keeps one series per label set across workers.
DRIFT_PSI = Gauge(
    "fraud_drift_psi",
    "PSI of the recent window against the training reference (score or feature)",
    ["feature"],
    multiprocess_mode="livemax",
)
DRIFT_WINDOW_ROWS = Gauge(
    "fraud_drift_window_rows", "Rows in the drift window", multiprocess_mode="livemax"
)
REFERENCE_FLAGGED_RATIO = Gauge(
    "fraud_reference_flagged_ratio",
    "Share of reference (test split) rows at or above the threshold",
    multiprocess_mode="livemax",
)
PERFORMANCE_FLOOR = Gauge(
    "fraud_performance_floor",
    "What realised performance may fall to before an alert: the test split's figure less "
    "the contract's performance margin",
    ["metric"],
    multiprocess_mode="livemax",
)
MODEL_INFO = Gauge(
    "fraud_model_info",
    "The model in service (value 1)",
    # Content identities, the same wherever this Bento runs; the registry maps model_md5
    # to its version and training run (MLflow tag model_md5).
    # runtime: onnx (the verified compiled model) or sklearn.
    ["model_tag", "registered_model", "model_md5", "model_family", "train_data_md5", "runtime"],
    # One series for the service, not one per worker pid (dead ones included).
    multiprocess_mode="livemax",
)


def set_model_info(lineage: Lineage, model_tag: str, runtime: str) -> None:
    MODEL_INFO.labels(
        model_tag=model_tag,
        runtime=runtime,
        registered_model=lineage.registered_model,
        model_md5=lineage.model_md5,
        model_family=lineage.model_family,
        train_data_md5=lineage.train_data_md5,
    ).set(1)


def set_performance_floor(test_metrics: dict[str, float], margin: float) -> None:
    """The alert rules compare realised figures with these (monitoring/alerts.yml)."""
    for metric, test_name in (("alert_precision", "precision"),
                              ("average_precision", "average_precision")):  # fmt: skip
        if test_name in test_metrics:
            PERFORMANCE_FLOOR.labels(metric=metric).set(test_metrics[test_name] - margin)


def batch_band(rows: int) -> str:
    """Latency depends on batch size: alerts and panels compare like with like."""
    if rows == 1:
        return "1"
    if rows <= 100:
        return "2-100"
    return "101-10k" if rows <= 10_000 else ">10k"


def observe_batch(
    rows: int,
    seconds: float,
    probabilities: np.ndarray,
    flagged: int,
    psi: dict[str, float],
    window_rows: int,
) -> None:
    ROWS_SCORED.inc(rows)
    ROWS_FLAGGED.inc(flagged)
    BATCH_ROWS.observe(rows)
    INFERENCE_SECONDS.labels(batch_band=batch_band(rows)).observe(seconds)
    _observe_many(PROBABILITY, probabilities)
    for feature, value in psi.items():
        DRIFT_PSI.labels(feature=feature).set(value)
    DRIFT_WINDOW_ROWS.set(window_rows)


def _observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """Histogram.observe() for a whole array at once.

    One observe() per row costs seconds on a 300k-row batch, and prometheus_client has
    no bulk call, so add the per-bucket counts to its bucket values directly (the same
    objects observe() increments; pinned prometheus-client, covered by a test).
    """
    bounds = np.asarray(histogram._upper_bounds)
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    for bucket, count in zip(histogram._buckets, counts, strict=True):
        if count:
            bucket.inc(int(count))
    histogram._sum.inc(float(np.sum(values)))


def forget_dead_processes() -> list[int]:
    """Drop the live-gauge files of worker processes that are gone.

    prometheus_client only does this when a process says it is dying; a worker killed
    with -9 cannot, so its drift gauges kept firing FraudScoreDrift and BentoML's
    request_in_progress stayed stuck. A worker calls this when it starts (the arbiter
    starts one in place of a dead one)."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return []
    pids = {int(f.stem.rsplit("_", 1)[1]) for f in Path(directory).glob("gauge_live*_*.db")}
    dead = sorted(pid for pid in pids if not psutil.pid_exists(pid))
    for pid in dead:
        multiprocess.mark_process_dead(pid, directory)
    return dead
