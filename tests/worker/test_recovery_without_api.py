"""A worker dies mid-job while no api process runs: the reconciler that every worker runs beside itself notices
the lease ran out (by the database's clock) and queues the job again, and it finishes. Real Celery worker, real
Postgres and Redis, real training on a tiny model; nothing here starts an api."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from core.contracts import JobStatus
from core.queue import enqueue_fine_tune
from core.settings import get_settings
from tests import polling
from tests.factories import alpaca_records, fresh, job_events, make_file, make_job, metrics_events
from tests.processes import ServiceProcess, worker_process

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("tiny_models")]

RUN = {"num_train_epochs": 2, "per_device_train_batch_size": 1, "save_steps": 10}


@pytest.fixture
def worker(log_dir: Path) -> Iterator[ServiceProcess]:
    process = worker_process("lone", log_dir).start()
    try:
        process.wait_for_log("ready", timeout=120)
        process.wait_for_log("reconciler.started", timeout=60)
        yield process
    finally:
        process.kill()  # the whole process group: the worker, its pool child and its reconciler


def test_a_job_whose_worker_process_died_is_recovered_with_no_api_running(db: Session, worker: ServiceProcess) -> None:
    job = make_job(db, make_file(db, alpaca_records(48)), hyperparameters=RUN)
    db.commit()
    enqueue_fine_tune(job.public_id, get_settings())
    polling.wait_until(lambda: len(metrics_events(db, job)) >= 3, "training to start", timeout=180, interval=0.2)

    # The training process (pid in its lease owner, host:pid:nonce) dies without a word; its lease stays behind.
    owner = fresh(db, job).lease_owner
    assert owner is not None
    os.kill(int(owner.split(":")[-2]), signal.SIGKILL)

    def recovered() -> bool:
        return any("stopped responding" in event.message for event in job_events(db, job))

    polling.wait_until(recovered, "the worker's reconciler to queue the job again", timeout=60, interval=0.2)
    polling.wait_until(
        lambda: fresh(db, job).status in (JobStatus.SUCCEEDED, JobStatus.FAILED),
        "the job to finish",
        timeout=300,
        interval=0.2,
    )
    row = fresh(db, job)
    assert row.status == JobStatus.SUCCEEDED, row.error
    assert row.attempts == 2
    assert "reconcile.swept" in worker.log()


def _reconciler_pids(parent: int) -> list[int]:
    """Processes whose parent is ``parent`` and that run ``worker.reconciler`` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"worker.reconciler" in cmdline:
            found.append(int(entry.name))
    return found


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def test_the_worker_s_reconciler_does_not_outlive_it(worker: ServiceProcess) -> None:
    (reconciler,) = _reconciler_pids(worker.pid)
    os.kill(worker.pid, signal.SIGKILL)  # the worker alone, not its process group
    polling.wait_until(lambda: _gone(reconciler), "the reconciler to end with its worker", timeout=15)
