"""`make up` / `make down`: the local stack on loopback, each process tracked by pid.

up: the service (bentoml serve of the built Bento), Prometheus scraping it, the Streamlit
UI when ui/app.py exists, and Grafana when a Grafana binary is on the PATH. Logs and pid
files go to .run/. down: stops what up started (SIGTERM to each process group, then
SIGKILL after a grace period).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from stages.lib.project import pipeline_path
from stages.lib.servers import BIN, start_tracked, stop_tracked, wait_until_ready

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / ".run"
HOST = "127.0.0.1"
PORTS = {
    "service": int(os.environ.get("PORT", "3000")),
    "prometheus": 9090,
    "ui": 8501,
    "grafana": 3001,
}


def _ready(url: str, timeout: float) -> bool:
    try:
        wait_until_ready(url, timeout=timeout)
    except TimeoutError:
        return False
    return True


def _start(name: str, args: list[str], env: dict[str, str] | None = None) -> None:
    start_tracked(name, args, {**os.environ, **(env or {})}, RUN, cwd=ROOT)


def prometheus_config(service_port: int, prometheus_port: int) -> str:
    """monitoring/prometheus.yml with the ports in use (and an absolute rule path)."""
    text = (ROOT / "monitoring" / "prometheus.yml").read_text()
    text = text.replace("127.0.0.1:3000", f"127.0.0.1:{service_port}")
    text = text.replace("127.0.0.1:9090", f"127.0.0.1:{prometheus_port}")
    return text.replace("  - alerts.yml", f"  - {ROOT / 'monitoring' / 'alerts.yml'}")


def ui_command(host: str, port: int) -> list[str]:
    return [
        str(BIN / "streamlit"), "run", str(ROOT / "ui" / "app.py"),
        "--server.address", host, "--server.port", str(port),
        "--server.headless", "true", "--browser.gatherUsageStats", "false",
        # the full creditcard.csv is 144 MB; Streamlit's default cap is 200 MB
        "--server.maxUploadSize", "300",
    ]  # fmt: skip


def prometheus_command(binary: str, config: Path, host: str, port: int, tsdb: Path) -> list[str]:
    return [binary, f"--config.file={config}", f"--web.listen-address={host}:{port}",
            f"--storage.tsdb.path={tsdb}"]  # fmt: skip


def up() -> None:
    RUN.mkdir(exist_ok=True)
    bento = pipeline_path("bento", ROOT)
    if not (bento / "bento.yaml").exists():
        raise SystemExit("no Bento yet: run `make pipeline` first")
    bentoml = str(BIN / "bentoml")
    _start(
        "service", [bentoml, "serve", str(bento), "--host", HOST, "--port", str(PORTS["service"])]
    )
    service = f"http://{HOST}:{PORTS['service']}"
    checks = {"service": (service, "/readyz")}
    if _start_prometheus():
        checks["prometheus"] = (f"http://{HOST}:{PORTS['prometheus']}", "/-/ready")
    if (ROOT / "ui" / "app.py").exists():
        prometheus = f"http://{HOST}:{PORTS['prometheus']}"
        env = {"FRAUD_SERVICE_URL": service, "FRAUD_PROMETHEUS_URL": prometheus}
        _start("ui", ui_command(HOST, PORTS["ui"]), env=env)
        checks["ui"] = (f"http://{HOST}:{PORTS['ui']}", "/_stcore/health")
    _start_grafana()
    for name, (base, probe) in checks.items():
        state = "up" if _ready(base + probe, 120) else f"NOT ready (see .run/{name}.log)"
        print(f"{name:10s} {base:26s} {state}")


def _start_prometheus() -> bool:
    prometheus = shutil.which("prometheus")
    if not prometheus:
        print("prometheus: not found; `apt-get install -y prometheus` (Debian) to get it")
        return False
    config = RUN / "prometheus.yml"
    config.write_text(prometheus_config(PORTS["service"], PORTS["prometheus"]))
    tsdb = RUN / "prometheus-data"
    _start("prometheus", prometheus_command(prometheus, config, HOST, PORTS["prometheus"], tsdb))
    return True


def _start_grafana() -> None:
    grafana = shutil.which("grafana") or shutil.which("grafana-server")
    if not grafana:
        print(
            "grafana: not on the PATH; install Grafana (grafana.com/grafana/download) and "
            "run `make up` again, or use docker-compose.yml. Provisioning: monitoring/grafana/"
        )
        return
    args = [grafana, "server"] if grafana.endswith("/grafana") else [grafana]
    _start(
        "grafana",
        args,
        env={
            "GF_SERVER_HTTP_ADDR": HOST,
            "GF_SERVER_HTTP_PORT": str(PORTS["grafana"]),
            "GF_PATHS_PROVISIONING": str(ROOT / "monitoring" / "grafana" / "provisioning"),
            "GF_PATHS_DATA": str(RUN / "grafana-data"),
            "FRAUDOPS_DASHBOARDS_DIR": str(ROOT / "monitoring" / "grafana" / "dashboards"),
            "GF_ANALYTICS_REPORTING_ENABLED": "false",
        },
    )


def down() -> None:
    for pid_file in sorted(RUN.glob("*.pid")):
        stop_tracked(pid_file)


if __name__ == "__main__":
    {"up": up, "down": down}[sys.argv[1] if len(sys.argv) > 1 else "up"]()
