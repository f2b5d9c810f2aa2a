"""Killing the pipeline kills its work: kill -9 of `dvc repro` mid-train leaves no stage
process, no output and no MLflow run RUNNING, and the next `dvc repro` just works.

Each kill happens in a copy of the session's shared build (`built_copy`) with a search
long enough to be caught mid-way, so only train (and what follows it) is stale. The next
`dvc repro train` runs the killed stage again, to the end, on a named family (no search,
so quickly); what follows train is no part of the kill.

Real DVC, MLflow and a real SIGKILL; the only processes signalled are the ones this test
started (the `dvc repro` and, if the stage outlived it, the stage in dvc's process group).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.lib.lifecycle import STOP_SIGNALS

from ..conftest import ROOT, ran_stages, run, set_params, stores_env

pytestmark = pytest.mark.integration

OUTPUTS = ("models/model.pkl", "models/oof.parquet", "metrics/search.json")


def stage_pids(ws: Path) -> list[int]:
    """Processes running a pipeline stage (`-m stages.<name>`) with `ws` as their cwd."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = (entry / "cwd").resolve()
        except OSError:  # ended meanwhile, or not ours
            continue
        if cwd == ws and any(arg.startswith(b"stages.") for arg in argv):
            found.append(int(entry.name))
    return found


def runs(env: dict[str, str], besides: frozenset[str] = frozenset()) -> list:
    """Every run of the checkout's own MLflow store (training runs and their trials), but
    those in `besides` (run ids)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("fraudops")
    found = [] if experiment is None else client.search_runs([experiment.experiment_id])
    return [r for r in found if r.info.run_id not in besides]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def wait_until_mid_search(
    ws: Path, env: dict[str, str], dvc: subprocess.Popen, log: Path, old: frozenset[str]
) -> None:
    """Until train runs and has logged a trial (a run not in `old`): its MLflow run
    exists, outputs do not."""

    def searching() -> bool:
        if dvc.poll() is not None:
            raise AssertionError(f"dvc repro ended first:\n{log.read_text()}")
        return bool(stage_pids(ws)) and any(
            r.data.tags.get("mlflow.parentRunId") for r in runs(env, old)
        )

    wait_for(searching, 600, "train's first trial")
    assert not [p for p in OUTPUTS if (ws / p).exists()], "train finished before the kill"


# DVC runs a command as `$SHELL -c cmd`: bash execs the stage's python (dvc is its parent),
# dash (/bin/sh, DVC's default without SHELL) forks and stays between dvc and python.
@pytest.mark.parametrize("shell", ["/bin/bash", "/bin/sh"])
def test_kill_9_of_dvc_repro_stops_the_stage(built_copy, tmp_path: Path, shell: str) -> None:
    ws, env = built_copy
    ws, env = ws.resolve(), {**env, "SHELL": shell}
    old = frozenset(r.info.run_id for r in runs(env))  # the build's own runs
    params = (ws / "params.yaml").read_text()
    # Long enough to kill mid-way: the search alone would take minutes.
    set_params(ws, train__search__trials=300, train__search__timeout_seconds=1200)
    log_path = tmp_path / "repro.log"
    log = log_path.open("w")
    # Its own session, so its process group holds dvc and the stage it starts, and only them.
    dvc = subprocess.Popen(
        ["dvc", "repro"], cwd=ws, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_until_mid_search(ws, env, dvc, log_path, old)
        dvc.send_signal(signal.SIGKILL)
        dvc.wait()
        killed = time.monotonic()
        wait_for(lambda: not stage_pids(ws), 5, "the stage to end after dvc was killed")
        # The stage watched dvc itself, not the shell that dash leaves between them.
        assert f"started this stage (pid {dvc.pid}) has ended" in log_path.read_text()
        time.sleep(max(0.0, killed + 10 - time.monotonic()))
        assert [p for p in OUTPUTS if (ws / p).exists()] == []
        assert sorted(p.name for p in (ws / "models").glob(".*tmp-*")) == []
        statuses = {r.info.run_name: r.info.status for r in runs(env, old)}
        assert statuses and "RUNNING" not in statuses.values(), statuses
        training = [r for r in runs(env, old) if not r.data.tags.get("mlflow.parentRunId")]
        assert [r.info.status for r in training] == ["KILLED"]
    finally:
        try:
            os.killpg(dvc.pid, signal.SIGKILL)  # whatever of ours outlived the test
        except ProcessLookupError:
            pass
        log.close()

    # DVC's repo lock is an flock (freed with the process) and its rwlock drops dead pids.
    (ws / "params.yaml").write_text(params)
    set_params(ws, train__model="logreg")  # a named family skips the search
    rerun = run(["dvc", "repro", "train"], ws, env)
    assert ran_stages(rerun.stdout) == ["train"], rerun.stdout
    assert all((ws / p).exists() for p in OUTPUTS)
    # train and what it reads are up to date (what reads train's new model is not)
    assert json.loads(run(["dvc", "status", "train", "--json"], ws, env).stdout) == {}


# A stage that has started its MLflow run and is inside a store write (sqlite's lock held,
# as when a signal lands while a trial is being logged), then waits.
MID_WRITE = """
import os, sqlite3, time
from stages.lib.project import setup_logging
from stages.lib.tracking import start_training_run
setup_logging()
run = start_training_run()
db = sqlite3.connect(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
db.execute("BEGIN IMMEDIATE")
print(run.info.run_id, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name
)
def test_signal_mid_store_write_ends_the_run_killed(tmp_path: Path, sig: signal.Signals) -> None:
    env = {**stores_env(tmp_path), "DVC_STAGE": "train"}
    # Each signal at its default disposition in the stage: a stage keeps an inherited
    # SIG_IGN on purpose (nohup), and a test run started in the background (`make test &`,
    # some CI runners) has SIGINT ignored.
    stage = subprocess.Popen(
        [sys.executable, "-c", MID_WRITE], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
        preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in STOP_SIGNALS],
    )  # fmt: skip
    try:
        run_id = stage.stdout.readline().strip()
        assert run_id, "the stage ended before starting its run"
        stage.send_signal(sig)
        # Not 1: faulthandler's deadline would mean the stop hung on the store's lock.
        assert stage.wait(timeout=5) == 128 + sig
    finally:
        stage.kill()
        stage.wait()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    wait_for(lambda: client.get_run(run_id).info.status == "KILLED", 30, "the run KILLED")
