"""fraud_scoring: batch fraud scoring over HTTP with BentoML.

The model and its contract (features, valid ranges, threshold, reference distributions,
lineage) come from the BentoML model that the package stage names in the Bento's build
arguments (`model_tag`); nothing here imports the training code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
import uuid
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
import pandas as pd
from bentoml.validators import ContentType
from pydantic import BaseModel, StrictFloat, StrictInt
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from serving import connections, logs, metrics
from serving.contract import (
    CARD_JSON,
    CARD_MD,
    ID_COLUMN,
    REASONS_COLUMN,
    Limits,
    PublishedContract,
)
from serving.decisions import DecisionLog, Decisions, commit_or_refuse
from serving.drift import DriftWindow
from serving.feedback import labels_from_csv, labels_from_json
from serving.feedback import store as store_labels
from serving.file_lane import FileLane, FileRequest, Scorer, score_file_with
from serving.gate import RequestGate, RouteRule
from serving.ids import transaction_ids
from serving.logs import ClientErrorsWithoutValues
from serving.memory import BIG_ROWS, give_back_soon
from serving.openapi import PublishedSchema
from serving.performance import PerformanceWatch
from serving.reasons import Explainer, check_request, reasons_for
from serving.runtime import load_runtime
from serving.scoring import RequestError, check_objects, score, validate_records
from serving.sealed import check_fits, open_sealed, refuse
from serving.settings import Settings

# Under "bentoml": the server only prints its own loggers' records (ours were dropped).
log = logging.getLogger("bentoml.fraud_scoring")


logs.install()  # no client-controlled control character reaches a log line
# The logger BentoML's request handler reports exceptions on.
logging.getLogger("bentoml._internal.server.http_app").addFilter(ClientErrorsWithoutValues())


class BentoArgs(BaseModel):
    """Build arguments, stored in the Bento (bento.yaml) and restored when it is served."""

    model_tag: str = "fraud_model:latest"  # package passes the champion's content tag


ARGS = bentoml.use_arguments(BentoArgs)
SETTINGS = Settings.load()
# Silent or slow sockets are closed, and a worker keeps its connections under a cap.
connections.install(SETTINGS.header_seconds, SETTINGS.max_connections)

MODEL = bentoml.models.BentoModel(ARGS.model_tag)
# Every file checked against the seal, the contract parsed, the model fitted to it: any
# problem stops the start here (in every process) with one line (sealed.py).
STORED_MODEL, CONTRACT = open_sealed(MODEL)
try:
    check_fits(load_runtime(SETTINGS.runtime, CONTRACT.runtime, STORED_MODEL.path_of, 1), CONTRACT)
except RuntimeError as exc:  # FRAUD_RUNTIME=onnx for a model with no compiled form
    raise refuse(str(exc)) from None
LINEAGE = CONTRACT.lineage
metrics.REFERENCE_FLAGGED_RATIO.set(CONTRACT.reference.flagged_ratio)
metrics.set_performance_floor(CONTRACT.test_metrics, CONTRACT.performance_margin)


def _contract_view() -> dict[str, Any]:
    limits = Limits(
        max_rows_per_request=SETTINGS.max_rows,
        max_json_rows_per_request=SETTINGS.max_json_rows,
        max_payload_bytes=SETTINGS.max_bytes,
        max_json_payload_bytes=SETTINGS.max_json_bytes,
        body_timeout_seconds=SETTINGS.body_seconds,
        unknown_columns=SETTINGS.unknown_columns,
    )
    view = PublishedContract.of(CONTRACT, RUNTIME_IN_USE["name"], str(STORED_MODEL.tag), limits)
    return view.model_dump(mode="json")


# Which runtime this process scores with (set when the service starts).
RUNTIME_IN_USE: dict[str, str] = {"name": "not started"}


async def _schema(request: Request) -> Response:
    return JSONResponse(_contract_view())


schema_app = Starlette(routes=[Route("/", _schema, methods=["GET"])])


async def _model_card(request: Request) -> Response:
    """The served model's card (JSON; ?format=md for Markdown), open like /schema."""
    markdown = request.query_params.get("format") == "md"
    path = Path(STORED_MODEL.path_of(CARD_MD if markdown else CARD_JSON))
    if not path.is_file():  # a model packaged before cards existed
        return JSONResponse({"error": "this model has no model card", "rule": "model-card"},
                            status_code=404)  # fmt: skip
    media = "text/markdown; charset=utf-8" if markdown else "application/json"
    return Response(path.read_bytes(), media_type=media)


model_card_app = Starlette(routes=[Route("/", _model_card, methods=["GET"])])
# This worker's decision log (set when the service starts; None when it is off).
DECISION_LOG: dict[str, DecisionLog | None] = {"log": None}


async def _feedback(request: Request) -> Response:
    """Labels for logged decisions (feedback.py); the gate has checked key, type and size."""
    try:
        decisions = DECISION_LOG["log"]
        if decisions is None:
            raise RequestError(503, "decision-log", "the decision log is off "
                               "(FRAUD_DECISIONS_URL=off): labels cannot be matched")  # fmt: skip
        labels = await _labels_of(request)
        answer = await asyncio.to_thread(store_labels, decisions.engine, labels)
    except RequestError as exc:
        metrics.VALIDATION_FAILURES.labels(reason=exc.body["rule"]).inc()
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse(exc.body, status_code=exc.status, headers=headers)
    metrics.LABELS_RECEIVED.inc(answer["received"])
    log.info("feedback: %d label(s), %d stored, %d corrections, %d unknown", answer["received"],
             answer["stored"], answer["corrections"], answer["unknown_total"])  # fmt: skip
    return JSONResponse(answer)


async def _labels_of(request: Request) -> pd.DataFrame:
    try:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=0)
            upload = form.get("file")
            data = await upload.read() if hasattr(upload, "read") else b""
            return await asyncio.to_thread(labels_from_csv, data, SETTINGS.max_rows)
        try:
            payload = json.loads(await request.body())
        except (ValueError, RecursionError):
            raise RequestError(400, "parse", "the body is not JSON") from None
        return labels_from_json(payload, SETTINGS.max_json_rows)
    except RequestError:
        raise
    except Exception:  # noqa: BLE001 - any other failure to read a client's labels is theirs
        raise RequestError(400, "parse", "the labels could not be read") from None


feedback_app = Starlette(routes=[Route("/", _feedback, methods=["POST"])])


@bentoml.asgi_app(schema_app, path="/schema")
@bentoml.asgi_app(model_card_app, path="/model-card")
@bentoml.asgi_app(feedback_app, path="/feedback")
@bentoml.service(
    name="fraud_scoring",
    # One worker process per core: a request's Python work holds its worker's GIL, so one
    # worker tops out near BentoML's own floor (~450 one-row requests/s measured).
    workers="cpu_count",
    # No BentoML max_concurrency: it takes a slot before the body is read, so eight slow
    # uploads locked scoring out. The gate (gate.py) gives slots once bodies have arrived.
    # Measured (docs/benchmarks/serving.md): a 100k-row CSV takes ~2.5 s alone; 120 s
    # covers a 300k-row file behind a queue in the file lane.
    traffic={"timeout": 120},
    http={"host": "127.0.0.1", "port": 3000},
    # Prometheus' default buckets stop at 10 s; big batches run past that. Floats only:
    # BentoML's config schema rejects ints here.
    metrics={
        "enabled": True,
        "namespace": "bentoml_service",
        "duration": {
            "buckets": [
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1.0,
                2.5,
                5.0,
                10.0,
                30.0,
                60.0,
                120.0,
            ]
        },
    },
)
class FraudScoring:
    # Declared on the class so that `bentoml build` packs this model into the Bento.
    model_ref = MODEL

    def __init__(self) -> None:
        self.runtime = load_runtime(
            SETTINGS.runtime, CONTRACT.runtime, self.model_ref.path_of, SETTINGS.threads
        )
        RUNTIME_IN_USE["name"] = self.runtime.name
        metrics.set_model_info(LINEAGE, str(STORED_MODEL.tag), self.runtime.name)
        log.info("scoring with the %s runtime", self.runtime.name)
        self.threshold = CONTRACT.threshold
        self.bands = CONTRACT.risk_bands
        self.drift = DriftWindow(CONTRACT.reference, SETTINGS.drift_window_rows)
        # Reason codes come from the stored model, loaded when a request first asks.
        self.explainer = Explainer(self.model_ref.path_of("model.pkl"), CONTRACT.feature_names)
        compiled = CONTRACT.runtime.onnx
        names = ["model.pkl"] + ([compiled.file] if compiled else [])
        files = {name: self.model_ref.path_of(name) for name in names}
        url = SETTINGS.decision_log_url()
        self.decisions = DecisionLog(url) if url else None
        DECISION_LOG["log"] = self.decisions
        if self.decisions is not None:
            lock = Path(SETTINGS.data_folder()) / "performance.lock"
            retention = SETTINGS.decisions_days * 86400.0
            PerformanceWatch(self.decisions.engine, CONTRACT.costs, lock,
                             SETTINGS.performance_seconds, retention)  # fmt: skip
        self.lane = FileLane(CONTRACT, files, SETTINGS)
        # Every temporary file of this worker (BentoML's uploads, spooled bodies, scored
        # outputs) goes in its own folder, which the next worker removes if this one is
        # killed; the metrics of killed workers are dropped the same way.
        tempfile.tempdir = str(self.lane.scratch)
        dead = metrics.forget_dead_processes()
        if dead:
            log.info("dropped the live gauges of %d dead worker(s)", len(dead))

    def _reject(self, ctx: bentoml.Context, exc: RequestError, request_id: str) -> Response:
        metrics.VALIDATION_FAILURES.labels(reason=exc.body["rule"]).inc()
        ctx.response.status_code = exc.status
        log.info("request %s rejected: %s (%s)", request_id, exc.body["rule"], exc.status)
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        body = {**exc.body, "request_id": request_id}
        return JSONResponse(body, status_code=exc.status, headers=headers)

    def _check_threshold(self, threshold: float | None) -> float:
        if threshold is None:
            return self.threshold
        if not (isinstance(threshold, int | float) and 0.0 <= threshold <= 1.0):
            raise RequestError(
                400, "threshold", "threshold must be a number in [0, 1]", column="threshold"
            )
        return float(threshold)

    def _score(self, features: pd.DataFrame, threshold: float, ids: np.ndarray,
               request_id: str) -> pd.DataFrame:  # fmt: skip
        """Score validated features, record the decisions (503 if they cannot be), then
        update the metrics and the drift window."""
        start = time.perf_counter()
        scored = score(self.runtime.probability, features, threshold, self.bands)
        seconds = time.perf_counter() - start
        probabilities = scored["fraud_probability"].to_numpy()
        decided = Decisions(ids, probabilities, threshold, features.to_numpy(), request_id,
                            LINEAGE.model_md5, self.runtime.name)  # fmt: skip
        commit_or_refuse(self.decisions, decided)
        self._observe(probabilities, features, int(scored["is_fraud"].sum()), seconds)
        return scored

    def _observe(self, probabilities: np.ndarray, features: Any, flagged: int,
                 seconds: float) -> None:  # fmt: skip
        psi = self.drift.add(probabilities, features)
        metrics.observe_batch(
            len(probabilities), seconds, probabilities, flagged, psi, self.drift.rows
        )

    def _meta(self, threshold: float, request_id: str) -> dict[str, Any]:
        return {
            "threshold": threshold,
            "model_tag": str(STORED_MODEL.tag),
            "request_id": request_id,
            "lineage": LINEAGE.model_dump(
                include={"registered_model", "model_md5", "model_family", "train_data_md5"}
            ),
        }

    @bentoml.api(route="/predict")
    def predict(
        self,
        # Any, checked in validate_records: pydantic would build (and BentoML answer) one
        # error per item that is not an object, 16 M of them for a 32 MiB body.
        transactions: list[Any],
        ctx: bentoml.Context,
        threshold: StrictFloat | None = None,  # true or "0.5" are not thresholds
        reasons: StrictInt | None = None,  # top-k reason codes per row (serving/reasons.py)
    ) -> dict[str, Any]:
        """Score a JSON batch: one result per transaction, in input order; with `reasons`
        k, each row's k features that pushed its score most."""
        request_id = uuid.uuid4().hex[:12]
        if len(transactions) >= BIG_ROWS:
            give_back_soon()  # a big body's objects, freed after the answer
        try:
            cut = self._check_threshold(threshold)
            k = check_request(reasons, len(transactions), SETTINGS.max_reason_rows)
            check_objects(transactions)  # before the row cap: a schema error is a 400
            if len(transactions) > SETTINGS.max_json_rows:
                raise RequestError(
                    413,
                    "max-rows",
                    f"the batch has {len(transactions)} rows; "
                    f"the JSON limit is {SETTINGS.max_json_rows} (use /predict_file)",
                )
            features = validate_records(
                transactions, CONTRACT, SETTINGS.unknown_columns, SETTINGS.max_json_rows
            )
            given = [r.get(ID_COLUMN) for r in transactions]
            ids = transaction_ids(given if any(v is not None for v in given) else None,
                                  len(transactions), request_id)  # fmt: skip
            # Before scoring: a model with no reasons refuses before any decision is logged.
            explained, unit = reasons_for(self.explainer, k, features) if k else (None, None)
            scored = self._score(features, cut, ids, request_id)
        except RequestError as exc:
            return self._reject(ctx, exc, request_id)
        log.info("request %s scored %d rows", request_id, len(scored))
        names = (ID_COLUMN, "fraud_probability", "is_fraud", "risk_band")
        columns = [ids.tolist(), *(scored[c].tolist() for c in names[1:])]
        meta = self._meta(cut, request_id)
        if explained is not None:
            names, columns = (*names, REASONS_COLUMN), [*columns, explained]
            meta["reasons_unit"] = unit  # of the contributions: log-odds or probability
        predictions = [dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)]
        # A Response goes out as it is; a dict would make BentoML rebuild the output's
        # JSON schema on every call to pick a media type (~15% of a one-row request).
        return JSONResponse({"predictions": predictions, **meta})

    @bentoml.api(route="/explain")
    def explain(
        self,
        transactions: list[Any],  # Any, as in /predict: checked in validate_records
        ctx: bentoml.Context,
        reasons: StrictInt = 3,
    ) -> dict[str, Any]:
        """Reason codes of already-scored transactions (the UI's flagged rows), nothing else:
        no score, no decision logged (a second decision for an id would count twice)."""
        request_id = uuid.uuid4().hex[:12]
        try:
            if reasons == 0:
                raise RequestError(400, "reasons", "/explain needs reasons from 1 to 10",
                                   column="reasons")  # fmt: skip
            k = check_request(reasons, len(transactions), SETTINGS.max_reason_rows)
            check_objects(transactions)
            features = validate_records(
                transactions, CONTRACT, SETTINGS.unknown_columns, SETTINGS.max_reason_rows
            )
            given = [r.get(ID_COLUMN) for r in transactions]
            ids = transaction_ids(given if any(v is not None for v in given) else None,
                                  len(transactions), request_id)  # fmt: skip
            explained, unit = reasons_for(self.explainer, k, features)
        except RequestError as exc:
            return self._reject(ctx, exc, request_id)
        log.info("request %s explained %d rows", request_id, len(features))
        rows = [{ID_COLUMN: i, REASONS_COLUMN: r} for i, r in zip(ids.tolist(), explained,
                                                                 strict=True)]  # fmt: skip
        tag = str(STORED_MODEL.tag)
        return JSONResponse({"explanations": rows, "reasons_unit": unit, "model_tag": tag,
                             "request_id": request_id})  # fmt: skip

    @bentoml.api(route="/predict_file")
    async def predict_file(
        self,
        file: Path,
        ctx: bentoml.Context,
        output_format: str = "csv",
        threshold: StrictFloat | None = None,  # true or "0.5" are not thresholds
        reasons: StrictInt | None = None,  # top-k reason codes per row, as a text column
    ) -> Annotated[Path, ContentType("text/csv")]:
        """Score an uploaded CSV or Parquet file; return it with the score columns added."""
        request_id = uuid.uuid4().hex[:12]
        out = self.lane.scratch / f"{request_id}.out"
        try:
            cut = self._check_threshold(threshold)
            k = check_request(reasons, 0, SETTINGS.max_reason_rows)  # rows: once parsed
            if output_format not in ("csv", "parquet"):
                raise RequestError(400, "output-format", "output_format must be csv or parquet")
            size = os.path.getsize(file)
            if size > SETTINGS.max_bytes:
                raise RequestError(
                    413,
                    "max-bytes",
                    f"the file has {size} bytes; the limit is {SETTINGS.max_bytes}",
                )
            name = getattr(file, "name", None)
            job = FileRequest(str(file), name, output_format, cut, str(out), request_id, k)
            outcome = await self._score_upload(ctx, job, size)
        except RequestError as exc:
            out.unlink(missing_ok=True)
            return self._reject(ctx, exc, request_id)
        self._observe(
            outcome["probabilities"], outcome["features"], outcome["flagged"], outcome["seconds"]
        )
        log.info("request %s scored a %d-row file", request_id, outcome["rows"])
        ctx.response.status_code = 200
        headers = {
            "X-Request-Id": request_id,
            "X-Model-Tag": str(STORED_MODEL.tag),
            "X-Threshold": repr(cut),
            "X-Rows": str(outcome["rows"]),
            "X-Flagged": str(outcome["flagged"]),
        }
        return FileResponse(
            out,
            media_type=outcome["media"],
            headers=headers,
            background=BackgroundTask(out.unlink, missing_ok=True),
        )

    async def _score_upload(self, ctx: bentoml.Context, job: FileRequest, size: int) -> dict:
        """The file's outcome, from the worker itself for a small file (cheaper than the
        trip to the lane) or from the file lane; a refusal raises RequestError."""
        if size < SETTINGS.lane_min_bytes:
            scorer = Scorer(CONTRACT, SETTINGS, self.runtime, self.decisions, self.explainer)
            outcome = await asyncio.to_thread(score_file_with, scorer, job)
            give_back_soon()
        else:
            outcome = await self._in_lane(ctx, job)
        if "error" in outcome:
            raise RequestError.from_body(outcome["error"], outcome["body"])
        return outcome

    async def _in_lane(self, ctx: bentoml.Context, job: FileRequest) -> dict[str, Any]:
        """Run a file job in the lane. If its client leaves, a queued job is cancelled and a
        running one is told to stop at its next step (its output is removed either way)."""
        future = self.lane.submit(job)
        waiting = asyncio.wrap_future(future)
        while not (await asyncio.wait({waiting}, timeout=0.5))[0]:
            if await ctx.request.is_disconnected():
                if not future.cancel():
                    self.lane.drop(future, job.out_path)
                raise RequestError(499, "client-gone", "the client disconnected")
        try:
            return waiting.result()
        except BrokenProcessPool:
            raise RequestError(
                503, "file-lane", "the file scorer restarted; send the file again"
            ) from None

    @bentoml.on_shutdown
    def _close_lane(self) -> None:
        self.lane.close()


FraudScoring.add_asgi_middleware(
    RequestGate,
    routes={
        "/predict": RouteRule("application/json", SETTINGS.max_json_bytes),
        "/explain": RouteRule("application/json", SETTINGS.max_json_bytes),
        "/predict_file": RouteRule(
            "multipart/form-data",
            SETTINGS.max_bytes,
            fields=("output_format", "threshold", "reasons"),
        ),
        "/feedback": RouteRule(
            "application/json",
            SETTINGS.max_json_bytes,
            target="/feedback/",
            also=RouteRule("multipart/form-data", SETTINGS.max_bytes),
        ),  # fmt: skip
    },
    api_key=SETTINGS.api_key,
    body_seconds=SETTINGS.body_seconds,
    max_in_flight=SETTINGS.max_in_flight,
    on_refused=lambda rule: metrics.VALIDATION_FAILURES.labels(reason=rule).inc(),
)
FraudScoring.add_asgi_middleware(PublishedSchema, contract=CONTRACT, settings=SETTINGS)
