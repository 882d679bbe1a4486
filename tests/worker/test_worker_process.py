"""Real Celery worker processes on the real broker and database: duplicate deliveries, SIGKILL, SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from typing import TypeVar

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.contracts import JobStatus
from core.orm import Checkpoint, FineTuningJob, ModelRecord, utcnow
from core.queue import enqueue_fine_tune
from core.reconcile import reconcile_once
from core.settings import get_settings
from tests import polling
from tests.factories import alpaca_records, fresh, job_events, make_file, make_job, metrics_events
from tests.processes import ROOT
from tests.worker.helpers import StartWorker

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("tiny_models")]
T = TypeVar("T")

# Long enough on a tiny model to be interrupted: 48 examples, one per step, 4 epochs.
RUN = {"num_train_epochs": 4, "per_device_train_batch_size": 1, "save_steps": 10}
TOTAL_STEPS = 4 * 48


def wait_until(predicate: Callable[[], T | None], what: str, timeout: float = 180) -> T:
    """A worker's job takes minutes on a busy machine: a longer default than other tests wait."""
    return polling.wait_until(predicate, what, timeout=timeout, interval=0.1)


def status_is(db: Session, job: FineTuningJob, *statuses: str) -> Callable[[], bool]:
    return lambda: fresh(db, job).status in statuses


def long_job(db: Session) -> FineTuningJob:
    job = make_job(db, make_file(db, alpaca_records(48)), hyperparameters=RUN)
    db.commit()
    return job


def checkpoint_steps(db: Session, job: FineTuningJob) -> list[int]:
    db.expire_all()
    return list(db.scalars(select(Checkpoint.step).where(Checkpoint.job_id == job.id).order_by(Checkpoint.step)))


def test_worker_modules_do_not_import_torch() -> None:
    code = "import sys, worker.app, worker.tasks, worker.runner; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_copy_delivered_while_the_job_runs_does_not_train_it_again(db: Session, start_worker: StartWorker) -> None:
    first, second = start_worker("first"), start_worker("second")
    job = long_job(db)
    enqueue_fine_tune(job.public_id, get_settings())
    wait_until(lambda: len(metrics_events(db, job)) >= 3, "training to start")
    enqueue_fine_tune(job.public_id, get_settings())  # the copy goes to the idle worker, whose claim is refused
    wait_until(lambda: "job.claim_refused" in first.log() + second.log(), "the copy to be refused")
    assert fresh(db, job).status == JobStatus.RUNNING
    wait_until(status_is(db, job, JobStatus.SUCCEEDED, JobStatus.FAILED), "the job to finish")

    row = fresh(db, job)
    assert row.status == JobStatus.SUCCEEDED and row.attempts == 1
    assert [m["step"] for m in metrics_events(db, job)] == list(range(1, TOTAL_STEPS + 1))
    messages = [e.message for e in job_events(db, job)]
    assert messages.count("Training started") == 1 and sum(m.startswith("Job started") for m in messages) == 1
    assert len(db.scalars(select(ModelRecord)).all()) == 1


def test_a_killed_worker_s_job_resumes_from_its_checkpoint_on_another_worker(
    db: Session, start_worker: StartWorker
) -> None:
    doomed = start_worker("doomed")
    job = long_job(db)
    enqueue_fine_tune(job.public_id, get_settings())
    wait_until(lambda: checkpoint_steps(db, job), "a checkpoint")
    doomed.signal(signal.SIGKILL)
    doomed.kill()
    killed_at = checkpoint_steps(db, job)[-1]
    assert fresh(db, job).status == JobStatus.RUNNING

    # The lease runs out, the reconciler queues the job again, and a new worker picks it up.
    row = fresh(db, job)
    assert row.lease_expires_at is not None
    wait_until(lambda: fresh(db, job).lease_expires_at < utcnow(), "the lease to expire", timeout=30)  # type: ignore[operator]
    assert reconcile_once(get_settings())["recovered"] == 1
    start_worker("rescuer")
    wait_until(status_is(db, job, JobStatus.SUCCEEDED, JobStatus.FAILED), "the job to finish")

    row = fresh(db, job)
    assert row.status == JobStatus.SUCCEEDED and row.attempts == 2
    assert row.metrics is not None and row.metrics["steps"] == TOTAL_STEPS
    resumed = [e for e in job_events(db, job) if e.message.startswith("Resuming from the checkpoint")]
    assert len(resumed) == 1 and resumed[0].data is not None
    resumed_step = resumed[0].data["step"]
    assert resumed_step >= killed_at
    steps = [m["step"] for m in metrics_events(db, job)]
    assert steps[-(TOTAL_STEPS - resumed_step) :] == list(range(resumed_step + 1, TOTAL_STEPS + 1))
    assert [e.message for e in job_events(db, job)].count(
        f"The job has successfully completed: {row.fine_tuned_model}"
    ) == 1
    assert len(db.scalars(select(ModelRecord)).all()) == 1


def test_sigterm_checkpoints_and_requeues_the_job_without_spending_an_attempt(
    db: Session, start_worker: StartWorker
) -> None:
    stopping = start_worker("stopping")
    job = long_job(db)
    enqueue_fine_tune(job.public_id, get_settings())
    wait_until(lambda: len(metrics_events(db, job)) >= 3, "training to start")
    stopping.signal(signal.SIGTERM)  # to the process group, as a service manager does
    assert stopping.proc is not None
    assert stopping.proc.wait(60) == 0  # the worker finished its task and exited cleanly

    row = fresh(db, job)
    assert row.status == JobStatus.QUEUED and row.attempts == 0 and row.lease_owner is None
    saved = checkpoint_steps(db, job)
    assert saved, "no checkpoint was written on the way out"
    assert any(e.message.startswith("The worker is shutting down") for e in job_events(db, job))

    start_worker("successor")  # the job was enqueued again: no reconciler needed
    wait_until(status_is(db, job, JobStatus.SUCCEEDED, JobStatus.FAILED), "the job to finish")
    row = fresh(db, job)
    assert row.status == JobStatus.SUCCEEDED and row.attempts == 1
    assert row.metrics is not None and row.metrics["steps"] == TOTAL_STEPS
    resumed = [e for e in job_events(db, job) if e.message.startswith("Resuming from the checkpoint")]
    assert resumed and resumed[0].data is not None and resumed[0].data["step"] == saved[-1]
