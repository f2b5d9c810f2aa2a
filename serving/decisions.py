"""The decision log: every scored row and every label that comes back, in one database.

Each row the service scores is recorded (transaction id, time, model md5 and runtime,
probability, threshold, decision, and the feature values the model saw, which retraining
needs) before its answer goes out: a 200 means the decisions are committed. Requests
share commits (group commit): a writer thread per process takes everything queued while
the previous commit ran and commits it in one transaction, and each request waits for the
commit that holds its rows (milliseconds), so there is never one commit per row and never
a silent drop. If the database is down or full, the request gets 503 and nothing is
scored without being recorded.

SQLite (WAL, synchronous=FULL, so a commit survives a crash of the process or the machine)
is the embedded default; PostgreSQL via `postgresql+psycopg2://...`. All workers (and
their file lanes) write to the same database. Feature values go here only, never to logs;
the error text a client sees names the database's error class and message, never the
statement or its parameters.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import (
    Boolean,
    Column,
    Engine,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    event,
    exc,
    insert,
    select,
)

from serving.errors import RequestError

log = logging.getLogger("bentoml.fraud_scoring")

METADATA = MetaData()
DECISIONS = Table(
    "decisions",
    METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("transaction_id", String(64), nullable=False, index=True),
    Column("decided_at", Float, nullable=False, index=True),  # unix seconds
    Column("request_id", String(16), nullable=False),
    Column("model_md5", String(32), nullable=False),
    Column("runtime", String(16), nullable=False),
    Column("probability", Float, nullable=False),
    Column("threshold", Float, nullable=False),
    Column("is_fraud", Boolean, nullable=False),
    # float64 values in the contract's feature order (little-endian bytes)
    Column("features", LargeBinary, nullable=False),
)
LABELS = Table(
    "labels",
    METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("transaction_id", String(64), nullable=False, index=True),
    Column("is_fraud", Boolean, nullable=False),
    Column("labelled_at", Float, nullable=False),
    Column("received_at", Float, nullable=False),
)
MAX_BATCH_ROWS = 200_000  # rows in one commit (a 300k-row file is its own commit anyway)
# Rows waiting for a commit, per process: past this a request gets 503 at once (a database
# that hangs must not make the queue, which holds each request's features, grow without end).
MAX_PENDING_ROWS = 1_000_000
RETENTION_CHECK_SECONDS = 3600.0
RETENTION_CHUNK = 10_000


class LogUnavailable(RuntimeError):
    """The decision log could not commit; the message is safe to show (no values)."""


@dataclass(frozen=True)
class Decisions:
    """What one request decided, one entry per row."""

    transaction_ids: Sequence[str]
    probabilities: np.ndarray
    threshold: float
    features: np.ndarray  # rows x contract features, float64
    request_id: str
    model_md5: str
    runtime: str

    def rows(self, now: float) -> list[dict[str, Any]]:
        features = np.ascontiguousarray(self.features, dtype="<f8")
        flagged = self.probabilities >= self.threshold
        return [
            {"transaction_id": tid, "decided_at": now, "request_id": self.request_id,
             "model_md5": self.model_md5, "runtime": self.runtime, "probability": float(p),
             "threshold": self.threshold, "is_fraud": bool(f), "features": row.tobytes()}
            for tid, p, f, row in zip(self.transaction_ids, self.probabilities, flagged,
                                      features, strict=True)
        ]  # fmt: skip


def engine_for(url: str) -> Engine:
    """An engine for the log's database, with SQLite set up for durable shared writing."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.close()

        return engine
    # A server that does not answer fails the commit (and the request) instead of hanging.
    return create_engine(url, pool_pre_ping=True, connect_args={
        "connect_timeout": 10, "options": "-c statement_timeout=30000"})  # fmt: skip


def create_tables(engine: Engine) -> None:
    """The log's tables, made once; workers starting together may race to make them."""
    for attempt in range(5):
        try:
            METADATA.create_all(engine, checkfirst=True)
            return
        except exc.DBAPIError:
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))


def safe_reason(error: BaseException) -> str:
    """What a client may read of a database failure: the error's class, and SQLite's own
    message (a server's names its host, port or user, which stay in the service's log)."""
    original = getattr(error, "orig", None) or error
    kind = type(original).__name__
    return f"{kind}: {first_line(original)}" if type(original).__module__ == "sqlite3" else kind


def first_line(error: BaseException) -> str:
    """The first line of the database's message, for the log (never the SQL or its values,
    which SQLAlchemy's own message appends)."""
    original = getattr(error, "orig", None) or error
    text = str(original).strip().splitlines()
    return text[0][:200] if text else "no message"


class DecisionLog:
    """Group commit of decisions to one database, from a writer thread of this process."""

    def __init__(self, url: str) -> None:
        self.engine = engine_for(url)
        create_tables(self.engine)
        self._queue: queue.Queue[tuple[Decisions, Future]] = queue.Queue()
        self._pending_rows = 0
        self._pending_lock = threading.Lock()
        self._writer = threading.Thread(target=self._write_forever, name="decision-log",
                                        daemon=True)  # fmt: skip
        self._writer.start()

    def record(self, decisions: Decisions) -> Future:
        """Queue a request's decisions; the future completes once they are committed
        (or fails with LogUnavailable)."""
        future: Future = Future()
        rows = len(decisions.transaction_ids)
        with self._pending_lock:
            if self._pending_rows + rows > MAX_PENDING_ROWS:
                future.set_exception(LogUnavailable(f"{self._pending_rows} rows already wait "
                                                    "for a commit"))  # fmt: skip
                return future
            self._pending_rows += rows
        self._queue.put((decisions, future))
        return future

    def _write_forever(self) -> None:
        while True:
            batch = [self._queue.get()]
            rows = len(batch[0][0].transaction_ids)
            while rows < MAX_BATCH_ROWS:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                batch.append(item)
                rows += len(item[0].transaction_ids)
            self._commit(batch)

    def _commit(self, batch: list[tuple[Decisions, Future]]) -> None:
        with self._pending_lock:
            self._pending_rows -= sum(len(d.transaction_ids) for d, _ in batch)
        # A request that gave up waiting (and told its client to send again) is not written.
        batch = [(d, f) for d, f in batch if f.set_running_or_notify_cancel()]
        if not batch:
            return
        now = time.time()
        try:
            with self.engine.begin() as connection:
                rows = [row for decisions, _ in batch for row in decisions.rows(now)]
                connection.execute(insert(DECISIONS), rows)
        except Exception as error:  # noqa: BLE001 - every failure goes back to its requests
            reason = safe_reason(error)
            log.warning(
                "decision log: commit of %d request(s) failed: %s: %s",
                len(batch),
                type(getattr(error, "orig", None) or error).__name__,
                first_line(error),
            )
            for _, future in batch:
                future.set_exception(LogUnavailable(reason))
            return
        for _, future in batch:
            future.set_result(None)


def remove_expired(engine: Engine, cutoff: float, chunk: int = RETENTION_CHUNK) -> int:
    """Delete decisions made before `cutoff`, `chunk` rows per transaction, so no single
    statement holds SQLite's write lock long enough to make the writers give up (run by one
    process: the holder of the performance lock)."""
    removed = 0
    while True:
        expired = select(DECISIONS.c.id).where(DECISIONS.c.decided_at < cutoff).limit(chunk)
        with engine.begin() as connection:
            gone = connection.execute(delete(DECISIONS).where(DECISIONS.c.id.in_(expired)))
        removed += gone.rowcount
        if gone.rowcount < chunk:
            return removed


def commit_or_refuse(log: DecisionLog | None, decisions: Decisions, seconds: float = 60.0) -> None:
    """Wait until `decisions` are committed; 503 (the client sends again) if they cannot
    be. With the log off (None), nothing to wait for."""
    if log is None:
        return
    future = log.record(decisions)
    try:
        try:
            future.result(timeout=seconds)
        except TimeoutError:
            if future.cancel():  # still queued: it will never be written
                raise
            future.result(timeout=seconds)  # being committed now: its outcome decides
    except (LogUnavailable, TimeoutError) as error:
        reason = str(error) or "no commit within the time limit"
        raise RequestError(503, "decision-log", f"the decision log is unavailable ({reason}); "
                           "nothing was scored: send it again") from None  # fmt: skip
