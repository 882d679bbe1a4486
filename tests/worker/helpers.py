"""Checks the worker tests share."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.contracts import JobStatus
from core.orm import Checkpoint, FineTuningJob
from core.settings import get_settings
from core.storage import fine_tuned_dir, job_dir
from tests.factories import fresh
from tests.processes import ServiceProcess

# The ``start_worker`` fixture (tests/worker/conftest.py): ``start_worker(name, env=None)``.
StartWorker = Callable[..., ServiceProcess]


def assert_cancelled_without_trace(db: Session, job: FineTuningJob) -> FineTuningJob:
    """A cancelled job leaves no model, no checkpoint rows and no folders behind; returns its fresh row."""
    row = fresh(db, job)
    assert row.status == JobStatus.CANCELLED and row.fine_tuned_model is None
    assert db.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id)).first() is None
    assert not job_dir(job.id, get_settings()).exists() and not fine_tuned_dir(job.id, get_settings()).exists()
    return row
