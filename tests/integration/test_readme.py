"""Every ```bash block of README.md (and docs/**/*.md) runs as a new user would paste it.

Each block runs as written in `bash -e`, in a clean environment: HOME a fresh folder, PATH
/usr/bin:/bin (no activated venv, no .venv/bin), no MLflow or BentoML variables (so the
project's own stores inside the checkout), only the telemetry switches the project sets
itself. The cwd is one small built checkout of the project: a copy of the session's
shared build (tests/conftest.py's 30k-row config) laid out as a new user's own build is,
its MLflow store and BentoML home inside the checkout where the project puts them by
default, then `.venv/bin/dvc repro` in that same environment, which must find them there
(the champion check reads the registry: nothing reruns); its `.venv` links to this one's.
(A build of its own would prove no more: the stages run in that shell in the Sweeps
block's experiments.) The blocks run in document order in that checkout, each once, one
test each, so later blocks see what earlier ones made, as a user's would: a block's test
first runs every earlier block not yet run, so the tests pass in any order.

The documents are tests/readme_blocks.py's: the README, then docs/ and its subfolders in
path order (docs/benchmarks/ holds the benchmarks' generated tables and no shell blocks).

- A block that names the service's address `127.0.0.1:3000` runs against the checkout's
  `make serve` on a free port: the test starts `make serve HOST=127.0.0.1 PORT=<free>` and
  rewrites only the `127.0.0.1:3000` authority in the block to `127.0.0.1:<free>`.
- A block marked `<!-- readme-test: scratch — <reason> -->` right above it changes
  committed files on purpose (a team's DVC remote): it runs in a git clone of the checkout.
- A block marked `<!-- readme-test: skip — <reason> -->` cannot run here: its test is
  reported as skipped with the reason, and a skip without a reason fails.

After the last block, `git status --porcelain` of the checkout must be empty: everything
the commands wrote is ignored by git. New blocks in either document are picked up as they
are (tests/readme_blocks.py finds them; tests/unit/test_readme_markers.py checks the
markers); CHECKS adds assertions on what a block made, keyed by a command in it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pytest

from stages.lib.environment import TELEMETRY_OFF

from ..conftest import (
    GIT_ID,
    copy_workspace,
    free_port,
    link_venv,
    run,
    start_server,
    stop,
)
from ..readme_blocks import Block, all_blocks, documents

pytestmark = pytest.mark.integration

SERVICE = "127.0.0.1:3000"  # the docs' address of `make serve`


def user_env(home: Path) -> dict[str, str]:
    """A new user's shell: no venv, no project variables, telemetry off as the project sets
    it itself (tests never phone home)."""
    return {
        "HOME": str(home),
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "TMPDIR": os.environ.get("TMPDIR", "/tmp"),
        **TELEMETRY_OFF,
    }


@pytest.fixture(scope="module")
def project(built, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A small built checkout with its stores inside it, up to date for `.venv/bin/dvc
    repro` in a new user's shell."""
    base = tmp_path_factory.mktemp("readme")
    ws, _ = copy_workspace(built[0].parent, base)
    for store in ("mlflow.db", "bentoml_home"):  # where a new user's build puts them
        (base / store).rename(ws / store)
    link_venv(ws)
    home = base / "home"
    home.mkdir()
    (home / ".gitconfig").write_text("[user]\n\tname = new user\n\temail = user@localhost\n")
    env = user_env(home)
    result = run([".venv/bin/dvc", "repro"], ws, env)
    assert "fraud-detector@champion is still v1" in result.stdout + result.stderr, result.stdout
    assert "Stage 'package' didn't change" in result.stdout, result.stdout
    # The small config's dvc.lock and metrics, committed as the project's are: a fresh
    # clone's build leaves git clean (tests/test_sharing.py), so must this one.
    run(["git", *GIT_ID, "commit", "-qam", "built"], ws, env)
    assert not git_status(ws), "the build left files that git sees"
    return ws, env


def git_status(ws: Path) -> str:
    return subprocess.run(
        ["git", "status", "--porcelain"], cwd=ws, capture_output=True, text=True, check=True
    ).stdout


def run_block(block: Block, cwd: Path, env: dict[str, str], text: str | None = None) -> str:
    result = subprocess.run(
        ["bash", "-e", "-c", text or block.text],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (
        f"{block.id} ({block.heading}) exited {result.returncode}:\n{block.text}\n"
        f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    )
    return result.stdout


def serving(ws: Path, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    """`make serve` of the checkout on a free loopback port; returns the process and its
    host:port."""
    address = f"127.0.0.1:{free_port()}"
    host, port = address.split(":")
    args = ["make", "-s", "-C", str(ws), "serve", f"HOST={host}", f"PORT={port}"]
    return start_server(args, env, log, f"http://{address}/readyz"), address


def test_score_missing_input_one_line(project, tmp_path: Path) -> None:
    """An input that matches no file stops `make score` (and the job) in one line with exit
    code 2, before Spark starts (on main: PATH_NOT_FOUND in a Java and a Python traceback)."""
    ws, env = project
    job = [".venv/bin/python", "-m", "batch.score"]
    out = tmp_path / "scored"  # not the checkout's scored/, which the README's blocks fill
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in (
        ["make", "-s", "score", "INPUT=data/nowhere/*.csv", f"OUT={out}"],
        [*job, "data/nowhere.parquet", "--out", str(out)],
        [*job, str(empty), "--out", str(out), "--format", "csv"],  # an empty folder
    ):
        result = run(args, ws, env, check=False, timeout=300)
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if not line.startswith("make: ***")]
        assert len(lines) == 1 and lines[0].startswith("score: "), result.stderr
        assert not out.exists()


BLOCKS = all_blocks()


class Blocks:
    """The blocks run in document order in one checkout, each once: asking for a block's
    outcome first runs every earlier block not yet run (the tests come in any order)."""

    def __init__(self, ws: Path, env: dict[str, str], scratch: pytest.TempPathFactory) -> None:
        self.ws, self.env, self.scratch = ws, env, scratch
        self.outcomes: dict[str, BaseException | None] = {}  # block id -> its failure

    def outcome(self, block: Block) -> BaseException | None:
        for earlier in BLOCKS[: BLOCKS.index(block) + 1]:
            if earlier.mode != "skip" and earlier.id not in self.outcomes:
                try:
                    self._run(earlier, self.scratch.mktemp("block"))
                    self.outcomes[earlier.id] = None
                except Exception as failure:  # the block's own test reports it
                    self.outcomes[earlier.id] = failure
        return self.outcomes.get(block.id)

    def run_all(self) -> None:
        if BLOCKS:
            self.outcome(BLOCKS[-1])

    def _run(self, block: Block, tmp_path: Path) -> None:
        cwd, env = self.ws, self.env
        if block.mode == "scratch":  # a copy, so the checkout's committed files stay
            cwd = tmp_path / "scratch"
            run(["git", "clone", "-q", str(self.ws), str(cwd)], tmp_path, env)
            link_venv(cwd)
        if SERVICE not in block.text:
            output = run_block(block, cwd, env)
        else:
            process, address = serving(cwd, env, tmp_path / "serve.log")
            try:
                output = run_block(block, cwd, env, block.text.replace(SERVICE, address))
            finally:
                stop(process)
        for command, check in CHECKS.items():
            if command in block.text:
                check(block, cwd, env, output)


@pytest.fixture(scope="module")
def blocks(project, tmp_path_factory: pytest.TempPathFactory) -> Blocks:
    ws, env = project
    return Blocks(ws, env, tmp_path_factory)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.id)
def test_block_runs_verbatim(block: Block, blocks: Blocks) -> None:
    """One shell block, pasted as it is, after the blocks above it (see the module
    docstring for service and scratch blocks)."""
    if block.mode == "skip":
        pytest.skip(f"{block.heading}: {block.reason}")
    failure = blocks.outcome(block)
    if failure is not None:
        raise failure


def test_checkout_stays_clean(project, blocks: Blocks) -> None:
    """What the README's commands wrote (stores, scored files, inputs) is git-ignored:
    checked once every block has run."""
    ws, _ = project
    blocks.run_all()
    assert git_status(ws) == ""


def test_serve_commands_in_prose(project, tmp_path: Path) -> None:
    """What the docs say `make serve` runs (docs/serving.md), and every other inline
    `.venv/bin/bentoml serve` command of the README and docs, serves the Bento from the
    project root (on main: `bentoml serve models/bento`, which fails with 'Failed to import
    module')."""
    ws, env = project
    text = " ".join(" ".join(doc.read_text().split()) for doc in documents())  # spans wrap
    said = re.findall(r"`make serve` runs `([^`]+)`", text)
    assert said, "the docs lost the sentence naming what `make serve` runs"
    commands = {*said, *re.findall(r"`(\.venv/bin/bentoml serve [^`]+)`", text)}
    for command in sorted(commands):
        port = free_port()
        process = start_server(
            ["bash", "-c", f"cd {ws} && exec {command} --port {port}"],
            env,
            tmp_path / "serve.log",
            f"http://127.0.0.1:{port}/readyz",
        )
        stop(process)


# What a block made, checked after it ran (keyed by a command in it): exit code 0 alone
# would pass a curl that got a 500 back or an experiment that trained the wrong family.
Check = Callable[[Block, Path, dict[str, str], str], None]
TERMINAL_COLUMNS = 200


def check_sweep(block: Block, ws: Path, env: dict[str, str], output: str) -> None:
    """Each experiment trained the family it asked for, its model file stays in the
    project's mlruns/, and the block's `dvc exp show` fits a terminal."""
    shown = json.loads(run([".venv/bin/dvc", "exp", "show", "--json"], ws, env).stdout)
    models = {}
    for entry in shown:
        for exp in entry.get("experiments") or []:
            rev = exp["revs"][0]
            models[rev["name"]] = rev["data"]["params"]["params.yaml"]["data"]["train"]["model"]
    models = {name: models[name] for name in ("lr", "et", "hgb-slow") if name in models}
    assert models == {"lr": "logreg", "et": "extra_trees", "hgb-slow": "hgb"}, shown
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("fraudops").experiment_id
    for name, family in models.items():
        runs = mlflow.search_runs([experiment], filter_string=f"tags.dvc_exp_name = '{name}'")
        assert len(runs) == 1 and runs.iloc[0]["params.train.model"] == family
        logged = mlflow.search_logged_models(
            experiment_ids=[experiment],
            filter_string=f"tags.model_md5 = '{runs.iloc[0]['tags.model_md5']}'",
            output_format="list",
        )
        stored = Path(urlparse(logged[0].artifact_location).path) / "model.pkl"
        assert stored.is_file() and (ws / "mlruns") in stored.parents
    show = next(line for line in block.text.splitlines() if line.startswith("dvc exp show"))
    table = run_block(block, ws, {**env, "PATH": f"{ws / '.venv/bin'}:{env['PATH']}"}, show)
    assert all(name in table for name in models), table
    width = max(len(line) for line in table.splitlines())
    assert width <= TERMINAL_COLUMNS, f"`{show}` prints {width} columns:\n{table}"


def check_remote(block: Block, ws: Path, env: dict[str, str], output: str) -> None:
    """`make push` filled the default remote beside the project."""
    remote = ws.parent / "fraudops-dvc-remote"
    assert remote.is_dir() and any(remote.rglob("*")), "make push stored nothing"


def check_service(block: Block, ws: Path, env: dict[str, str], output: str) -> None:
    """The curl examples got scores, and the files they saved are the scored inputs."""
    assert '"predictions"' in output and "fraud_rows_scored_total" in output, output[:2000]
    saved = re.findall(r"-o (\S+)", block.text)
    assert saved, "the curl block saves no file"
    for name in saved:
        path = ws / name
        frame = pd.read_parquet(path) if name.endswith(".parquet") else pd.read_csv(path)
        assert {"fraud_probability", "is_fraud", "risk_band"} <= set(frame.columns), name
        if "reasons" in name:  # each row's 3 reason codes, as text
            assert frame["reasons"].str.count(";").eq(2).all(), name


def check_loop(block: Block, ws: Path, env: dict[str, str], output: str) -> None:
    """The sample's labels were stored, exported and committed with the `outcomes`
    experiment, which judged its candidate on them (the window holds every sample row)."""
    # curl prints the answer without a newline: the next command's output follows it
    stored = json.loads(re.search(r'\{[^{}]*"stored"[^{}]*\}', output).group())
    sample = pd.read_csv(ws / "ui/sample_transactions.csv")
    assert stored["stored"] + stored["unchanged"] == len(sample), stored
    exported = pd.read_parquet(ws / "data/raw/feedback/labelled.parquet")
    assert len(exported) >= len(sample) and int(exported["Class"].sum()) >= sample["Class"].sum()
    evaluated = json.loads((ws / "metrics/evaluate.json").read_text())  # committed by the block
    recent = evaluated["recent"]
    assert recent["rows"] == len(exported) and recent["frauds"] == exported["Class"].sum()
    added = json.loads((ws / "metrics/prepare.json").read_text())  # all in the window: none trains
    assert (added["feedback_rows"], added["recent_rows"]) == (0, len(exported))
    listed = run([".venv/bin/dvc", "exp", "list", "--all-commits", "--name-only"], ws, env)
    assert "outcomes" in listed.stdout.split(), listed.stdout
    assert not git_status(ws), "the loop left files that git sees"
    assert 0 < recent["average_precision"] <= 1


def check_score(block: Block, ws: Path, env: dict[str, str], output: str) -> None:
    """Both jobs wrote their partitions; the last one's summary counts every row."""
    out = ws / "scored"
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows"] == summary["scored"] + sum(summary["rejected"].values()) > 0
    batches = {path.name for path in (out / "scored").glob("batch=*")}
    assert len(batches) >= 2, batches


CHECKS: dict[str, Check] = {
    "-n hgb-slow": check_sweep,
    "make push": check_remote,
    "/predict -H": check_service,
    "make export-labels": check_loop,
    "make score": check_score,
}
