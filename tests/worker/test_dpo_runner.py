"""DPO jobs in the worker against the real database: cancel stops training between steps and publishes nothing;
a worker shut down mid-run checkpoints, and the next worker resumes from that checkpoint (TRL's own state)."""

from __future__ import annotations

import signal

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.contracts import JobStatus
from core.db import session_scope
from core.jobs import request_cancel
from core.orm import FineTuningJob, ModelRecord
from core.queue import enqueue_fine_tune
from core.settings import get_settings
from tests.factories import fresh, job_events, make_file, make_job, metrics_events
from tests.preference_records import alpaca_preference_records
from tests.worker.helpers import StartWorker, assert_cancelled_without_trace
from tests.worker.test_runner import start_in_thread, wait_for_metrics
from tests.worker.test_worker_process import checkpoint_steps, status_is, wait_until

pytestmark = pytest.mark.usefixtures("tiny_models")

# One pair per step: 32 pairs x 3 epochs, long enough on a tiny model to be stopped midway.
LONG_DPO = {"method": "dpo", "num_train_epochs": 3, "per_device_train_batch_size": 1, "save_steps": 10}
TOTAL_STEPS = 3 * 32


def long_dpo_job(db: Session) -> FineTuningJob:
    file = make_file(db, alpaca_preference_records(32), fmt="alpaca_preference")
    job = make_job(db, file, hyperparameters=LONG_DPO)
    db.commit()
    return job


def test_cancel_stops_a_dpo_job_between_steps(db: Session) -> None:
    job = long_dpo_job(db)
    thread, outcome = start_in_thread(job.public_id)
    wait_for_metrics(db, job, count=3)
    with session_scope() as session:
        request_cancel(session, job.id)
    thread.join(120)
    assert outcome == {"result": "cancelled"}
    assert_cancelled_without_trace(db, job)
    assert len(metrics_events(db, job)) < TOTAL_STEPS
    assert db.scalars(select(ModelRecord)).first() is None


@pytest.mark.e2e
def test_a_dpo_job_stopped_by_sigterm_resumes_from_its_checkpoint(
    db: Session,
    start_worker: StartWorker,
) -> None:
    stopping = start_worker("stopping")
    job = long_dpo_job(db)
    enqueue_fine_tune(job.public_id, get_settings())
    wait_until(lambda: len(metrics_events(db, job)) >= 12, "DPO training to pass its first checkpoint")
    stopping.signal(signal.SIGTERM)
    assert stopping.proc is not None
    assert stopping.proc.wait(60) == 0

    row = fresh(db, job)
    assert row.status == JobStatus.QUEUED and row.attempts == 0
    saved = checkpoint_steps(db, job)
    assert saved and saved[-1] < TOTAL_STEPS

    start_worker("successor")
    wait_until(status_is(db, job, JobStatus.SUCCEEDED, JobStatus.FAILED), "the DPO job to finish", timeout=600)
    row = fresh(db, job)
    assert row.status == JobStatus.SUCCEEDED, row.error
    assert row.metrics is not None and row.metrics["steps"] == TOTAL_STEPS
    assert row.metrics["resumed_from_checkpoint"] == f"checkpoint-{saved[-1]}"
    assert any(e.message.startswith("Resuming from the checkpoint") for e in job_events(db, job))
    # The resumed run trained only the steps left: one metrics event per step in all, none repeated.
    steps = [m["step"] for m in metrics_events(db, job) if "loss" in m]
    assert sorted(set(steps)) == list(range(1, TOTAL_STEPS + 1))
    # Trained tokens carry on from the checkpoint's count instead of starting again from zero.
    tokens = [m["trained_tokens"] for m in metrics_events(db, job)]
    assert tokens == sorted(tokens) and row.trained_tokens == tokens[-1]
