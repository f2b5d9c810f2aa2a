"""The Streamlit UI: its client logic and AppTest runs against a real `bentoml serve`, and
an end-to-end run in real headless Chromium against real `streamlit run`."""

from __future__ import annotations

import http.server
import io
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests

from monitoring.stack import ui_command
from serving.contract import PublishedContract
from ui import client, review

from ..conftest import (
    REAL_SAMPLE,
    ROOT,
    bento_dir,
    free_port,
    start_bento,
    start_server,
    stop,
)

pytestmark = pytest.mark.integration
SAMPLE = ROOT / "ui" / "sample_transactions.csv"
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def service(built, tmp_path_factory) -> Iterator[dict]:
    """The shared build's Bento, served with its own BentoML home."""
    base = tmp_path_factory.mktemp("ui")
    ws, env = built
    env = {**env, "BENTOML_HOME": str(base / "home")}
    process, url = start_bento(bento_dir(ws), env, base / "serve.log")
    yield {"url": url, "workspace": ws, "env": env, "base": base}
    stop(process)


@pytest.fixture(scope="module")
def contract(service) -> PublishedContract:
    return client.fetch_contract(service["url"])


def _served_probabilities(url: str, frame: pd.DataFrame) -> np.ndarray:
    response = requests.post(
        f"{url}/predict_file", timeout=60, files={"file": ("f.csv", frame.to_csv(index=False))}
    )
    assert response.status_code == 200
    return pd.read_csv(io.StringIO(response.text))["fraud_probability"].to_numpy()


# --- client logic against the real service -------------------------------------------


def test_contract_check_names_columns_and_rows(contract) -> None:
    frame = pd.read_csv(SAMPLE)
    assert client.check_against_contract(frame, contract) == []
    bad = frame.drop(columns=["V2"]).astype({"V5": object})
    bad.loc[[0, 6], "V5"] = "x"
    bad.loc[3, "Amount"] = -1
    problems = client.check_against_contract(bad, contract)
    # The service's own check and words, every problem at once, rows counted from 1.
    assert "required columns are missing: V2." in problems
    assert "'V5' must be a number (data rows 1, 7)." in problems
    amount = next(p for p in problems if p.startswith("'Amount'"))
    assert "outside the model's valid range [0.0" in amount and amount.endswith("(data rows 4).")
    assert len(problems) == 3


def test_chunks_match_single_request(service, contract) -> None:
    frame = pd.read_csv(SAMPLE)
    seen = []
    run = client.score_in_chunks(
        frame,
        service["url"],
        contract,
        rows_per_chunk=300,
        progress=lambda done, total, s: seen.append(done),
    )
    assert run.error is None and seen == [300, 600, 900, 1000]
    np.testing.assert_allclose(
        run.result["fraud_probability"], _served_probabilities(service["url"], frame), rtol=1e-12
    )


def test_bad_chunk_keeps_earlier_chunks(service, contract) -> None:
    frame = pd.read_csv(SAMPLE)
    frame.loc[650, "V1"] = 1e9  # out of the contract's range: the service says 422
    run = client.score_in_chunks(frame, service["url"], contract, rows_per_chunk=300)
    assert run.rows_done == 600 and len(run.result) == 600 and run.retries == 0
    assert "Rows 601-900 could not be scored" in run.error and "(422)" in run.error
    assert "'V1'" in run.error and "(rows 50)" in run.error


class FlakyProxy:
    """A real HTTP server in front of the service that answers `status` (503: a transient
    outage, as a load balancer shows it) to the first `failures` requests, then forwards."""

    def __init__(
        self, target: str, failures: int, status: int = 503, headers: dict | None = None
    ) -> None:
        self.failures, self.seen = failures, 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                proxy.seen += 1
                if proxy.seen <= proxy.failures:
                    self.send_response(status)
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                upstream = requests.post(
                    target + self.path,
                    data=body,
                    timeout=60,
                    headers={"Content-Type": self.headers["Content-Type"]},
                )
                self.send_response(upstream.status_code)
                self.send_header("Content-Length", str(len(upstream.content)))
                self.end_headers()
                self.wfile.write(upstream.content)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_transient_failures_are_retried(service, contract) -> None:
    proxy = FlakyProxy(service["url"], failures=2)
    frame = pd.read_csv(SAMPLE)
    try:
        run = client.score_in_chunks(frame, proxy.url, contract, rows_per_chunk=500, backoff=0.01)
    finally:
        proxy.server.shutdown()
    assert run.error is None and run.retries == 2 and len(run.result) == 1000


def test_busy_service_is_retried_after_its_retry_after(service, contract) -> None:
    """A 429 (all scoring slots busy) is retried, after the Retry-After the service sent."""
    proxy = FlakyProxy(service["url"], failures=1, status=429, headers={"Retry-After": "1"})
    frame = pd.read_csv(SAMPLE)
    start = time.perf_counter()
    try:
        run = client.score_in_chunks(frame, proxy.url, contract, rows_per_chunk=500, backoff=0.01)
    finally:
        proxy.server.shutdown()
    assert run.error is None and run.retries == 1 and len(run.result) == 1000
    assert time.perf_counter() - start >= 1.0  # waited as told, not the 0.01 s backoff


def test_persistent_outage_is_explained(contract) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    run = client.score_in_chunks(pd.read_csv(SAMPLE), url, contract, backoff=0.01)
    assert run.rows_done == 0 and run.retries == client.RETRIES
    assert "not reachable" in run.error and "Traceback" not in run.error


# --- the page, through Streamlit's AppTest --------------------------------------------


def _app(url: str, monkeypatch: pytest.MonkeyPatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("FRAUD_SERVICE_URL", url)  # the page reads it; gone after the test
    return AppTest.from_file(str(ROOT / "ui" / "app.py"), default_timeout=120)


def _metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_app_scores_the_sample(service, contract, monkeypatch) -> None:
    at = _app(service["url"], monkeypatch).run()
    assert not at.exception
    assert "Service is up" in [s.value for s in at.sidebar.success]
    assert at.sidebar.slider[0].value == pytest.approx(contract.threshold, abs=5e-4)
    at.button[0].click().run()  # "Try a sample"
    assert not at.exception and not at.error
    shown = _metrics(at)
    frame = pd.read_csv(SAMPLE)
    probabilities = _served_probabilities(service["url"], frame)
    threshold = at.sidebar.slider[0].value
    assert shown["Rows scored"] == "1,000"
    assert shown["Flagged"] == f"{int((probabilities >= threshold).sum()):,}"
    summary = client.threshold_summary(
        probabilities, threshold, contract.costs, frame["Class"].to_numpy()
    )
    assert shown["Precision / recall"] == f"{summary['precision']:.2f} / {summary['recall']:.2f}"
    # Moving the threshold recomputes from the scores, without scoring again.
    at.sidebar.slider[0].set_value(0.0).run()
    assert _metrics(at)["Flagged"] == "1,000"


def _served_reasons(url: str, rows: pd.DataFrame, contract: PublishedContract) -> dict[str, str]:
    """The service's own reason codes (/explain) of rows with their ids, as text."""
    explained = client.explain(url, rows, contract.feature_names)
    return dict(zip(explained["transaction_id"], explained["text"], strict=True))


def test_app_shows_the_reasons_of_the_riskiest_rows(service, contract, monkeypatch) -> None:
    at = _app(service["url"], monkeypatch).run()
    at.button[0].click().run()  # "Try a sample"
    assert not at.exception and not at.error and not at.warning
    (table,) = [d.value for d in at.dataframe]
    assert len(table) == 20 and table["reasons"].notna().all()
    served = _served_reasons(service["url"], table, contract)
    assert table["reasons"].tolist() == [served[str(i)] for i in table["transaction_id"]]
    assert table["reasons"].str.fullmatch(r"([\w]+ = \S+ \([+-]\S+\)(; )?){3}").all()
    texts = " ".join(m.value for m in at.markdown)
    assert "What drives the" in texts  # the chart of the flagged rows' reasons
    first_in_queue = next(r.key.removeprefix("verdict:") for r in at.radio
                          if r.key.startswith("verdict:"))  # fmt: skip
    assert served[first_in_queue] in texts  # the queue shows each row's reasons


def _labels(service: dict) -> dict[str, bool]:
    """The labels the service stored (its decision log in its BentoML home)."""
    database = Path(service["env"]["BENTOML_HOME"]) / "fraud_data" / "decisions.db"
    with sqlite3.connect(database) as db:
        return dict(db.execute("SELECT transaction_id, is_fraud FROM labels ORDER BY id"))


def test_app_review_queue_sends_verdicts_as_labels(service, contract, monkeypatch) -> None:
    at = _app(service["url"], monkeypatch).run()
    at.button[0].click().run()  # "Try a sample"
    assert not at.exception and not at.error
    queue = [r for r in at.radio if r.key.startswith("verdict:")]
    probabilities = _served_probabilities(service["url"], pd.read_csv(SAMPLE))
    flagged = int((probabilities >= at.sidebar.slider[0].value).sum())
    assert len(queue) == min(review.QUEUE_ROWS, flagged) > 1
    first, second = (r.key.removeprefix("verdict:") for r in queue[:2])
    queue[0].set_value("fraud")
    queue[1].set_value("legitimate")
    next(b for b in at.button if b.label == "Send verdicts").click().run()
    assert not at.exception
    said = [s.value for s in at.main.success]
    assert said and said[-1].startswith("Sent 2 verdicts: 2 new, 0 corrections"), said
    stored = _labels(service)
    assert (stored[first], stored[second]) == (1, 0)
    # The queue moves on: the two reviewed rows leave it, the next riskiest come up.
    after = [r.key.removeprefix("verdict:") for r in at.radio if r.key.startswith("verdict:")]
    assert first not in after and second not in after
    assert len(after) == min(review.QUEUE_ROWS, flagged - 2)


def test_app_refuses_a_bad_file_before_sending(service, monkeypatch) -> None:
    at = _app(service["url"], monkeypatch)
    bad = pd.read_csv(SAMPLE).drop(columns=["Amount"])
    at.session_state["source"] = ("bad.csv", bad.to_csv(index=False).encode())
    at.run()
    errors = " ".join(e.value for e in at.error)
    assert "not sent" in errors and "required columns are missing: Amount." in errors
    assert not at.metric


def test_app_says_when_service_is_down(monkeypatch) -> None:
    at = _app(f"http://127.0.0.1:{free_port()}", monkeypatch).run()
    assert not at.exception
    assert any("down or unreachable" in e.value for e in at.sidebar.error)


# --- end to end in a real browser -----------------------------------------------------


def _chromium() -> tuple[str, str]:
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        if os.environ.get("CI") == "true":
            pytest.fail("chromium and chromium-driver are required in CI (.ci/run installs them)")
        pytest.skip(
            "chromium / chromedriver not installed (apt-get install chromium chromium-driver)"
        )
    return browser, driver


def test_browser_end_to_end(service, tmp_path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = _chromium()
    upload = REAL_SAMPLE if REAL_SAMPLE.is_file() else SAMPLE
    port = free_port()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,2200",
        f"--user-data-dir={tmp_path / 'chrome-profile'}",
    ):
        options.add_argument(flag)
    driver = None
    app = start_server(
        ui_command("127.0.0.1", port),
        {**os.environ, "FRAUD_SERVICE_URL": service["url"]},
        tmp_path / "streamlit.log",
        f"http://127.0.0.1:{port}/_stcore/health",
    )
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
        driver.get(f"http://127.0.0.1:{port}")
        wait = WebDriverWait(driver, 90)
        wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "body"), "Service is up"))
        file_input = wait.until(
            ec.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]"))
        )
        file_input.send_keys(str(upload))
        score = wait.until(ec.element_to_be_clickable((By.XPATH, "//button[.//p[text()='Score']]")))
        score.click()
        wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "body"), "Top 20 riskiest"))
        # The reasons: the chart of what drives the flagged rows, and each queued row's
        # reasons as the service gives them.
        wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "body"), "What drives the"))
        time.sleep(2)  # let the charts draw before the screenshot
        metrics = {
            m.find_element(By.CSS_SELECTOR, "[data-testid=stMetricLabel]").text: m.find_element(
                By.CSS_SELECTOR, "[data-testid=stMetricValue]"
            ).text
            for m in driver.find_elements(By.CSS_SELECTOR, "[data-testid=stMetric]")
        }
        frame = pd.read_csv(upload)
        contract = client.fetch_contract(service["url"])
        probabilities = _served_probabilities(service["url"], frame)
        assert metrics["Rows scored"] == f"{len(frame):,}"
        assert metrics["Flagged"] == f"{int((probabilities >= contract.threshold).sum()):,}"
        ARTIFACTS.mkdir(exist_ok=True)
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1400, max(2200, height + 200))
        driver.save_screenshot(str(ARTIFACTS / "ui_scored.png"))
        scored = pd.read_csv(upload).assign(transaction_id=None)
        first_id = driver.find_element(
            By.XPATH, "(//div[@data-testid='stRadio'])[1]/ancestor::div[@data-testid="
            "'stHorizontalBlock'][1]//code").text  # fmt: skip
        position = int(first_id.rsplit(":", 1)[1])
        scored = scored.iloc[[position]].assign(transaction_id=first_id)
        reason = _served_reasons(service["url"], scored, contract)[first_id]
        assert reason in driver.find_element(By.TAG_NAME, "body").text
        # The review queue: the riskiest flagged row marked fraud, sent as a label.
        verdict = driver.find_element(
            By.XPATH, "(//div[@data-testid='stRadio'])[1]//label[.//p[text()='fraud']]"
        )
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", verdict)
        verdict.click()
        driver.find_element(By.XPATH, "//button[.//p[text()='Send verdicts']]").click()
        wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "body"), "Sent 1 verdict: "))
    finally:
        if driver is not None:
            driver.quit()
        stop(app)
