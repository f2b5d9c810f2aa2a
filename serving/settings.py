"""The service's settings: every FRAUD_* environment variable, read once, in one place.

pydantic-settings reads them (FRAUD_<FIELD>, case-insensitive) and checks their types, so a
typo such as FRAUD_MAX_ROWS=10k stops the service with one line naming the variable
(`Settings.load`) instead of a traceback from the first request that uses it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FRAUD_", frozen=True, extra="ignore", populate_by_name=True
    )

    max_rows: int = Field(300_000, gt=0)  # per file
    max_json_rows: int = Field(20_000, gt=0)  # per JSON request
    max_bytes: int = Field(200 * 1024 * 1024, gt=0)  # per uploaded file request
    # per JSON request: 20,000 records of 30 numbers are ~15 MB; parsing JSON costs ~10x
    # its size in memory and blocks the worker's event loop while it runs
    max_json_bytes: int = Field(32 * 1024 * 1024, gt=0)
    # a request body must arrive within this (else 408)
    body_seconds: float = Field(30.0, gt=0, validation_alias="FRAUD_BODY_TIMEOUT_S")
    max_in_flight: int = Field(128, gt=0)  # scoring requests per worker once bodies arrived
    # A request's header block must arrive within this, counted from the connection (or
    # the previous answer on it): silent and slowloris sockets are closed (408).
    header_seconds: float = Field(10.0, gt=0, validation_alias="FRAUD_HEADER_TIMEOUT_S")
    # Open connections per worker; past it the longest-idle one is closed for the new one
    # (or, with none idle, the new one gets 503). Also kept below the open-file limit.
    max_connections: int = Field(512, gt=0)
    unknown_columns: Literal["ignore", "reject"] = "ignore"
    drift_window_rows: int = Field(20_000, gt=0)
    # when set, scoring needs "Authorization: Bearer <key>"; never in a repr or a log
    api_key: str | None = Field(None, repr=False)
    # auto: the compiled ONNX model when package verified one, else scikit-learn
    runtime: Literal["auto", "onnx", "sklearn"] = "auto"
    # for big batches; small ones run on one thread
    threads: int = Field(default_factory=lambda: os.cpu_count() or 1)
    # Uploads from this size on go to the worker's file lane (a child process); smaller
    # ones are scored in the worker (1 MiB of CSV is ~3,500 rows, ~50 ms).
    lane_min_bytes: int = Field(1024 * 1024, ge=0)
    # The decision log (serving/decisions.py): a SQLAlchemy URL (sqlite:///..., or
    # postgresql+psycopg2://...), or "off"; unset: SQLite at <data dir>/decisions.db.
    decisions_url: str | None = None
    decisions_days: float = Field(90.0, gt=0)  # decisions older than this are removed
    # The service's own files; unset: fraud_data/ in the BentoML home.
    data_dir: str | None = None
    # how often the realised and estimated performance gauges are recomputed
    performance_seconds: float = Field(15.0, gt=0)
    # Reason codes (serving/reasons.py) are computed with the stored model, not the
    # compiled one: at most this many rows per request may ask for them. Exact TreeSHAP
    # costs ~1.3 ms a row for the default LightGBM champion, ~55 ms for a 200-tree
    # ExtraTrees (docs/benchmarks/reasons.md): 1,000 rows stay inside the 120 s timeout.
    max_reason_rows: int = Field(1_000, gt=0)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, **_):  # noqa: ANN001, ANN206
        # The environment only: no .env file or secrets folder is read behind one's back.
        return (init_settings, env_settings)

    @field_validator("api_key", "decisions_url", "data_dir")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("runtime", "unknown_columns", mode="before")
    @classmethod
    def _lowercase(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("threads")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        return max(1, value)

    def decision_log_url(self, environ: Mapping[str, str] = os.environ) -> str | None:
        """The decision log's database URL, or None when the log is off."""
        if self.decisions_url and self.decisions_url.lower() == "off":
            return None
        if self.decisions_url:
            return self.decisions_url
        return f"sqlite:///{self.data_folder(environ)}/decisions.db"

    def data_folder(self, environ: Mapping[str, str] = os.environ) -> str:
        """The service's data directory (made if missing), as an absolute path."""
        home = environ.get("BENTOML_HOME") or os.path.join(os.path.expanduser("~"), "bentoml")
        folder = os.path.abspath(self.data_dir or os.path.join(home, "fraud_data"))
        os.makedirs(folder, exist_ok=True)
        return folder

    @classmethod
    def env_name(cls, field: str) -> str:
        alias = cls.model_fields[field].validation_alias
        return alias if isinstance(alias, str) else f"FRAUD_{field.upper()}"

    @classmethod
    def _named(cls, loc: tuple) -> str:
        field = str(loc[0]) if loc else "?"
        return cls.env_name(field) if field in cls.model_fields else field.upper()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings from the process environment, or from `env` alone (tests)."""
        if env is None:
            return cls()
        names = {cls.env_name(name).lower(): name for name in cls.model_fields}
        values = {names[k.lower()]: v for k, v in env.items() if k.lower() in names}
        return _GivenOnly(**values)

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> Settings:
        """from_env(), or SystemExit with one line naming each bad variable."""
        try:
            return cls.from_env(env)
        except ValidationError as exc:
            bad = "; ".join(f"{cls._named(e['loc'])}: {e['msg']}" for e in exc.errors())
            raise SystemExit(f"fraud_scoring: bad setting: {bad}") from None


class _GivenOnly(Settings):
    """Settings from the values given alone (Settings.from_env(env)), not the process'."""

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, **_):  # noqa: ANN001, ANN206
        return (init_settings,)
