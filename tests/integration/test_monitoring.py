"""Observability as code, proved against a real Prometheus scraping a real service (the
files alone are checked in tests/unit/test_monitoring_config.py)."""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator

import pandas as pd
import pytest
import requests

from monitoring.snapshot import panel_queries, render
from monitoring.stack import prometheus_command, prometheus_config
from ui import client

from ..conftest import (
    ROOT,
    bento_dir,
    free_port,
    start_bento,
    start_server,
    stop,
    system_tool,
)

ARTIFACTS = ROOT / "test-artifacts"


@pytest.mark.integration
class TestLiveStack:
    @pytest.fixture(scope="class")
    @classmethod
    def stack(cls, built, tmp_path_factory) -> Iterator[dict]:
        """The shared build's Bento (its own BentoML home) scraped by a real Prometheus."""
        prometheus = system_tool("prometheus")
        base = tmp_path_factory.mktemp("monitoring")
        ws, env = built
        # A small drift window so one shifted batch shows in the gauge.
        env = {**env, "FRAUD_DRIFT_WINDOW_ROWS": "2000", "BENTOML_HOME": str(base / "home"),
               "FRAUD_PERFORMANCE_SECONDS": "1"}  # fmt: skip
        service, url = start_bento(bento_dir(ws), env, base / "serve.log")
        port = free_port()
        config = base / "prometheus.yml"
        text = prometheus_config(int(url.rsplit(":", 1)[1]), port)
        config.write_text(
            text.replace("scrape_interval: 5s", "scrape_interval: 1s").replace(
                "evaluation_interval: 5s", "evaluation_interval: 1s"
            )
        )
        prom_url = f"http://127.0.0.1:{port}"
        args = prometheus_command(prometheus, config, "127.0.0.1", port, base / "tsdb")
        prom = start_server(args, dict(os.environ), base / "prometheus.log", f"{prom_url}/-/ready")
        try:
            yield {"service": url, "prometheus": prom_url, "workspace": ws}
        finally:
            stop(prom)
            stop(service)

    @staticmethod
    def query(stack: dict, expr: str) -> list[dict]:
        response = requests.get(
            f"{stack['prometheus']}/api/v1/query", params={"query": expr}, timeout=10
        )
        assert response.status_code == 200, (expr, response.text)
        return response.json()["data"]["result"]

    @staticmethod
    def wait_for(check, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value or time.monotonic() > deadline:
                return value
            time.sleep(1)

    @pytest.fixture(scope="class")
    @classmethod
    def load(cls, stack) -> dict:
        """A bounded mixed load: good batches of several sizes and some bad requests. What
        was sent; a test that sends more adds it here, so the counts hold in any order."""
        labelled = pd.read_parquet(stack["workspace"] / "data/split/test.parquet")
        rows = labelled.drop(columns="Class")
        sent, good, url = 0, 0, stack["service"]
        # Spread over ~10 s, so 1-minute rates and the snapshot show a shape.
        for size in (1, 1, 1, 20, 50, 300, 1500):
            time.sleep(1)
            batch = rows.sample(size, random_state=size).to_dict(orient="records")
            response = requests.post(f"{url}/predict", json={"transactions": batch}, timeout=60)
            assert response.status_code == 200
            sent, good = sent + size, good + 1
        response = requests.post(
            f"{url}/predict_file",
            timeout=60,
            files={"file": ("b.csv", rows.head(2500).to_csv(index=False))},
        )
        assert response.status_code == 200
        sent += 2500
        # Their outcomes come back (the file's frauds and legitimate rows), for the
        # realised-performance panels.
        ids = pd.read_csv(io.BytesIO(response.content))["transaction_id"]
        outcomes = pd.DataFrame(
            {"transaction_id": ids, "is_fraud": labelled["Class"].head(2500).astype(bool)}
        )
        answer = requests.post(f"{url}/feedback", timeout=60, files={
            "file": ("labels.csv", outcomes.to_csv(index=False).encode())})  # fmt: skip
        assert answer.status_code == 200 and answer.json()["stored"] == 2500, answer.text
        bad = {"empty-batch": 2, "missing-columns": 1}
        for _ in range(2):
            time.sleep(1)
            requests.post(f"{url}/predict", json={"transactions": []}, timeout=10)
        requests.post(f"{url}/predict", json={"transactions": [{"Time": 1}]}, timeout=10)
        return {"rows": sent, "good_json": good, "bad": bad}

    def test_every_panel_query_returns_data(self, stack, load) -> None:
        assert self.wait_for(lambda: self.query(stack, "sum(fraud_rows_scored_total)"))
        time.sleep(3)  # a few more scrapes, so rate() windows hold two samples
        empty = []
        for panel in panel_queries(rate_window="1m"):
            for target in panel["targets"]:
                if not self.wait_for(lambda e=target["expr"]: self.query(stack, e), 15):
                    empty.append((panel["title"], target["expr"]))
        assert not empty, f"panels with no data: {empty}"

    def test_numbers_agree_with_the_load(self, stack, load) -> None:
        def scalar(expr: str) -> float:
            result = self.query(stack, expr)
            return float(result[0]["value"][1]) if result else -1.0

        def reaches(expr: str, value: float) -> bool:
            # Each until the scrapes have caught up with the last request the load sent.
            return self.wait_for(lambda: scalar(expr) == value)

        assert reaches("sum(fraud_rows_scored_total)", load["rows"])
        ok = 'sum(bentoml_service_request_total{endpoint="/predict", http_response_code="200"})'
        assert reaches(ok, load["good_json"]), scalar(ok)
        for reason, count in load["bad"].items():
            expr = f'sum(fraud_validation_failures_total{{reason="{reason}"}})'
            assert reaches(expr, count), (reason, scalar(expr))
        assert scalar('count(up{job="fraud-scoring"} == 1)') == 1
        assert reaches("sum(fraud_probability_count)", load["rows"])
        served = self.query(stack, "fraud_model_info")[0]["metric"]["model_md5"]
        champion = json.loads((stack["workspace"] / "models/champion.json").read_text())
        assert served == champion["model_md5"]

    def test_the_ui_plots_realised_against_estimated_precision(self, stack, load) -> None:
        """The UI's performance view reads the service's gauges back from Prometheus: both
        series, each ending at the value Prometheus holds now."""
        from streamlit.testing.v1 import AppTest

        def now(series: str) -> float | None:
            result = self.query(stack, client.PERFORMANCE_SERIES[series])
            return float(result[0]["value"][1]) if result else None

        assert self.wait_for(lambda: now("realised") is not None and now("estimated"))

        def both() -> list[pd.DataFrame]:  # wait_for wants a truth value: a list of one
            history = client.performance_history(stack["prometheus"], hours=0.5)
            return [history] if history["series"].nunique() == 2 else []

        (history,) = self.wait_for(both) or [client.performance_history(stack["prometheus"])]
        assert set(history["series"]) == {"realised", "estimated"}
        for series, rows in history.groupby("series"):
            assert rows["precision"].between(0, 1).all()
            assert rows.sort_values("time")["precision"].iloc[-1] == pytest.approx(now(series))
        os.environ["FRAUD_PROMETHEUS_URL"] = stack["prometheus"]
        try:
            at = AppTest.from_file(str(ROOT / "ui" / "app.py"), default_timeout=60).run()
        finally:
            del os.environ["FRAUD_PROMETHEUS_URL"]
        assert not at.exception
        assert any(h.value == "Performance in production" for h in at.subheader)
        assert at.get("vega_lite_chart"), "no chart drawn"

    def test_snapshot_renders(self, stack, load) -> None:
        out = render(stack["prometheus"], minutes=0.75, out=ARTIFACTS / "monitoring_snapshot.png")
        assert out.stat().st_size > 50_000

    def test_drift_rises_and_alert_goes_pending(self, stack, load) -> None:
        rows = pd.read_parquet(stack["workspace"] / "data/split/test.parquet").drop(columns="Class")
        shifted = rows.head(3000).copy()
        # A population that looks like fraud on its strongest features.
        for column in ("V14", "V12", "V10", "V17"):
            shifted[column] -= 6
        response = requests.post(
            f"{stack['service']}/predict_file",
            timeout=60,
            files={"file": ("s.csv", shifted.to_csv(index=False))},
        )
        assert response.status_code == 200
        load["rows"] += len(shifted)  # what test_numbers_agree_with_the_load counts

        def psi() -> float:
            result = self.query(stack, 'max(fraud_drift_psi{feature="score"})')
            return float(result[0]["value"][1]) if result else 0.0

        assert self.wait_for(lambda: psi() > 0.2), psi()

        def drift_alert() -> list[dict]:
            alerts = requests.get(f"{stack['prometheus']}/api/v1/alerts", timeout=10).json()
            return [
                a
                for a in alerts["data"]["alerts"]
                if a["labels"]["alertname"] == "FraudScoreDrift"
                and a["state"] in ("pending", "firing")
            ]

        assert self.wait_for(drift_alert, 30)
