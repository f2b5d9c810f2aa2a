"""The service's settings: every FRAUD_* environment variable, read once, in one place."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

RUNTIMES = ("auto", "onnx", "sklearn")


@dataclass(frozen=True)
class Settings:
    max_rows: int = 300_000  # per file
    max_json_rows: int = 20_000  # per JSON request
    max_bytes: int = 200 * 1024 * 1024  # per uploaded file request
    # per JSON request: 20,000 records of 30 numbers are ~15 MB; parsing JSON costs ~10x
    # its size in memory and blocks the worker's event loop while it runs
    max_json_bytes: int = 32 * 1024 * 1024
    body_seconds: float = 30.0  # a request body must arrive within this (else 408)
    max_in_flight: int = 128  # scoring requests per worker once their bodies arrived
    unknown_columns: str = "ignore"  # or "reject"
    drift_window_rows: int = 20_000
    api_key: str | None = None  # when set, scoring needs "Authorization: Bearer <key>"
    # auto: the compiled ONNX model when package verified one, else scikit-learn
    runtime: str = "auto"
    threads: int = 2  # for big batches; small ones run on one thread
    # Uploads from this size on go to the worker's file lane (a child process); smaller
    # ones are scored in the worker (1 MiB of CSV is ~3,500 rows, ~50 ms).
    lane_min_bytes: int = 1024 * 1024

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        def number(name: str, default: int) -> int:
            return int(env.get(name, str(default)))

        runtime = env.get("FRAUD_RUNTIME", cls.runtime).lower()
        if runtime not in RUNTIMES:
            raise ValueError(f"FRAUD_RUNTIME must be one of {RUNTIMES}, got {runtime!r}")
        return cls(
            max_rows=number("FRAUD_MAX_ROWS", cls.max_rows),
            max_json_rows=number("FRAUD_MAX_JSON_ROWS", cls.max_json_rows),
            max_bytes=number("FRAUD_MAX_BYTES", cls.max_bytes),
            max_json_bytes=number("FRAUD_MAX_JSON_BYTES", cls.max_json_bytes),
            body_seconds=float(env.get("FRAUD_BODY_TIMEOUT_S", str(cls.body_seconds))),
            max_in_flight=number("FRAUD_MAX_IN_FLIGHT", cls.max_in_flight),
            unknown_columns=env.get("FRAUD_UNKNOWN_COLUMNS", cls.unknown_columns),
            drift_window_rows=number("FRAUD_DRIFT_WINDOW_ROWS", cls.drift_window_rows),
            api_key=env.get("FRAUD_API_KEY") or None,
            runtime=runtime,
            threads=max(1, number("FRAUD_THREADS", os.cpu_count() or 1)),
            lane_min_bytes=number("FRAUD_LANE_MIN_BYTES", cls.lane_min_bytes),
        )
