"""MLflow for a team: a PostgreSQL tracking and registry store behind `mlflow server`.

`make mlflow-server` initialises a PostgreSQL cluster under .run/postgres (once), starts
it on 127.0.0.1, and starts `mlflow server` in front of it with an artifact store
(.run/mlflow-artifacts, or any --artifacts-destination MLflow takes, such as s3://...).
Then `export MLFLOW_TRACKING_URI=http://127.0.0.1:5001` points the pipeline, the registry
and the package stage at it. `make down` stops both. The embedded default stays sqlite.

PostgreSQL refuses to run as root: as root, its commands run as the `postgres` user,
which then owns the cluster's folder. Its superuser password is generated at
initialisation and kept in .run/postgres/password (readable by the owner only).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg2

from stages.lib.environment import TELEMETRY_OFF
from stages.lib.servers import BIN, alive, free_port, start_server, stop_tracked

ROOT = Path(__file__).resolve().parents[1]

RUN = ROOT / ".run"
HOST = "127.0.0.1"
POSTGRES_PORT = 5433  # not 5432: a system PostgreSQL may hold it
MLFLOW_PORT = 5001  # not 5000: `make mlflow-ui` uses it
DATABASE = "mlflow"
OWNER = "postgres"  # the OS user PostgreSQL runs as when started by root
PG_BIN = Path(
    os.environ.get("PG_BIN")
    or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), "/usr/bin")
)


@dataclass(frozen=True)
class Postgres:
    """A PostgreSQL cluster in `folder` (data, socket, log and password inside it)."""

    folder: Path
    port: int = POSTGRES_PORT

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def password(self) -> str:
        return (self.folder / "password").read_text().strip()

    def uri(self, database: str = DATABASE) -> str:
        # psycopg2 explicitly: a plain postgresql:// now means psycopg 3 to SQLAlchemy.
        return f"postgresql+psycopg2://postgres:{self.password}@{HOST}:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        command = [str(PG_BIN / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", OWNER, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed:\n{done.stdout}{done.stderr}")

    def initialise(self) -> None:
        """Create the cluster once; password authentication on loopback only."""
        if (self.data / "PG_VERSION").exists():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        secret = self.folder / "password"
        secret.write_text(secrets.token_urlsafe(24))
        secret.chmod(0o600)
        if os.geteuid() == 0:
            owner = pwd.getpwnam(OWNER)
            for path in (self.folder, secret):
                os.chown(path, owner.pw_uid, owner.pw_gid)
            self.folder.chmod(0o700)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-E", "UTF8",
                  "--auth-local=scram-sha-256", "--auth-host=scram-sha-256",
                  f"--pwfile={secret}")  # fmt: skip

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses={HOST}"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "postgres.log"),
                  "-o", options, "-w", "-t", "60", "start")  # fmt: skip

    def ensure_database(self, database: str = DATABASE) -> None:
        connection = psycopg2.connect(self.uri("postgres").replace("+psycopg2", ""))
        try:
            connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
                if cursor.fetchone() is None:
                    cursor.execute(f'CREATE DATABASE "{database}"')
        finally:
            connection.close()

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def stop(self) -> None:
        if self.running():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")


@contextlib.contextmanager
def scratch_postgres(database: str, prefix: str = "fraudops-pg-") -> Iterator[str]:
    """A throwaway PostgreSQL server on a free loopback port with `database` in it (for
    tests and benchmarks): its URI while the block runs, then stopped and removed."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)  # PostgreSQL runs as `postgres` when the caller is root
    server = Postgres(base / "postgres", port=free_port())
    server.initialise()
    server.start()
    try:
        server.ensure_database(database)
        yield server.uri(database)
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def mlflow_command(backend_uri: str, artifacts: str, port: int) -> list[str]:
    return [str(BIN / "mlflow"), "server", "--backend-store-uri", backend_uri,
            "--artifacts-destination", artifacts, "--host", HOST, "--port", str(port),
            "--workers", "1"]  # fmt: skip


def start_mlflow(postgres: Postgres, artifacts: str, port: int, log: Path) -> subprocess.Popen:
    """`mlflow server` on the cluster; returned once it answers /health (~40 s)."""
    env = {**os.environ, **TELEMETRY_OFF}
    command = mlflow_command(postgres.uri(), artifacts, port)
    return start_server(command, env, log, f"http://{HOST}:{port}/health")


def up(artifacts: str) -> None:
    RUN.mkdir(exist_ok=True)
    postgres = Postgres(RUN / "postgres")
    postgres.initialise()
    if not postgres.running():
        postgres.start()
    postgres.ensure_database()
    pid_file = RUN / "mlflow.pid"  # `make down` stops every process with a pid file here
    if pid_file.exists() and alive(int(pid_file.read_text())):
        print(f"mlflow server: already running (pid {pid_file.read_text().strip()})")
    else:
        process = start_mlflow(postgres, artifacts, MLFLOW_PORT, RUN / "mlflow.log")
        pid_file.write_text(str(process.pid))
    print(f"PostgreSQL on {HOST}:{postgres.port}, data in {postgres.data}")
    print(f"MLflow server: http://{HOST}:{MLFLOW_PORT} (artifacts: {artifacts})")
    print(f"export MLFLOW_TRACKING_URI=http://{HOST}:{MLFLOW_PORT}")


def down() -> None:
    if (RUN / "mlflow.pid").exists():
        stop_tracked(RUN / "mlflow.pid")
    postgres = Postgres(RUN / "postgres")
    if postgres.running():
        postgres.stop()
        print("PostgreSQL: stopped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("up", "down"))
    parser.add_argument(
        "--artifacts-destination",
        default=str(RUN / "mlflow-artifacts"),
        help="where the server stores artifacts: a folder or s3://bucket/path",
    )
    args = parser.parse_args()
    if args.action == "up":
        if shutil.which("runuser") is None and os.geteuid() == 0:
            raise SystemExit("running as root needs `runuser` to start PostgreSQL as postgres")
        up(args.artifacts_destination)
    else:
        down()


if __name__ == "__main__":
    main()
