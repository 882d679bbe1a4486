"""Private Redis and Postgres servers for fault tests, and a small api + worker stack driven over HTTP.

Fault tests stop and restart their servers, so they never touch the shared ones other test runs use: each test
starts its own ``redis-server`` and its own Postgres cluster on free ports, and tears them down afterwards.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import httpx

from tests.factories import alpaca_records, write_jsonl
from tests.polling import wait_until
from tests.processes import ROOT, ServiceProcess, free_port, uvicorn_process, worker_process

TERMINAL = ("succeeded", "failed", "cancelled")


# ------------------------------------------------------------------------------------------------ Redis


class RedisServer:
    """A private ``redis-server`` on its own port. ``persistent`` keeps data across restarts (append-only file)."""

    def __init__(self, log_dir: Path, *, persistent: bool = False, port: int | None = None) -> None:
        self.port = port or free_port()
        self.log_dir = log_dir
        self.persistent = persistent
        self.data_dir = Path(tempfile.mkdtemp(prefix="conch-redis-"))
        self.process: ServiceProcess | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        argv = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--daemonize",
            "no",
            "--dir",
            str(self.data_dir),
        ]
        argv += ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        self.starts += 1
        self.process = ServiceProcess(f"redis-{self.starts}", argv, log_dir=self.log_dir).start()
        wait_until(self.ping, f"redis on port {self.port}", timeout=30, interval=0.3, logs=self.process.log)
        return self

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def dbsize(self) -> int:
        import redis

        return int(redis.Redis.from_url(self.url).dbsize())  # type: ignore[arg-type]

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------- Postgres


def _pg_bin(tool: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    if not found:
        raise RuntimeError(f"no {tool} under /usr/lib/postgresql")
    return found[-1]


class PostgresServer:
    """A private Postgres cluster (initdb in a temp dir, trust auth, unix socket inside the dir) on a free port.

    ``initdb`` refuses to run as root, so the cluster belongs to the ``postgres`` user when the tests run as root.
    """

    def __init__(self, log_dir: Path, *, database: str = "conch_faults") -> None:
        self.port = free_port()
        self.database = database
        self.root = Path(tempfile.mkdtemp(prefix="conch-pg-"))
        self.data_dir = self.root / "data"
        # The server's own log lives in its (postgres-owned) folder and is copied next to the test's logs on close.
        self.log_file = self.root / "postgres.log"
        self.log_copy = log_dir / "postgres.log"
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def _run(self, argv: list[str], timeout: float = 120) -> None:
        if self.as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/")
        if done.returncode != 0:
            raise RuntimeError(f"{argv} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    def _pg_ctl(self, action: str, *extra: str) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            [_pg_bin("pg_ctl"), "-D", str(self.data_dir), "-o", options, "-l", str(self.log_file), "-w", *extra, action]
        )

    def init(self) -> PostgresServer:
        self._run([_pg_bin("initdb"), "-D", str(self.data_dir), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
        self.start()
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.database}"')
        from alembic import command
        from alembic.config import Config

        config = Config(str(ROOT / "alembic.ini"))
        config.attributes["configure_logging"] = False
        config.attributes["url"] = self.url
        command.upgrade(config, "head")
        return self

    def start(self) -> None:
        self._pg_ctl("start")

    def stop(self) -> None:
        self._pg_ctl("stop", "-m", "fast")

    def close(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError):
                self._pg_ctl("stop", "-m", "immediate")
        if self.log_file.exists():
            self.log_copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.log_file, self.log_copy)
        shutil.rmtree(self.root, ignore_errors=True)

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.url, connect_timeout=5) as conn:
            return list(conn.execute(sql, params).fetchall())  # type: ignore[call-overload]


# ------------------------------------------------------------------------------------------ api + worker


class FaultStack:
    """An api and one Celery worker on the given database and Redis, driven over HTTP like a client would."""

    def __init__(
        self, log_dir: Path, *, database_url: str, redis_url: str, workers: int = 1, env: dict[str, str] | None = None
    ) -> None:
        self.env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "BROKER_URL": redis_url, **(env or {})}
        self.port = free_port()
        self.api = uvicorn_process("api", "api.app:create_app", self.port, log_dir, env=self.env)
        self.workers = [worker_process(f"worker{i}", log_dir, env=self.env) for i in range(1, workers + 1)]
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)

    def start_api(self) -> None:
        self.api.start()
        self.api.wait_http(f"http://127.0.0.1:{self.port}/healthz")

    def start_workers(self, *, wait_ready: bool = True) -> None:
        for worker in self.workers:
            worker.start()
        if wait_ready:
            for worker in self.workers:
                worker.wait_for_log("ready", timeout=120)

    def stop(self) -> None:
        self.client.close()
        for process in (self.api, *self.workers):
            process.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log()[-4000:]}" for p in (self.api, *self.workers))

    def upload(self, folder: Path, examples: int = 8) -> str:
        dataset = write_jsonl(folder / "train.jsonl", alpaca_records(examples))
        with dataset.open("rb") as handle:
            response = self.client.post(
                "/v1/files", files={"file": ("train.jsonl", handle)}, data={"purpose": "fine-tune"}
            )
        assert response.status_code in (200, 201), response.text
        return str(response.json()["id"])

    def submit(self, file_id: str, *, n_epochs: int = 1) -> dict[str, Any]:
        response = self.client.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": "tiny-llama",
                "training_file": file_id,
                "auto_deploy": False,
                "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": n_epochs}}},
            },
        )
        assert 200 <= response.status_code < 300, response.text
        return dict(response.json())

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.client.get(f"/v1/fine_tuning/jobs/{job_id}").json())

    def wait_status(self, job_id: str, statuses: tuple[str, ...], timeout: float = 300) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            try:
                job = self.job(job_id)
            except (httpx.HTTPError, ValueError):
                return None
            return job if job.get("status") in statuses else None

        return dict(
            wait_until(check, f"job {job_id} to reach {statuses}", timeout=timeout, interval=0.3, logs=self.logs)
        )

    def wait_all_finished(self, job_ids: list[str], timeout: float = 400) -> list[dict[str, Any]]:
        return [self.wait_status(job_id, TERMINAL, timeout) for job_id in job_ids]

    def claims(self) -> list[str]:
        """Job ids claimed for training, one entry per claim, from every worker's log."""
        claimed = []
        for worker in self.workers:
            for line in worker.log().splitlines():
                if '"job.claimed"' in line:
                    claimed.append(json.loads(line[line.index("{") :])["job_id"])
        return claimed

    def worker_log(self) -> str:
        return "\n".join(worker.log() for worker in self.workers)
