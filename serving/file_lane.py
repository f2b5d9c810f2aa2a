"""The file lane: big uploads are parsed, checked, scored and written in a separate process.

A worker process serves single transactions from its event loop and threads, and all of
them share its GIL. Parsing a 100k-row file, building DataFrames and writing the scored
copy hold that GIL for seconds, so single transactions waited behind files (p99 2-3 s
measured with 100k-row files streaming). Here each worker hands big files to one child
process of its own, started at a lower CPU priority, and only streams the child's output
file back. Files queue per worker (one at a time), which also bounds memory.

The child returns plain data (never exceptions: RequestError does not pickle) so the worker
keeps its metrics and drift window as for any other request.

A file whose client has gone is not worth finishing. A queued one is simply cancelled; a
running one cannot be (killing the child would break the pool and fail the files queued
behind it), so the worker leaves a marker file beside the job's output and the child checks
for it between the steps (read, check, score, write) and gives up at the next one.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from serving.contract import ID_COLUMN, REASONS_COLUMN, Contract
from serving.decisions import DecisionLog, Decisions, commit_or_refuse
from serving.ids import file_ids, transaction_ids
from serving.memory import give_back
from serving.reasons import Explainer, as_text, check_request, reasons_for
from serving.runtime import Runtime, load_runtime
from serving.scoring import RequestError, read_upload, score, validate, with_scores, write_table
from serving.settings import Settings

NICENESS = 10  # files are background work next to single transactions
SCRATCH = "fraud_scoring"  # under the system temp dir: one folder per worker pid

# Under "bentoml": the server only prints its own loggers' records (ours were dropped).
log = logging.getLogger("bentoml.fraud_scoring")


@dataclass(frozen=True)
class FileRequest:
    """One uploaded file to score: where it is, its client-given name (for the type), the
    output format, the threshold, where the scored copy goes, the request's id (rows
    without a transaction id get `<request id>:<row>`) and how many reason codes each row
    gets (0: none)."""

    upload: str
    filename: str | None
    output_format: str
    threshold: float
    out_path: str
    request_id: str = "file"
    reasons: int = 0


@dataclass(frozen=True)
class Scorer:
    """What a file is scored with: the contract, the service settings, a runtime, the
    decision log its rows are recorded in (None: off), and what gives reason codes."""

    contract: Contract
    settings: Settings
    runtime: Runtime
    decisions: DecisionLog | None = None
    explainer: Explainer | None = None


# Set in the child by _start().
_CHILD: dict[str, Scorer] = {}


def _exit_with(parent: int, every: float = 1.0) -> None:
    """End this process once `parent` has gone (the child is then adopted, so its parent
    pid changes). A worker killed with -9 cannot stop its lane, and the lane's pool pipe
    does not end it either: such orphans were found hours later, each holding its model."""
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(0)


def _start(contract: Contract, files: dict[str, str], settings: Settings, worker: int) -> None:
    # The worker's pid as the worker saw it: one killed while this child was importing
    # (seconds) is already gone here, and os.getppid() would name the adopter instead.
    threading.Thread(target=_exit_with, args=(worker,), daemon=True).start()
    os.nice(NICENESS)
    runtime = load_runtime(settings.runtime, contract.runtime, files.__getitem__, settings.threads)
    url = settings.decision_log_url()  # the worker's database: the child writes to it too
    decisions = DecisionLog(url) if url else None
    explainer = Explainer(files["model.pkl"], contract.feature_names)
    _CHILD["scorer"] = Scorer(contract, settings, runtime, decisions, explainer)


def cancel_marker(out_path: str | Path) -> Path:
    """The file whose presence tells the child to drop the job writing `out_path`."""
    return Path(f"{out_path}.cancel")


def score_file(request: FileRequest) -> dict[str, Any]:
    """In the child: the whole file request, dropped between steps if its client left;
    then the memory it took goes back to the system (files here are the big ones)."""
    try:
        return score_file_with(_CHILD["scorer"], request, cancel_marker(request.out_path).exists)
    finally:
        give_back()


def _reasons(scorer: Scorer, k: int, features: Any) -> list[str] | None:
    """The reason codes of every row as text, before any decision is recorded."""
    if not k:
        return None
    check_request(k, len(features), scorer.settings.max_reason_rows)
    if scorer.explainer is None:
        raise RequestError(422, "reasons-unavailable", "this scorer has no stored model")
    explained, _ = reasons_for(scorer.explainer, k, features)
    return [as_text(row) for row in explained]


def score_file_with(
    scorer: Scorer, request: FileRequest, cancelled: Callable[[], bool] = lambda: False
) -> dict[str, Any]:
    """Parse, check, score and write one uploaded file. Returns the outcome as plain data:
    the error's status and body, or the output's media type and what the metrics need.
    `cancelled` is asked between the steps; when it says yes the file is dropped."""
    contract, settings = scorer.contract, scorer.settings
    try:
        _stop_if(cancelled)  # (the server deletes the upload once the 499 is sent)
        frame = read_upload(Path(request.upload).read_bytes(), request.filename)
        _stop_if(cancelled)
        features = validate(frame, contract, settings.unknown_columns, settings.max_rows)
        ids = transaction_ids(file_ids(frame), len(frame), request.request_id)
        explained = _reasons(scorer, request.reasons, features)
        _stop_if(cancelled)
        start = time.perf_counter()
        probability = scorer.runtime.probability
        scored = score(probability, features, request.threshold, contract.risk_bands)
        seconds = time.perf_counter() - start
        _stop_if(cancelled)
        probabilities = scored["fraud_probability"].to_numpy()
        decided = Decisions(
            ids,
            probabilities,
            request.threshold,
            features.to_numpy(),
            request.request_id,
            contract.lineage.model_md5,
            scorer.runtime.name,
        )
        commit_or_refuse(scorer.decisions, decided)
    except RequestError as exc:
        return {"error": exc.status, "body": exc.body}
    result = with_scores(frame, scored)
    if explained is not None:
        result[REASONS_COLUMN] = explained
    if ID_COLUMN in result.columns:
        result[ID_COLUMN] = ids  # the client's ids, with the missing ones assigned
    else:
        result.insert(0, ID_COLUMN, ids)
    payload, media = write_table(result, request.output_format)
    Path(request.out_path).write_bytes(payload)
    drift = {name: features[name].to_numpy() for name in contract.reference.features}
    return {
        "media": media,
        "probabilities": probabilities,
        "flagged": int(np.sum(scored["is_fraud"])),
        "rows": len(result),
        "seconds": seconds,
        "features": drift,
    }


def _stop_if(cancelled: Callable[[], bool]) -> None:
    if cancelled():
        raise RequestError(499, "client-gone", "the client disconnected")


def scratch_dir() -> Path:
    """This worker's folder for temporary files (scored outputs, uploads, spooled bodies);
    folders of dead workers are removed (a killed worker cannot clean up after itself)."""
    root = Path(tempfile.gettempdir()) / SCRATCH
    root.mkdir(exist_ok=True)
    for old in root.iterdir():
        if old.name.isdigit() and not psutil.pid_exists(int(old.name)):
            shutil.rmtree(old, ignore_errors=True)
    mine = root / str(os.getpid())
    mine.mkdir(exist_ok=True)
    return mine


class FileLane:
    """One child process per worker, restarted if it dies."""

    def __init__(self, contract: Contract, files: dict[str, str], settings: Settings) -> None:
        self._args = (contract, files, settings)
        self.scratch = scratch_dir()
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn: the worker already runs threads (BentoML's, onnxruntime's); fork would
        # copy their locks mid-use.
        return ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start,
            initargs=(*self._args, os.getpid()),
        )

    def submit(self, request: FileRequest) -> Future:
        try:
            return self._pool.submit(score_file, request)
        except BrokenProcessPool:
            # The child died (e.g. killed for memory): start a new one for this and later files.
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            return self._pool.submit(score_file, request)

    @staticmethod
    def drop(job: Future, out_path: str) -> None:
        """Stop a running job whose client has gone: the child sees the marker at its next
        step. Whatever it leaves (a marker, or an output if it was past its last step) is
        removed when the job ends."""
        marker = cancel_marker(out_path)
        marker.touch()

        def clean(done: Future) -> None:
            marker.unlink(missing_ok=True)
            Path(out_path).unlink(missing_ok=True)
            if done.cancelled() or done.exception():
                how = (
                    f"ended by {type(done.exception()).__name__}"
                    if not done.cancelled()
                    else "cancelled"
                )
            elif done.result().get("error") == 499:
                how = "stopped early"
            else:
                how = "finished, output discarded"
            log.info("file lane: %s for request %s (client gone)", how, Path(out_path).stem)

        job.add_done_callback(clean)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.scratch, ignore_errors=True)
