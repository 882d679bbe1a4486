"""The reconciler: the broker is a doorbell that may fail to ring, so the database is swept for jobs that
should be moving and are not.

- ``running``/``cancelling`` whose lease expired (worker died): back to ``queued`` and enqueue, or ``failed``
  after ``MAX_ATTEMPTS``; a cancelling job whose worker died simply ends ``cancelled``.
- ``queued`` and not claimed (enqueue lost, broker flushed): enqueue again, first ``REQUEUE_AFTER_SECONDS``
  after it was enqueued, then after a wait that doubles with each ring (up to ``REQUEUE_MAX_BACKOFF_SECONDS``).
  A job whose tenant already runs its cap of jobs is not rung: its delivery could only be refused.
Re-enqueueing is always safe: a copy that finds the job claimed does nothing.

Each sweep is bounded (``RECONCILE_BATCH_SIZE`` jobs of each kind, dead workers' jobs first, then the queued
ones taking tenants in turns, each tenant's oldest first) and judges time by the database's clock. The api and
every worker may run it: on Postgres a sweep runs only while it holds an advisory lock, so one sweeps at a time.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from core.contracts import JobStatus
from core.db import session_scope
from core.jobs import LOCK_NAMESPACE, add_event, db_now, finish, is_postgres
from core.orm import FineTuningJob
from core.queue import enqueue_fine_tune
from core.settings import Settings

log = logging.getLogger("conch.reconcile")

SWEEP_LOCK = 1  # second key of the sweep's advisory lock (the first is core.jobs.LOCK_NAMESPACE)


def ring_delay(settings: Settings, rings: int) -> timedelta:
    """How long after its ``rings``-th re-ring a still-queued job waits for the next: doubling, capped."""
    seconds = settings.requeue_after_seconds * 2.0 ** min(rings, 30)
    return timedelta(seconds=min(seconds, settings.requeue_max_backoff_seconds))


def _take_sweep_lock(session: Session) -> bool:
    """Held until the sweep's transaction ends; False while another process sweeps."""
    if not is_postgres(session):
        return True
    return bool(session.execute(select(func.pg_try_advisory_xact_lock(LOCK_NAMESPACE, SWEEP_LOCK))).scalar_one())


def _recover_expired(
    session: Session, now: datetime, settings: Settings, counts: dict[str, int]
) -> list[tuple[str, str | None]]:
    to_enqueue: list[tuple[str, str | None]] = []
    expired = session.scalars(
        select(FineTuningJob)
        .where(
            FineTuningJob.status.in_([JobStatus.RUNNING, JobStatus.CANCELLING]),
            FineTuningJob.lease_expires_at < now,
        )
        .order_by(FineTuningJob.lease_expires_at)
        .limit(settings.reconcile_batch_size)
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
                .values(
                    status=JobStatus.QUEUED,
                    lease_owner=None,
                    lease_expires_at=None,
                    enqueued_at=now,
                    rings=0,
                    next_ring_at=None,
                )
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
            to_enqueue.append((job.public_id, job.device_class))
    return to_enqueue


def _ring_stale(
    session: Session, now: datetime, settings: Settings, counts: dict[str, int]
) -> list[tuple[str, str | None]]:
    job = FineTuningJob
    other = aliased(FineTuningJob)
    tenant_running = (
        select(func.count())
        .select_from(other)
        .where(
            other.tenant_id == job.tenant_id,
            other.status.in_([JobStatus.RUNNING, JobStatus.CANCELLING]),
            other.lease_expires_at >= now,
        )
        .scalar_subquery()
    )
    first_ring_due = now - timedelta(seconds=settings.requeue_after_seconds)
    due = or_(
        and_(job.next_ring_at.is_(None), or_(job.enqueued_at.is_(None), job.enqueued_at < first_ring_due)),
        job.next_ring_at <= now,
    )
    # Tenants take turns: every tenant's oldest due job, then every tenant's second, and so on.
    turn = func.row_number().over(partition_by=job.tenant_id, order_by=(job.created_at, job.id))
    ranked = (
        select(job.id.label("id"), turn.label("turn"), job.created_at.label("created_at"))
        .where(job.status == JobStatus.QUEUED, due, tenant_running < settings.max_concurrent_jobs_per_tenant)
        .subquery()
    )
    chosen = select(ranked.c.id).order_by(ranked.c.turn, ranked.c.created_at).limit(settings.reconcile_batch_size)
    stale = session.scalars(
        select(job).where(job.id.in_(chosen)).order_by(job.created_at).with_for_update(skip_locked=True)
    ).all()
    to_enqueue: list[tuple[str, str | None]] = []
    for row in stale:
        row.rings = (row.rings or 0) + 1
        row.enqueued_at = now
        row.next_ring_at = now + ring_delay(settings, row.rings)
        to_enqueue.append((row.public_id, row.device_class))  # to its class's queue
        counts["requeued"] += 1
    return to_enqueue


def reconcile_once(settings: Settings) -> dict[str, int]:
    counts = {"requeued": 0, "recovered": 0, "failed": 0, "cancelled": 0}
    with session_scope() as session:
        if not _take_sweep_lock(session):
            log.debug("reconcile.skipped_locked")
            return counts
        now = db_now(session)
        to_enqueue = _recover_expired(session, now, settings, counts)
        to_enqueue += _ring_stale(session, now, settings, counts)
    for public_id, device_class in to_enqueue:
        try:
            enqueue_fine_tune(public_id, settings, device_class)
        except Exception as exc:  # broker down: the next sweep tries again
            log.warning("job.enqueue_failed", extra={"job_id": public_id, "error": str(exc)[:200]})
    if any(counts.values()):
        log.info("reconcile.swept", extra=counts)
    return counts
