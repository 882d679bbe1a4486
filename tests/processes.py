"""Real service processes for integration tests: api, inference (uvicorn) and Celery workers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from cli.stack import worker_command

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServiceProcess:
    """A child process in its own process group, logging to a file, stopped (or killed) as a group."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str] | None = None, log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = {**os.environ, **(env or {})}
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        with self.log_path.open("ab") as log:  # the child writes to its own copy of the descriptor
            self.proc = subprocess.Popen(
                self.argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, needle: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log():
                return
            if not self.alive():
                raise RuntimeError(f"{self.name} exited early:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} did not print {needle!r} in {timeout}s:\n{self.log()[-4000:]}")

    def wait_http(self, url: str, timeout: float = 60.0, status: int = 200) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited early:\n{self.log()[-4000:]}")
            try:
                if httpx.get(url, timeout=2).status_code == status:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not answering {url} in {timeout}s:\n{self.log()[-4000:]}")

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.pid, sig)

    def stop(self, timeout: float = 30.0) -> None:
        if not self.alive():
            return
        self.signal(signal.SIGTERM)
        try:
            assert self.proc is not None
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(10)


def worker_process(
    name: str, log_dir: Path, *, queue: str | None = None, env: dict[str, str] | None = None
) -> ServiceProcess:
    merged = {**os.environ, **(env or {})}
    argv = worker_command(queue or merged.get("TRAINING_QUEUE", "training"), name)
    return ServiceProcess(name, argv, env=env, log_dir=log_dir)


def uvicorn_process(
    name: str, factory: str, port: int, log_dir: Path, *, env: dict[str, str] | None = None
) -> ServiceProcess:
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        factory,
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    return ServiceProcess(name, argv, env=env, log_dir=log_dir)
