"""Start a server process, wait until it answers, stop it: the one helper for the tests,
the benchmarks, `make up` (monitoring/stack.py) and `make mlflow-server`
(deploy/mlflow_server.py), for `bentoml serve`, Prometheus, Streamlit, Grafana and
`mlflow server` on loopback. PostgreSQL is started and stopped by its own pg_ctl."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from stages.lib.project import pipeline_path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def wait_until_ready(
    url: str, process: subprocess.Popen | None = None, timeout: float = 90.0
) -> None:
    """Return once `url` answers 200; raise if `process` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before {url} answered")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def spawn(
    args: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None
) -> subprocess.Popen:
    """Start `args` in its own process group (so stopping it stops its children too),
    its output in `log_path`."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            args, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def start_server(
    args: list[str], env: dict[str, str], log_path: Path, ready_url: str, timeout: float = 90.0
) -> subprocess.Popen:
    """spawn(), returned once `ready_url` answers 200 (or raise with the log's tail)."""
    process = spawn(args, env, log_path)
    try:
        wait_until_ready(ready_url, process, timeout)
    except Exception:
        stop(process)
        raise RuntimeError(f"{args[0]} failed; log:\n{log_path.read_text()[-3000:]}") from None
    return process


def stop_group(pid: int, grace: float = 20.0) -> bool:
    """TERM the process group led by `pid` (a server another process started, known by
    its pid file), KILL it after `grace` seconds; False when it was not running."""
    if not alive(pid):
        return False
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid):
        os.killpg(pid, signal.SIGKILL)
    return True


def stop(process: subprocess.Popen, grace: float = 20.0) -> None:
    """stop_group() for a server this process started (and so must reap)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def start_tracked(
    name: str, args: list[str], env: dict[str, str], run_dir: Path, cwd: Path | None = None
) -> int:
    """spawn() a long-lived server (`make up`, `make mlflow-server`) with its pid in
    run_dir/<name>.pid and its log in run_dir/<name>.log; one that is already running is
    left alone. Returns the pid."""
    pid_file = run_dir / f"{name}.pid"
    if pid_file.exists() and alive(int(pid_file.read_text())):
        print(f"{name}: already running (pid {pid_file.read_text().strip()})")
        return int(pid_file.read_text())
    process = spawn(args, env, run_dir / f"{name}.log", cwd)
    pid_file.write_text(str(process.pid))
    return process.pid


def stop_tracked(pid_file: Path) -> None:
    """Stop the process group whose leader's pid is in `pid_file`, and remove the file."""
    pid = int(pid_file.read_text())
    if stop_group(pid, grace=10.0):
        print(f"{pid_file.stem}: stopped (pid {pid})")
    pid_file.unlink()


def bento_dir(workspace: Path) -> Path:
    """The package stage's Bento folder in `workspace` (its path comes from dvc.yaml)."""
    return pipeline_path("bento", workspace)


def start_bento(
    bento: Path | str, env: dict[str, str], log_path: Path, host: str | None = "127.0.0.1"
) -> tuple[subprocess.Popen, str]:
    """`bentoml serve` a Bento folder (or tag) on a free port; return the process and base
    URL. With host None the address comes from env's BENTOML_HOST, as in a container."""
    port = free_port()
    args = [str(BIN / "bentoml"), "serve", str(bento), "--port", str(port)]
    if host is None:
        host = env["BENTOML_HOST"]
    else:
        args += ["--host", host]
    url = f"http://{host}:{port}"
    return start_server(args, env, log_path, f"{url}/readyz"), url
