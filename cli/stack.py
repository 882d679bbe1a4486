"""Run the whole stack on one machine as child processes: api, worker, inference and optionally Flower.

Every child gets its own process group so a stop reaches its children too (Celery's pool, uvicorn's workers).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    health_url: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    restarts: list[float] = field(default_factory=list, repr=False)  # monotonic times of recent restarts

    def start(self, env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:  # the child writes to its own copy of the descriptor
            self.proc = subprocess.Popen(
                self.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_description(self) -> str:
        code = self.proc.returncode if self.proc is not None else None
        if code is None:
            return "running"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit status {code}"

    def stop(self, timeout: float = 20.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def python_module(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def worker_command(queue: str, name: str = "worker") -> list[str]:
    """A Celery worker as Conch runs one: one task at a time, a fresh child per task (so a GPU's memory is returned),
    task events on for Flower."""
    return python_module(
        "celery",
        "-A",
        "worker.app:celery_app",
        "worker",
        "-Q",
        queue,
        "-c",
        "1",
        "--pool",
        "prefork",
        "--max-tasks-per-child",
        "1",
        "-E",
        "-n",
        f"{name}@%h",
        "--loglevel",
        "INFO",
        "--without-mingle",
        "--without-gossip",
    )


def build_children(
    log_dir: Path,
    *,
    api_port: int,
    inference_port: int,
    flower: bool,
    flower_port: int = 5555,
    queue: str = "training",
    flower_basic_auth: str | None = None,
) -> list[Child]:
    children = [
        Child(
            "api",
            python_module(
                "uvicorn",
                "api.app:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(api_port),
                "--log-level",
                "warning",
            ),
            log_dir / "api.log",
            f"http://127.0.0.1:{api_port}/healthz",
        ),
        Child(
            "worker",
            worker_command(queue),
            log_dir / "worker.log",
        ),
        Child(
            "inference",
            python_module(
                "uvicorn",
                "inference.app:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(inference_port),
                "--log-level",
                "warning",
            ),
            log_dir / "inference.log",
            f"http://127.0.0.1:{inference_port}/healthz",
        ),
    ]
    if flower:
        if not flower_basic_auth:
            raise ValueError("Flower needs FLOWER_BASIC_AUTH=user:password")
        children.append(
            Child(
                "flower",
                python_module(
                    "celery",
                    "-A",
                    "worker.app:celery_app",
                    "flower",
                    f"--port={flower_port}",
                    "--address=127.0.0.1",
                    # Flower shows task arguments and can control workers: never without authentication. It reads
                    # FLOWER_BASIC_AUTH from the environment itself, so the password is not on a command line that
                    # every user of the host can read in the process list.
                ),
                log_dir / "flower.log",
            )
        )
    return children


class Stack:
    def __init__(self, children: list[Child], env: dict[str, str]) -> None:
        self.children = children
        self.env = env

    def start(self, timeout: float = 120.0) -> None:
        for child in self.children:
            child.start(self.env)
        deadline = time.monotonic() + timeout
        for child in self.children:
            while child.health_url:
                if not child.alive():
                    raise RuntimeError(f"{child.name} exited; see {child.log_path}")
                try:
                    if httpx.get(child.health_url, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{child.name} did not become healthy; see {child.log_path}")
                time.sleep(0.25)

    def dead(self) -> list[str]:
        return [c.name for c in self.children if not c.alive()]

    def restart_dead(self, *, window: float = 300.0, limit: int = 5) -> tuple[list[str], list[str]]:
        """Start again every child that exited (a crash in native code takes its whole process down); a child
        that needed more than ``limit`` restarts within ``window`` seconds is left down. Returns the restarted
        children's descriptions and those given up on."""
        restarted: list[str] = []
        given_up: list[str] = []
        now = time.monotonic()
        for child in self.children:
            if child.alive():
                continue
            child.restarts = [t for t in child.restarts if now - t < window]
            description = f"{child.name} ({child.exit_description()}, log {child.log_path})"
            if len(child.restarts) >= limit:
                given_up.append(description)
                continue
            child.restarts.append(now)
            child.start(self.env)
            restarted.append(description)
        return restarted, given_up

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
