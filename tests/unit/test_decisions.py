"""The decision log (serving/decisions.py) on a real SQLite file: what a request decided
is committed before it returns, requests share commits, and a database that cannot
commit gives a 503 whose message holds no values."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, event, func, select

from serving.decisions import DECISIONS, DecisionLog, Decisions, commit_or_refuse, remove_expired
from serving.errors import RequestError

FEATURES = 30


def _decisions(rows: int, request_id: str = "r1", seed: int = 0) -> Decisions:
    rng = np.random.default_rng(seed)
    return Decisions(
        transaction_ids=[f"{request_id}:{i}" for i in range(rows)],
        probabilities=rng.random(rows),
        threshold=0.5,
        features=rng.normal(size=(rows, FEATURES)),
        request_id=request_id,
        model_md5="0" * 32,
        runtime="onnx",
    )


def test_a_request_returns_once_its_decisions_are_committed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/decisions.db"
    log = DecisionLog(url)
    decided = _decisions(7)
    commit_or_refuse(log, decided)
    with create_engine(url).connect() as other:  # another connection sees them at once
        rows = other.execute(select(DECISIONS).order_by(DECISIONS.c.id)).all()
    assert [r.transaction_id for r in rows] == list(decided.transaction_ids)
    assert [r.probability for r in rows] == decided.probabilities.tolist()
    assert [r.is_fraud for r in rows] == (decided.probabilities >= 0.5).tolist()
    stored = np.vstack([np.frombuffer(r.features, "<f8") for r in rows])
    assert np.array_equal(stored, decided.features)


def test_concurrent_requests_share_commits(tmp_path: Path) -> None:
    log = DecisionLog(f"sqlite:///{tmp_path}/decisions.db")
    commits = []
    event.listen(log.engine, "commit", lambda connection: commits.append(1))
    requests = 64
    threads = [
        threading.Thread(target=commit_or_refuse, args=(log, _decisions(10, f"r{i}", i)))
        for i in range(requests)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with log.engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(DECISIONS)).scalar() == 640
    assert len(commits) < requests  # never one commit per request, let alone per row


def test_a_database_that_cannot_commit_gives_503_without_values(tmp_path: Path) -> None:
    log = DecisionLog(f"sqlite:///{tmp_path}/decisions.db")

    @event.listens_for(log.engine, "connect")
    def _full(connection, _record) -> None:  # noqa: ANN001 - a disk that is full
        connection.execute("PRAGMA max_page_count = 1")

    log.engine.dispose()  # new connections, with the page limit
    decided = _decisions(2000)
    with pytest.raises(RequestError) as caught:
        commit_or_refuse(log, decided)
    body = caught.value.body
    assert (caught.value.status, body["rule"]) == (503, "decision-log")
    assert "full" in body["error"] and "INSERT" not in body["error"]
    assert repr(decided.probabilities[0])[:8] not in body["error"]


def test_retention_removes_old_decisions_in_small_transactions(tmp_path: Path) -> None:
    log = DecisionLog(f"sqlite:///{tmp_path}/decisions.db")
    commit_or_refuse(log, _decisions(25, "old"))
    time.sleep(0.05)
    cutoff = time.time()
    commit_or_refuse(log, _decisions(5, "new"))
    commits = []
    event.listen(log.engine, "commit", lambda connection: commits.append(1))
    assert remove_expired(log.engine, cutoff, chunk=10) == 25
    assert len(commits) == 3  # 10 + 10 + 5: no statement holds the write lock for long
    with log.engine.connect() as connection:
        left = connection.execute(select(DECISIONS.c.request_id).distinct()).scalars().all()
    assert left == ["new"]
