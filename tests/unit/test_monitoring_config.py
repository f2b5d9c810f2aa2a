"""The monitoring files on their own: Prometheus' config, alert rules and their unit tests
through promtool (offline), and the Grafana dashboard's JSON. A real Prometheus scraping a
real service: tests/integration/test_monitoring.py."""

from __future__ import annotations

import json
import subprocess

from ..conftest import ROOT, system_tool

MONITORING = ROOT / "monitoring"


def test_promtool_checks_config_and_rules() -> None:
    promtool = system_tool("promtool")
    for args in (
        ["check", "config", str(MONITORING / "prometheus.yml")],
        ["check", "rules", str(MONITORING / "alerts.yml")],
        ["test", "rules", str(MONITORING / "tests" / "alerts_test.yml")],
    ):
        result = subprocess.run([promtool, *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_is_provisionable() -> None:
    dashboard = json.loads((MONITORING / "grafana/dashboards/fraudops.json").read_text())
    assert dashboard["uid"] == "fraudops-service"
    assert dashboard["templating"]["list"][0]["type"] == "datasource"
    titles = [p["title"] for p in dashboard["panels"]]
    assert len(titles) == len(set(titles)) >= 12
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            assert "bentoml_api_server" not in target["expr"]  # the old API's names
