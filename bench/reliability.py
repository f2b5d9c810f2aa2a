"""Renders what `make test-reliability` measured (bench/results/reliability.json, written
by the reliability tests) as the table in docs/benchmarks/reliability.md."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "reliability.md"


def _statuses(counts: dict[str, int]) -> str:
    return ", ".join(f"{status}: {n}" for status, n in sorted(counts.items()))


def main() -> None:
    text = render(json.loads((RESULTS / "reliability.json").read_text()))
    DOC.write_text(text)
    print(text, end="")


def render(runs: dict) -> str:
    """docs/benchmarks/reliability.md from bench/results/reliability.json."""
    lines = ["<!-- Written by `make test-reliability` (bench/reliability.py); figures in "
             "bench/results/reliability.json. Rerun the suite instead of editing. -->",
             "# Reliability suite: latest full run", "",
             "What each check does: [reliability](../reliability.md#the-reliability-suite).",
             "", "Reliability suite at full size (`make test-reliability`), one run on 2 cores.",
             "",
             "| check | measured | goal |", "|---|---|---|"]  # fmt: skip
    fuzz = runs.get("test_schema_driven_fuzzing_finds_nothing")
    if fuzz:
        cases = sum(op["cases"] for op in fuzz.values())
        for name, op in fuzz.items():
            lines.append(f"| schemathesis `/{name}` | {op['cases']:,} cases; answers "
                         f"{_statuses(op['statuses'])} | 0 5xx, 0 schema violations |")  # fmt: skip
        worst = max(op["rc"] for op in fuzz.values())
        lines.append(f"| schemathesis, both routes | {cases:,} cases, exit code {worst} "
                     "| >= 2,000 cases, 0 failures |")  # fmt: skip
    slow = runs.get("test_slow_uploads_hold_no_scoring_slot")
    if slow:
        lines.append(f"| slow uploads | {slow['slow_clients']} slow clients vs "
                     f"{slow['slots_per_worker']} slots per worker: {slow['scored_meanwhile']} "
                     f"of {slow['scored_meanwhile']} scored meanwhile, {slow['answered_408']} "
                     "answered 408 | no lockout |")  # fmt: skip
    kill = runs.get("test_killed_worker_leaves_nothing_behind")
    if kill:
        lines.append(f"| kill -9 of a worker under load | readyz after {kill['readyz_seconds']} "
                     f"s; clients: {_statuses(kill['outcomes'])} | readyz < 10 s, an answer or "
                     "a clean connection error, no stuck gauges or temp files |")  # fmt: skip
    corrupt = runs.get("test_corrupt_model_fails_fast")
    if corrupt:
        lines.append(f"| truncated model.pkl | `bentoml serve` exits ({corrupt['exit_code']}) "
                     f"after {corrupt['seconds']} s with one line | fail fast |")  # fmt: skip
    soak = runs.get("test_soak_keeps_memory_and_counts")
    if soak:
        lines.append(f"| soak, {soak['seconds']:.0f} s of mixed traffic | {soak['requests']:,} "
                     f"requests, {soak['errors']} errors; RSS {soak['rss_warm_mb']} -> "
                     f"{soak['rss_end_mb']} MB ({soak['rss_growth']:+.1%}); rows scored "
                     f"{soak['rows_scored']:,} = counter {soak['counter_delta']:,.0f} | RSS "
                     "growth < 10%, counters exact |")  # fmt: skip
    lines += _hostile_rows(runs)
    return "\n".join(lines) + "\n"


# Round two's cases (tests/integration/test_hostile.py record a `case` and its figures).
HOSTILE_GOALS = {
    "test_errors_about_many_items_stay_small": "4xx, small body, bounded worker memory",
    "test_a_parquet_dictionary_bomb_is_refused_without_expanding": "413 before it expands",
    "test_idle_and_slow_sockets_cannot_starve_the_service": (
        "normal requests served; idle sockets closed at the header deadline"
    ),
    "test_memory_goes_back_after_a_burst": "idle <= 1.5x the ready size within 60 s",
}


def _hostile_rows(runs: dict) -> list[str]:
    rows = []
    for name, goal in HOSTILE_GOALS.items():
        figures = dict(runs.get(name) or {})
        if figures:
            case = figures.pop("case", name)
            measured = ", ".join(
                f"{key.replace('_', ' ')} {value}" for key, value in figures.items()
            )
            rows.append(f"| {case} | {measured} | {goal} |")
    return rows


if __name__ == "__main__":
    main()
