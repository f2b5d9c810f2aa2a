"""Start a server process, wait until it answers, stop it: one helper for the tests, the
benchmarks and anything else that runs `bentoml serve` and friends on loopback."""

from __future__ import annotations

import os
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


def wait_until_ready(url: str, process: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before {url} answered")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def start_server(
    args: list[str], env: dict[str, str], log_path: Path, ready_url: str
) -> subprocess.Popen:
    """Start a server in its own process group, logging to `log_path`; return it once
    `ready_url` answers 200 (or raise with the log's tail)."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until_ready(ready_url, process)
    except Exception:
        stop(process)
        raise RuntimeError(f"{args[0]} failed; log:\n{log_path.read_text()[-3000:]}") from None
    return process


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


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
