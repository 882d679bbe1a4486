"""Fixtures of the worker tests that start real Celery worker processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import ServiceProcess, worker_process
from tests.worker.helpers import StartWorker


@pytest.fixture
def start_worker(log_dir: Path) -> Iterator[StartWorker]:
    """``start_worker(name, env=None)``: a real worker process, returned once it is ready for jobs; every one
    started is killed when the test ends."""
    started: list[ServiceProcess] = []

    def start(name: str, env: dict[str, str] | None = None) -> ServiceProcess:
        process = worker_process(name, log_dir, env=env).start()
        started.append(process)
        process.wait_for_log("ready", timeout=120)
        return process

    yield start
    for process in started:
        process.kill()
