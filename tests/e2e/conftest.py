"""The three real services as separate processes, on the test database, Redis and a real Celery worker."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.processes import ServiceProcess, free_port, uvicorn_process, worker_process


@dataclass
class Stack:
    api_url: str
    inference_url: str
    api: ServiceProcess
    worker: ServiceProcess
    inference: ServiceProcess

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log()[-3000:]}" for p in (self.api, self.worker, self.inference))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test shows the tail of every service's log, so a failure in CI can be read without a rerun."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    stack = getattr(item, "funcargs", {}).get("stack")
    if report.failed and isinstance(stack, Stack):
        report.sections.append(("service logs", stack.logs()))


@pytest.fixture
def stack(clean_db: None, tiny_models: dict[str, Path], log_dir: Path) -> Iterator[Stack]:
    api_port, inference_port = free_port(), free_port()
    api = uvicorn_process("api", "api.app:create_app", api_port, log_dir).start()
    worker = worker_process("worker", log_dir).start()
    inference = uvicorn_process("inference", "inference.app:create_app", inference_port, log_dir).start()
    stack = Stack(f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{inference_port}", api, worker, inference)
    try:
        api.wait_http(f"{stack.api_url}/healthz")
        inference.wait_http(f"{stack.inference_url}/healthz")
        worker.wait_for_log("ready", timeout=90)
        yield stack
    finally:
        for process in (api, worker, inference):
            process.stop()
