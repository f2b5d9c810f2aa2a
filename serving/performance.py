"""Realised and estimated performance, from the decision log, as Prometheus gauges.

Over sliding windows of decision time (1 day, 7 days, 30 days):
- realised, on the decisions whose labels have arrived (the latest label counts): alert
  precision, recall among labelled frauds, average precision, cost at the threshold (the
  contract's costs: a missed fraud, a false alarm), label coverage and median label delay;
- estimated, on every decision, from the calibrated probabilities, before any label:
  expected precision of the alerts (the mean probability of the flagged rows) and
  expected frauds (the sum of the probabilities).

One worker computes them (the one holding the data directory's lock file; another takes
over if it dies), so the figures are one series per window, not one per worker.
"""

from __future__ import annotations

import fcntl
import logging
import threading
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
from prometheus_client import Gauge
from sklearn.metrics import average_precision_score
from sqlalchemy import Engine, and_, func, select

from serving.contract import Costs
from serving.decisions import (
    DECISIONS,
    LABELS,
    RETENTION_CHECK_SECONDS,
    remove_expired,
    safe_reason,
)

log = logging.getLogger("bentoml.fraud_scoring")

WINDOWS = {"1d": 86_400.0, "7d": 7 * 86_400.0, "30d": 30 * 86_400.0}


def _gauge(name: str, doc: str) -> Gauge:
    return Gauge(name, doc, ["window"], multiprocess_mode="livemax")


REALISED = {
    "alert_precision": _gauge("fraud_realised_alert_precision",
                              "Labelled alerts that were fraud (latest label counts)"),
    "recall": _gauge("fraud_realised_recall", "Labelled frauds that were alerted"),
    "average_precision": _gauge("fraud_realised_average_precision",
                                "Average precision of the probabilities on labelled decisions"),
    "cost": _gauge("fraud_realised_cost", "Cost of labelled decisions at their threshold"),
    "label_coverage": _gauge("fraud_realised_label_coverage", "Decisions with a label"),
    "label_delay_seconds": _gauge("fraud_realised_label_delay_seconds",
                                  "Median time from decision to label"),
    "labelled_frauds": _gauge("fraud_realised_labelled_frauds", "Labelled frauds"),
}  # fmt: skip
ESTIMATED = {
    "alert_precision": _gauge("fraud_estimated_alert_precision",
                              "Mean probability of the flagged decisions"),
    "frauds": _gauge("fraud_estimated_frauds", "Sum of the probabilities of the decisions"),
    "decisions": _gauge("fraud_estimated_decisions", "Decisions in the window"),
}  # fmt: skip


def measure(engine: Engine, since: float, costs: Costs) -> dict[str, dict[str, float]]:
    """Both families of figures for decisions made from `since` on."""
    recent = DECISIONS.c.decided_at >= since
    with engine.connect() as connection:
        count, expected, flagged_mean = connection.execute(
            select(func.count(), func.coalesce(func.sum(DECISIONS.c.probability), 0.0),
                   func.avg(DECISIONS.c.probability).filter(DECISIONS.c.is_fraud))
            .where(recent)
        ).one()  # fmt: skip
        latest = (select(func.max(LABELS.c.id).label("id")).group_by(LABELS.c.transaction_id)
                  .subquery())  # fmt: skip
        current = select(LABELS).join(latest, LABELS.c.id == latest.c.id).subquery()
        labelled = connection.execute(
            select(DECISIONS.c.probability, DECISIONS.c.is_fraud, current.c.is_fraud,
                   current.c.received_at - DECISIONS.c.decided_at)
            .join(current, and_(current.c.transaction_id == DECISIONS.c.transaction_id))
            .where(recent)
        ).all()  # fmt: skip
    estimated = {"decisions": float(count), "frauds": float(expected)}
    if flagged_mean is not None:
        estimated["alert_precision"] = float(flagged_mean)
    return {"estimated": estimated, "realised": realised(labelled, count, costs)}


def realised(rows: list[Any], decisions: int, costs: Costs) -> dict[str, float]:
    """The realised figures of (probability, alerted, fraud, delay) rows."""
    if not rows:
        return {"label_coverage": 0.0} if decisions else {}
    probability, alerted, fraud, delay = (np.asarray(c) for c in zip(*rows, strict=True))
    alerted, fraud = alerted.astype(bool), fraud.astype(bool)
    hits = int(np.sum(alerted & fraud))
    figures = {
        "label_coverage": len(rows) / decisions,
        "label_delay_seconds": float(np.median(delay.astype(float))),
        "labelled_frauds": float(fraud.sum()),
        "cost": float(np.sum(~alerted & fraud) * costs.cost_missed_fraud
                      + np.sum(alerted & ~fraud) * costs.cost_false_alarm),
    }  # fmt: skip
    if alerted.any():
        figures["alert_precision"] = hits / int(alerted.sum())
    if fraud.any():
        figures["recall"] = hits / int(fraud.sum())
        if not fraud.all():
            figures["average_precision"] = float(average_precision_score(fraud, probability))
    return figures


def publish(figures: dict[str, dict[str, float]], window: str) -> None:
    for family, gauges in (("realised", REALISED), ("estimated", ESTIMATED)):
        for name, gauge in gauges.items():
            value = figures[family].get(name)
            gauge.labels(window=window).set(float("nan") if value is None else value)


class PerformanceWatch:
    """Refresh the gauges every `seconds` in the worker holding the lock file."""

    def __init__(self, engine: Engine, costs: Costs, lock_path: Path, seconds: float,
                 retention_seconds: float) -> None:  # fmt: skip
        self.engine, self.costs, self.seconds = engine, costs, seconds
        self.lock_path, self.retention_seconds = lock_path, retention_seconds
        self._last_retention = 0.0
        self._lock: IO[bytes] | None = None
        threading.Thread(target=self._run, name="performance", daemon=True).start()

    def _holds_lock(self) -> bool:
        if self._lock is None:
            handle = open(self.lock_path, "ab")  # noqa: SIM115 - held for the process' life
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                return False
            self._lock = handle
        return True

    def refresh(self) -> float:
        """Measure and publish every window; the seconds it took."""
        started = time.perf_counter()
        now = time.time()
        for window, span in WINDOWS.items():
            publish(measure(self.engine, now - span, self.costs), window)
        return time.perf_counter() - started

    def _apply_retention(self) -> None:
        """Hourly, decisions past FRAUD_DECISIONS_DAYS go (this process holds the lock)."""
        now = time.time()
        if now - self._last_retention < RETENTION_CHECK_SECONDS:
            return
        self._last_retention = now
        removed = remove_expired(self.engine, now - self.retention_seconds)
        if removed:
            log.info("decision log: %d decision(s) past retention removed", removed)

    def _run(self) -> None:
        while True:
            if self._holds_lock():
                try:
                    self.refresh()
                    self._apply_retention()
                except Exception as error:  # noqa: BLE001 - the next round tries again
                    log.warning("performance: refresh failed: %s", safe_reason(error))
            time.sleep(self.seconds)
