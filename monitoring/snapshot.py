"""Render the Grafana dashboard's panels to one PNG from Prometheus' HTTP API.

For users (and CI) without Grafana: the same queries as monitoring/grafana/dashboards/
fraudops.json, run as range queries, drawn with matplotlib under the panel titles.

    python monitoring/snapshot.py --prometheus http://127.0.0.1:9090 --minutes 15 --out snap.png
"""

from __future__ import annotations

import argparse
import json
import math
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import requests  # noqa: E402

DASHBOARD = Path(__file__).resolve().parent / "grafana" / "dashboards" / "fraudops.json"


def panel_queries(rate_window: str = "1m") -> list[dict]:
    """Each panel's title, kind and target expressions, with Grafana's variables filled."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = []
    for panel in sorted(dashboard["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
        targets = [
            {
                "expr": t["expr"].replace("$__rate_interval", rate_window),
                "legend": t.get("legendFormat", ""),
            }
            for t in panel["targets"]
        ]
        panels.append(
            {
                "title": panel["title"],
                "type": panel["type"],
                "targets": targets,
                "unit": panel.get("fieldConfig", {}).get("defaults", {}).get("unit", ""),
            }
        )
    return panels


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    response = requests.get(
        f"{prometheus}/api/v1/query_range",
        timeout=30,
        params={"query": expr, "start": start, "end": end, "step": step},
    )
    response.raise_for_status()
    return response.json()["data"]["result"]


def _legend(template: str, labels: dict[str, str]) -> str:
    out = template
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out or ",".join(f"{k}={v}" for k, v in labels.items() if k != "__name__")


def _draw_heatmap(ax, series: list[dict]) -> None:
    def bound(s):
        return math.inf if s["metric"]["le"] == "+Inf" else float(s["metric"]["le"])

    series = sorted(series, key=bound)
    times = [datetime.fromtimestamp(float(t)) for t, _ in series[0]["values"]]
    cumulative = np.array([[float(v) for _, v in s["values"]] for s in series])
    counts = np.diff(np.vstack([np.zeros(cumulative.shape[1]), cumulative]), axis=0)
    labels = [s["metric"]["le"] for s in series]
    ax.imshow(
        np.log1p(np.clip(counts, 0, None)),
        aspect="auto",
        origin="lower",
        cmap="Oranges",
        interpolation="nearest",
        extent=[mdates.date2num(times[0]), mdates.date2num(times[-1]), 0, len(labels)],
    )
    ax.set_yticks(np.arange(len(labels)) + 0.5, [f"<={label}" for label in labels], fontsize=6)
    ax.xaxis_date()


def _draw_target(ax: Any, panel: dict, target: dict, series: list[dict]) -> bool:
    """One query's series on a panel's axes, as the panel's type draws it; False when
    there was nothing to draw."""
    if not series:
        return False
    if panel["type"] == "heatmap":
        _draw_heatmap(ax, series)
        return True
    if panel["type"] == "table":
        labels = series[0]["metric"]
        text = "\n".join(
            f"{k}: {v}"
            for k, v in sorted(labels.items())
            if k not in ("__name__", "job", "instance", "pid")
        )
        ax.text(0.01, 0.95, text, va="top", family="monospace", fontsize=9, transform=ax.transAxes)
        ax.set_axis_off()
        return True
    drawn = False
    for s in series:
        times = [datetime.fromtimestamp(float(t)) for t, _ in s["values"]]
        values = np.array([float(v) for _, v in s["values"]])
        if np.isnan(values).all():  # e.g. a quantile over a window with no requests
            continue
        ax.plot(times, values, label=_legend(target["legend"], s["metric"]), lw=1.4)
        drawn = True
    return drawn


def _finish_axes(ax: Any, panel: dict, drawn: bool, start: float, end: float) -> None:
    if not drawn:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    elif panel["type"] == "timeseries":
        ax.legend(fontsize=7, loc="upper left")
        ax.set_ylabel(panel["unit"], fontsize=8)
    if panel["type"] != "table":
        ax.set_xlim(datetime.fromtimestamp(start), datetime.fromtimestamp(end))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def render(prometheus: str, minutes: float, out: Path) -> Path:
    end = time.time()
    start = end - minutes * 60
    step = max(1.0, minutes * 60 / 200)
    panels = panel_queries()
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(16, 3.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        ax.set_title(panel["title"], fontsize=11, loc="left")
        fetched = [
            (target, query_range(prometheus, target["expr"], start, end, step))
            for target in panel["targets"]
        ]
        drawn = any([_draw_target(ax, panel, target, series) for target, series in fetched])
        _finish_axes(ax, panel, drawn, start, end)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_axis_off()
    fig.suptitle(
        f"fraudops: fraud scoring service, last {minutes:g} min "
        f"(from {prometheus}, {datetime.now():%Y-%m-%d %H:%M:%S})",
        fontsize=13,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--minutes", type=float, default=15)
    parser.add_argument("--out", type=Path, default=Path("monitoring/snapshot.png"))
    args = parser.parse_args()
    print(render(args.prometheus, args.minutes, args.out))


if __name__ == "__main__":
    main()
