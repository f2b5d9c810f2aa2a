"""A stage lives only as long as the `dvc` that started it, and stops without leaving work.

DVC 3.67 runs a stage's `cmd` as `$SHELL -c cmd` (`/bin/sh` without SHELL) with
`subprocess.Popen` (no new session or process group, no parent-death signal), so nothing
tells the command when dvc dies: kill -9 of `dvc repro` (or `dvc queue kill --force`, which
SIGKILLs `dvc exp exec-run`) left the stage training on and writing outputs, and since DVC
also releases the repo lock while a command runs and drops rwlock entries of dead pids,
the next `dvc repro` started a second train beside it.

Here every stage, from `setup_logging()`, watches the process that ran its command (a
thread blocked on a pidfd of it) and sends itself SIGTERM when that process ends. Not
PR_SET_PDEATHSIG: it fires when the direct parent (thread) dies, and with SHELL unset or
/bin/sh the parent is a dash that outlives dvc. Not the process group: the command stays
in dvc's group, so Ctrl-C and `kill -- -PGID` already reach the stage, while a kill of
dvc's pid alone reaches nothing. SIGTERM, SIGHUP and SIGINT (`dvc queue kill`, a closed
terminal, Ctrl-C) then stop the stage the same way: temp files of unfinished atomic
writes are removed and the process leaves with os._exit, so nothing of the stage (no
rename, no `finally`, no atexit hook ending the MLflow run FINISHED) runs after the
signal; a helper it forks ends its active MLflow runs KILLED once it is gone.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("fraudops")

# Temp files of atomic writes not yet renamed into place (stages.lib.project.atomic_path).
PENDING: set[Path] = set()

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
# The stop itself only forks the MLflow helper and unlinks files; if even that hangs, the
# process still ends (faulthandler's C thread, which needs no GIL).
GRACE_SECONDS = 3.0
POLL_SECONDS = 0.5  # only where pidfds are missing (not Linux, or a kernel before 5.3)

_bound = False


def _read(pid: int, name: str) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:  # gone, not ours, or no /proc (macOS)
        return None


def _parent(pid: int) -> int:
    stat = _read(pid, "stat")
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    return int(stat.rpartition(b")")[2].split()[1]) if stat else 1


def pipeline_owner() -> int:
    """The pid of the process that ran this stage's command: `dvc` itself.

    Python's parent is not always it: bash execs the command's last program, but dash
    (/bin/sh on Debian) forks, and that shell outlives a killed dvc. DVC puts DVC_STAGE in
    the command's environment only, so the command's processes carry it and dvc does not.
    """
    mark = b"DVC_STAGE=" + os.environ["DVC_STAGE"].encode()
    pid = os.getppid()
    while pid > 1:
        environ = _read(pid, "environ")
        if environ is None or mark not in environ.split(b"\0"):
            return pid
        pid = _parent(pid)
    return pid


def _is_dvc(pid: int) -> bool:
    argv = (_read(pid, "cmdline") or b"").split(b"\0")[:3]
    return any(os.path.basename(arg) == b"dvc" for arg in argv)


def _wait_for_exit(pid: int) -> None:
    """Return once `pid` has ended (at once if it already has)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):
        while _alive(pid):
            time.sleep(POLL_SECONDS)
        return
    try:
        # The owner may have died, and its pid been reused, before pidfd_open.
        if pipeline_owner() == pid:
            select.select([fd], [], [])  # readable when the process exits
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return pipeline_owner() == pid


def _watch(owner: int) -> None:
    _wait_for_exit(owner)
    log.error("the dvc process that started this stage (pid %d) has ended", owner)
    os.kill(os.getpid(), signal.SIGTERM)


def _mark_runs_killed_after_exit() -> None:
    """Have a helper end this stage's active MLflow run, and those it nests in, KILLED.

    Not from the handler: the signal may have interrupted a store write, and sqlite keeps
    that transaction's lock until this process ends, so an update from here would wait on
    it (seen with Ctrl-C during a trial's logging). The helper writes once we are gone.
    """
    mlflow = sys.modules.get("mlflow")  # a stage that never imported it has no run
    run = mlflow.active_run() if mlflow is not None else None  # memory only, no store call
    if run is not None:
        subprocess.Popen(
            # -P: this file's directory (stages/lib) must not shadow installed modules.
            [sys.executable, "-P", __file__, str(os.getpid()), run.info.run_id],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # out of reach of a group kill aimed at the pipeline
        )


def mark_killed(stage_pid: int, run_id: str, timeout: float = 60.0) -> None:
    """In the helper, a child of the stopped stage: once the stage has ended, end `run_id`
    and its parent runs KILLED (only those still RUNNING)."""
    from mlflow.tracking import MlflowClient

    while os.getppid() == stage_pid:  # reparented when the stage exits
        time.sleep(0.05)
    client, deadline = MlflowClient(), time.monotonic() + timeout
    while run_id:
        try:
            run = client.get_run(run_id)
            _kill_running_children(client, run)
            if run.info.status == "RUNNING":
                client.set_terminated(run_id, "KILLED")
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)  # the store is busy (another writer holds sqlite's lock)
            continue
        run_id = run.data.tags.get("mlflow.parentRunId")


def _kill_running_children(client: Any, run: Any) -> None:
    """End KILLED the nested runs of `run` still RUNNING. mlflow.active_run() names the
    run on the stack, but a signal between a nested run's creation in the store and its
    push on the stack (a search trial starting) left that trial RUNNING for good."""
    found = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}' "
        "and attributes.status = 'RUNNING'",
    )
    for child in found:
        client.set_terminated(child.info.run_id, "KILLED")


def _stop(signum: int, _frame: object) -> None:
    for sig in STOP_SIGNALS:  # a second signal must not re-enter the cleanup
        signal.signal(sig, signal.SIG_IGN)
    faulthandler.dump_traceback_later(GRACE_SECONDS, exit=True)
    # Nothing here may raise: an exception would return to the interrupted stage code.
    with contextlib.suppress(Exception):
        _mark_runs_killed_after_exit()
    for tmp in list(PENDING):
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    with contextlib.suppress(Exception):  # the signal may have interrupted a log write
        log.error(
            "stage %s stopped by %s: no outputs written",
            os.environ.get("DVC_STAGE", "?"),
            signal.Signals(signum).name,
        )
        logging.shutdown()
    os._exit(128 + signum)


def bind_to_pipeline() -> None:
    """Under DVC (DVC_STAGE set), stop this process when its dvc ends or it is signalled.

    Outside DVC (tests calling a stage's main, batch scoring) this does nothing.
    """
    global _bound
    if _bound or "DVC_STAGE" not in os.environ:
        return
    _bound = True
    for sig in STOP_SIGNALS:
        # An inherited SIG_IGN stays: `nohup dvc repro` must survive the hang-up, and a
        # background `dvc repro &` Ctrl-C. SIGTERM is the watcher's, so it is always ours.
        if sig == signal.SIGTERM or signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _stop)
    owner = pipeline_owner()
    if owner == 1 and not _is_dvc(owner):
        # Reparented to init: dvc died while this process was starting.
        _stop(signal.SIGTERM, None)
    threading.Thread(target=_watch, args=(owner,), name="pipeline-watch", daemon=True).start()


if __name__ == "__main__":  # the helper of _mark_runs_killed_after_exit
    mark_killed(int(sys.argv[1]), sys.argv[2])
