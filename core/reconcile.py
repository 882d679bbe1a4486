"""The reconciler: the broker is a doorbell that may fail to ring, so the database is swept for jobs that
should be moving and are not.

- ``queued`` for longer than ``REQUEUE_AFTER_SECONDS`` (enqueue lost, broker flushed): enqueue again.
- ``running``/``cancelling`` whose lease expired (worker died): back to ``queued`` and enqueue, or ``failed``
  after ``MAX_ATTEMPTS``; a cancelling job whose worker died simply ends ``cancelled``.
Re-enqueueing is always safe: a copy that finds the job claimed does nothing.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import or_, select, update

from core.contracts import JobStatus
from core.db import session_scope
from core.jobs import add_event, finish
from core.orm import FineTuningJob, utcnow
from core.queue import enqueue_fine_tune
from core.settings import Settings

log = logging.getLogger("conch.reconcile")


def reconcile_once(settings: Settings) -> dict[str, int]:
    now = utcnow()
    counts = {"requeued": 0, "recovered": 0, "failed": 0, "cancelled": 0}
    to_enqueue: list[str] = []
    with session_scope() as session:
        expired = session.scalars(
            select(FineTuningJob)
            .where(
                FineTuningJob.status.in_([JobStatus.RUNNING, JobStatus.CANCELLING]),
                FineTuningJob.lease_expires_at < now,
            )
            .with_for_update(skip_locked=True)
        ).all()
        for job in expired:
            if job.status == JobStatus.CANCELLING or job.cancel_requested:
                if finish(session, job.id, JobStatus.CANCELLED, message="Job cancelled (its worker stopped)"):
                    counts["cancelled"] += 1
            elif job.attempts >= settings.max_attempts:
                message = f"The job's worker stopped {job.attempts} times; giving up."
                error = {"code": "max_attempts_exceeded", "param": None, "message": message}
                if finish(session, job.id, JobStatus.FAILED, message=message, error=error):
                    counts["failed"] += 1
            else:
                session.execute(
                    update(FineTuningJob)
                    .where(
                        FineTuningJob.id == job.id,
                        FineTuningJob.status == JobStatus.RUNNING,
                        FineTuningJob.lease_expires_at < now,
                    )
                    .values(status=JobStatus.QUEUED, lease_owner=None, lease_expires_at=None, enqueued_at=now)
                    .execution_options(synchronize_session=False)
                )
                add_event(
                    session,
                    job.id,
                    "The job's worker stopped responding; the job was queued again",
                    level="warning",
                    data={"status": JobStatus.QUEUED.value, "attempts": job.attempts},
                )
                counts["recovered"] += 1
                to_enqueue.append(job.public_id)
        stale = session.scalars(
            select(FineTuningJob)
            .where(
                FineTuningJob.status == JobStatus.QUEUED,
                or_(
                    FineTuningJob.enqueued_at.is_(None),
                    FineTuningJob.enqueued_at < now - timedelta(seconds=settings.requeue_after_seconds),
                ),
            )
            .with_for_update(skip_locked=True)
        ).all()
        for job in stale:
            job.enqueued_at = now
            to_enqueue.append(job.public_id)
            counts["requeued"] += 1
    for public_id in to_enqueue:
        try:
            enqueue_fine_tune(public_id, settings)
        except Exception as exc:  # broker down: the next sweep tries again
            log.warning("job.enqueue_failed", extra={"job_id": public_id, "error": str(exc)})
    if any(counts.values()):
        log.info("reconcile.swept", extra=counts)
    return counts
