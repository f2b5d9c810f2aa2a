"""The UI's side of the service: contract checks, chunked scoring with retries, and the
numbers shown for a threshold. HTTP only; the model never loads here."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import requests
from pydantic import ValidationError
from requests.adapters import HTTPAdapter
from sklearn.metrics import precision_recall_curve
from urllib3.exceptions import MaxRetryError, ReadTimeoutError
from urllib3.util import Retry

# The contract check is the service's own module (it needs numpy, pandas, pyarrow, pydantic):
# the UI refuses a file for exactly the reasons, and with the words, the service would.
from serving import scoring
from serving.contract import ID_COLUMN, REASONS_COLUMN, Costs, PublishedContract
from serving.reasons import as_text

RETRIES = 3

RETRY_STATUSES = (429, 500, 502, 503, 504)


class ServiceError(RuntimeError):
    """The service could not be used; the message is meant for a person."""


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _explain(exc: Exception | None, response: requests.Response | None, url: str) -> str:
    cause = exc.args[0] if exc is not None and exc.args else None
    gave_up_waiting = isinstance(cause, MaxRetryError) and isinstance(
        cause.reason, ReadTimeoutError
    )
    if isinstance(exc, requests.ConnectionError) and not gave_up_waiting:
        return f"The scoring service at {url} is not reachable. Is it running (make serve)?"
    if isinstance(exc, requests.Timeout) or gave_up_waiting:
        return f"The scoring service at {url} did not answer in time."
    if response is not None:
        if response.status_code == 401:
            return "The service refused the API key (401). Check the key in the sidebar."
        try:
            body = response.json()
        except ValueError:
            body = {}
        message = body.get("error") if isinstance(body, dict) else None
        rows = body.get("rows") if isinstance(body, dict) else None
        where = f" (rows {', '.join(map(str, rows))})" if rows else ""
        if message:
            return f"The service rejected the request ({response.status_code}): {message}{where}"
        return f"The service answered {response.status_code}."
    return f"Unexpected error talking to {url}: {exc}"


def fetch_contract(url: str, api_key: str | None = None, timeout: float = 5) -> PublishedContract:
    try:
        response = requests.get(f"{url}/schema", headers=_headers(api_key), timeout=timeout)
    except requests.RequestException as exc:
        raise ServiceError(_explain(exc, None, url)) from None
    if response.status_code != 200:
        raise ServiceError(_explain(None, response, url))
    try:
        return PublishedContract.model_validate(response.json())
    except (ValueError, ValidationError):
        raise ServiceError(f"{url}/schema did not answer with a contract this UI reads") from None


def is_ready(url: str, timeout: float = 3) -> bool:
    try:
        return requests.get(f"{url}/readyz", timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def read_file(name: str, data: bytes) -> pd.DataFrame:
    """CSV (the real creditcard.csv format included) or Parquet, by name or magic bytes."""
    if data[:4] == b"PAR1" or name.lower().endswith((".parquet", ".pq")):
        return pd.read_parquet(io.BytesIO(data))
    return pd.read_csv(io.BytesIO(data))


def check_against_contract(frame: pd.DataFrame, contract: PublishedContract) -> list[str]:
    """What the service would refuse in this file, by the service's own contract check
    (serving/scoring.py), every problem at once. Rows are shown as a spreadsheet counts
    data rows (from 1); the service's `rows` are the same rows as 0-based positions.
    Empty when the file can be sent."""
    unknown = contract.limits.unknown_columns
    return [_describe(problem.body) for problem in scoring.problems(frame, contract, unknown)]


def _describe(body: dict[str, Any]) -> str:
    rows = body.get("rows")
    where = f" (data rows {', '.join(str(r + 1) for r in rows)})" if rows else ""
    return f"{body['error']}{where}."


def chunk_size(contract: PublishedContract, frame: pd.DataFrame, wanted: int = 50_000) -> int:
    """Rows per request within the service's row and byte limits (Parquet, ~8 B a cell
    uncompressed, with a 2x margin)."""
    limits = contract.limits
    by_rows = limits.max_rows_per_request
    by_bytes = limits.max_payload_bytes // max(1, 16 * frame.shape[1])
    return max(1, min(wanted, by_rows, by_bytes))


@dataclass
class ScoringRun:
    scored: list[pd.DataFrame] = field(default_factory=list)
    rows_done: int = 0
    seconds: float = 0.0
    retries: int = 0
    error: str | None = None

    @property
    def result(self) -> pd.DataFrame:
        return pd.concat(self.scored, ignore_index=True) if self.scored else pd.DataFrame()


def score_in_chunks(
    frame: pd.DataFrame,
    url: str,
    contract: PublishedContract,
    api_key: str | None = None,
    rows_per_chunk: int | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    timeout: float = 120,
    backoff: float = 0.5,
) -> ScoringRun:
    """Send `frame` in chunks to /predict_file (Parquet both ways). A chunk that fails with
    a 5xx, a 429 (after its Retry-After), a timeout or a lost connection is retried; a
    persistent failure stops the run and keeps the chunks already scored. Other 4xx are
    not retried: the data is at fault."""
    run = ScoringRun()
    size = rows_per_chunk or chunk_size(contract, frame)
    start = time.perf_counter()
    with _retrying_session(backoff) as session:
        for offset in range(0, len(frame), size):
            part = frame.iloc[offset : offset + size]
            buffer = io.BytesIO()
            part.to_parquet(buffer, index=False)
            exc, response = None, None
            try:
                response = session.post(
                    f"{url}/predict_file",
                    headers=_headers(api_key),
                    timeout=timeout,
                    files={"file": ("chunk.parquet", buffer.getvalue())},
                    data={"output_format": "parquet"},
                )
                run.retries += len(response.raw.retries.history) if response.raw.retries else 0
            except requests.RequestException as error:
                exc = error
                run.retries += RETRIES  # urllib3 gave up after all of them
            if response is None or response.status_code != 200:
                first, last = offset + 1, offset + len(part)
                run.error = (
                    f"Rows {first}-{last} could not be scored: {_explain(exc, response, url)}"
                )
                run.seconds = time.perf_counter() - start
                return run
            scored = pd.read_parquet(io.BytesIO(response.content))
            # the file's own ids, or the ones the service assigned (what a label must name)
            run.scored.append(scored[[ID_COLUMN, "fraud_probability", "risk_band"]])
            run.rows_done += len(part)
            run.seconds = time.perf_counter() - start
            if progress:
                progress(run.rows_done, len(frame), run.seconds)
    return run


def _retrying_session(backoff: float) -> requests.Session:
    """Retries by urllib3: lost connections, timeouts, 5xx, and 429 after the service's
    Retry-After. Scoring a chunk twice is harmless, so POST is retried too."""
    retry = Retry(
        total=RETRIES,
        backoff_factor=backoff,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=None,  # every method, POST included
        respect_retry_after_header=True,
        raise_on_status=False,  # the last answer comes back, to be explained
    )
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    return session


def threshold_summary(
    probabilities: np.ndarray,
    threshold: float,
    costs: Costs,
    labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """What the page shows for a threshold. Without labels the expected cost comes from the
    calibrated probabilities themselves: a flagged row costs a review with probability
    1 - p of being a false alarm, an unflagged one a missed fraud with probability p."""
    flagged = probabilities >= threshold
    summary: dict[str, Any] = {
        "rows": len(probabilities),
        "flagged": int(flagged.sum()),
        "flagged_share": float(flagged.mean()) if len(flagged) else 0.0,
    }
    c_fn, c_fp = costs.cost_missed_fraud, costs.cost_false_alarm
    if labels is None:
        summary["expected_cost"] = float(
            np.sum((1 - probabilities[flagged]) * c_fp) + np.sum(probabilities[~flagged] * c_fn)
        )
        return summary
    labels = labels.astype(bool)
    tp, fp = int((flagged & labels).sum()), int((flagged & ~labels).sum())
    fn = int((~flagged & labels).sum())
    summary.update(
        {
            "expected_cost": float(c_fp * fp + c_fn * fn),
            "true_positives": tp,
            "false_positives": fp,
            "false_negatives": fn,
            "precision": tp / (tp + fp) if tp + fp else 0.0,
            "recall": tp / (tp + fn) if tp + fn else 0.0,
        }
    )
    return summary


def pr_curve(probabilities: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    precision, recall, _ = precision_recall_curve(labels, probabilities)
    return pd.DataFrame({"recall": recall, "precision": precision})


def send_labels(
    url: str, labels: list[dict[str, Any]], api_key: str | None = None, timeout: float = 30
) -> dict[str, Any]:
    """POST the analyst's verdicts ({transaction_id, is_fraud}) to /feedback; the service's
    answer (stored, corrections, unchanged, unknown), or ServiceError in words."""
    exc, response = None, None
    try:
        response = requests.post(f"{url}/feedback", json={"labels": labels}, timeout=timeout,
                                 headers=_headers(api_key))  # fmt: skip
    except requests.RequestException as error:
        exc = error
    if response is None or response.status_code != 200:
        raise ServiceError(_explain(exc, response, url))
    return response.json()


def explain(
    url: str, rows: pd.DataFrame, features: list[str], api_key: str | None = None,
    reasons: int = 3, timeout: float = 120,
) -> pd.DataFrame:  # fmt: skip
    """The service's reason codes (/explain: no decision is logged again) of `rows`, which
    carry their transaction ids: a frame of transaction_id, reasons (the list of
    {feature, value, contribution}) and text (`V14 = -9.1 (+2.3); ...`)."""
    records = rows[[ID_COLUMN, *features]].astype({ID_COLUMN: str}).to_dict(orient="records")
    exc, response = None, None
    try:
        response = requests.post(f"{url}/explain", timeout=timeout, headers=_headers(api_key),
                                 json={"transactions": records, "reasons": reasons})  # fmt: skip
    except requests.RequestException as error:
        exc = error
    if response is None or response.status_code != 200:
        raise ServiceError(_explain(exc, response, url))
    explained = pd.DataFrame(response.json()["explanations"])
    explained["text"] = explained[REASONS_COLUMN].map(as_text)
    return explained


def top_reasons(explained: pd.DataFrame) -> pd.DataFrame:
    """How often each feature is among the rows' reasons, and its mean contribution there:
    what drives the explained rows, most frequent first."""
    pairs = [(r["feature"], r["contribution"]) for row in explained[REASONS_COLUMN] for r in row]
    if not pairs:
        return pd.DataFrame(columns=["feature", "rows", "mean_contribution"])
    table = pd.DataFrame(pairs, columns=["feature", "contribution"])
    summary = table.groupby("feature")["contribution"].agg(rows="size", mean_contribution="mean")
    return summary.reset_index().sort_values(["rows", "feature"], ascending=[False, True])


# The realised and estimated alert precision the service publishes (serving/performance.py),
# over its 1-day window, as Prometheus recorded them; max() over the scrape targets, as the
# dashboard does (every replica computes the same figures from the shared log).
PERFORMANCE_SERIES = {
    "realised": 'max(fraud_realised_alert_precision{window="1d"})',
    "estimated": 'max(fraud_estimated_alert_precision{window="1d"})',
}


def performance_history(prometheus: str, hours: float = 24, points: int = 200) -> pd.DataFrame:
    """Realised against estimated alert precision over the last `hours`, from Prometheus's
    query_range API: columns time, series, precision (empty when nothing was recorded).
    ServiceError when Prometheus cannot be asked."""
    end = time.time()
    step = max(hours * 3600 / points, 1.0)
    frames = []
    for name, query in PERFORMANCE_SERIES.items():
        try:
            response = requests.get(f"{prometheus}/api/v1/query_range", timeout=10, params={
                "query": query, "start": end - hours * 3600, "end": end, "step": step})  # fmt: skip
            response.raise_for_status()
            results = response.json()["data"]["result"]
        except requests.ConnectionError:
            raise ServiceError(f"Prometheus at {prometheus} is not reachable") from None
        except (requests.RequestException, ValueError, KeyError) as error:
            raise ServiceError(
                f"Prometheus at {prometheus} did not answer the query ({type(error).__name__})"
            ) from None
        for result in results:
            values = np.array(result["values"], dtype=float).reshape(-1, 2)
            frames.append(pd.DataFrame({
                "time": pd.to_datetime(values[:, 0], unit="s", utc=True), "series": name,
                "precision": values[:, 1]}))  # fmt: skip
    if not frames:
        return pd.DataFrame(columns=["time", "series", "precision"])
    history = pd.concat(frames, ignore_index=True)
    return history[np.isfinite(history["precision"])].reset_index(drop=True)
