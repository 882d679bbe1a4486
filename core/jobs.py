"""Job state transitions as conditional updates, so every change happens at most once.

The worker claims a job with one UPDATE ... WHERE (queued, or running with an expired lease), holds it with a
lease that a heartbeat renews, and every later write names the lease owner: a worker that lost its lease (a
duplicate delivery, or one presumed dead) can no longer change the job.

Every time written here comes from the database's clock (``db_now``), never the host's: a lease is set by one
host and judged expired by another, and hosts' clocks drift apart.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, aliased

from core.contracts import TERMINAL_STATUSES, JobStatus
from core.orm import FineTuningJob, JobEvent
from core.settings import get_settings

# First key of the two-key Postgres advisory locks Conch takes (the second names what is locked), so they cannot
# collide with another application's locks on a shared server.
LOCK_NAMESPACE = 0x434F4E  # "CON"
TENANT_LOCK = "tenant:"


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def db_now(session: Session) -> datetime:
    """The database's current time (UTC, aware): the one clock every host agrees on.

    Postgres: ``clock_timestamp()`` (the moment of the call, not the transaction's start, so a long sweep does
    not judge leases by a stale instant). SQLite is a file on this host, so its clock is this host's; it is read
    through SQLite anyway so that both paths say the same thing.
    """
    if is_postgres(session):
        moment: datetime = session.execute(select(func.clock_timestamp())).scalar_one()
        return moment.astimezone(UTC)
    raw = session.execute(select(func.strftime("%Y-%m-%d %H:%M:%f", "now"))).scalar_one()
    return datetime.strptime(str(raw), "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC)


def lock_tenant(session: Session, tenant_id: str) -> None:
    """Serialise, until this transaction ends, the decisions that count a tenant's jobs (claiming under the
    running cap, admitting under the queued cap). Without it two claims at once each count the other's job as
    not yet running and both pass. SQLite needs nothing: it runs one writing transaction at a time."""
    if is_postgres(session):
        session.execute(select(func.pg_advisory_xact_lock(LOCK_NAMESPACE, func.hashtext(TENANT_LOCK + tenant_id))))


class LeaseLost(RuntimeError):
    """This worker no longer holds the job: stop without writing anything else."""


def add_event(
    session: Session,
    job_id: uuid.UUID,
    message: str,
    *,
    type_: str = "message",
    level: str = "info",
    data: dict[str, Any] | None = None,
) -> JobEvent:
    event = JobEvent(job_id=job_id, message=message, type=type_, level=level, data=data)
    session.add(event)
    return event


def claim(
    session: Session, job_id: uuid.UUID, owner: str, lease_seconds: float, *, max_running_per_tenant: int | None = None
) -> FineTuningJob | None:
    """Take the job if it is queued, or running under an expired lease. None: someone else has it, it ended, or
    its tenant already runs ``max_running_per_tenant`` jobs (it then stays queued; the reconciler rings again).

    The cap holds under concurrent claims: the tenant's lock is taken first, so the count below sees every claim
    committed before ours (each statement reads afresh under READ COMMITTED)."""
    tenant_id = session.execute(select(FineTuningJob.tenant_id).where(FineTuningJob.id == job_id)).scalar_one_or_none()
    if tenant_id is None:
        return None
    lock_tenant(session, tenant_id)
    now = db_now(session)
    cap = get_settings().max_concurrent_jobs_per_tenant if max_running_per_tenant is None else max_running_per_tenant
    other = aliased(FineTuningJob)
    tenant_running = (
        select(func.count())
        .select_from(other)
        .where(
            other.tenant_id == FineTuningJob.tenant_id,
            other.id != job_id,
            other.status.in_([JobStatus.RUNNING, JobStatus.CANCELLING]),
            other.lease_expires_at >= now,
        )
        .scalar_subquery()
    )
    result = session.execute(
        update(FineTuningJob)
        .where(
            FineTuningJob.id == job_id,
            FineTuningJob.cancel_requested.is_(False),
            tenant_running < cap,
            or_(
                FineTuningJob.status == JobStatus.QUEUED,
                (FineTuningJob.status == JobStatus.RUNNING) & (FineTuningJob.lease_expires_at < now),
            ),
        )
        .values(
            status=JobStatus.RUNNING,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempts=FineTuningJob.attempts + 1,
            started_at=now,
            updated_at=now,
            rings=0,
            next_ring_at=None,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    return session.get(FineTuningJob, job_id, populate_existing=True)


def renew_lease(session: Session, job_id: uuid.UUID, owner: str, lease_seconds: float) -> bool:
    """Extend the lease; returns whether cancel was requested. Raises LeaseLost if the job is no longer ours."""
    now = db_now(session)
    result = session.execute(
        update(FineTuningJob)
        .where(
            FineTuningJob.id == job_id,
            FineTuningJob.lease_owner == owner,
            FineTuningJob.status.in_([JobStatus.RUNNING, JobStatus.CANCELLING]),
        )
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise LeaseLost(str(job_id))
    cancel = session.execute(select(FineTuningJob.cancel_requested).where(FineTuningJob.id == job_id)).scalar_one()
    return bool(cancel)


def update_owned(session: Session, job_id: uuid.UUID, owner: str, **values: Any) -> None:
    """Write job columns only while this worker still holds the lease."""
    result = session.execute(
        update(FineTuningJob)
        .where(
            FineTuningJob.id == job_id,
            FineTuningJob.lease_owner == owner,
            FineTuningJob.status.in_([JobStatus.RUNNING, JobStatus.CANCELLING]),
        )
        .values(updated_at=db_now(session), **values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise LeaseLost(str(job_id))


def finish(
    session: Session,
    job_id: uuid.UUID,
    status: JobStatus,
    *,
    owner: str | None = None,
    message: str,
    error: dict[str, Any] | None = None,
    **values: Any,
) -> bool:
    """Move a live job to a terminal status exactly once. False if it had already ended (or is not ours), or, for
    ``succeeded``, if a cancel was requested first: a cancel the api answered ``cancelling`` is honoured until the
    success commits (the point of no return), and refused with 409 after it (see ``request_cancel``)."""
    assert status in TERMINAL_STATUSES
    conditions = [
        FineTuningJob.id == job_id,
        FineTuningJob.status.not_in([s.value for s in TERMINAL_STATUSES]),
    ]
    if status == JobStatus.SUCCEEDED:
        conditions.append(FineTuningJob.cancel_requested.is_(False))
    if owner is not None:
        conditions.append(FineTuningJob.lease_owner == owner)
    now = db_now(session)
    result = session.execute(
        update(FineTuningJob)
        .where(*conditions)
        .values(
            status=status,
            error=error,
            finished_at=now,
            updated_at=now,
            lease_owner=None,
            lease_expires_at=None,
            **values,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    add_event(
        session,
        job_id,
        message,
        level="error" if status == JobStatus.FAILED else "info",
        data={"status": status.value, **({"error": error} if error else {})},
    )
    return True


def release_to_queue(session: Session, job_id: uuid.UUID, owner: str, *, refund_attempt: bool, message: str) -> bool:
    """Give a running job back to the queue (graceful shutdown); optionally without spending an attempt."""
    now = db_now(session)
    values: dict[str, Any] = {
        "status": JobStatus.QUEUED,
        "lease_owner": None,
        "lease_expires_at": None,
        "enqueued_at": now,
        "updated_at": now,
        "rings": 0,
        "next_ring_at": None,
    }
    if refund_attempt:
        values["attempts"] = FineTuningJob.attempts - 1
    result = session.execute(
        update(FineTuningJob)
        .where(
            FineTuningJob.id == job_id,
            FineTuningJob.lease_owner == owner,
            FineTuningJob.status == JobStatus.RUNNING,
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    add_event(session, job_id, message, data={"status": JobStatus.QUEUED.value})
    return True


def cancel_was_requested(session: Session, job_id: uuid.UUID) -> bool:
    return bool(
        session.execute(select(FineTuningJob.cancel_requested).where(FineTuningJob.id == job_id)).scalar_one_or_none()
    )


def request_cancel(session: Session, job_id: uuid.UUID) -> bool:
    """Cancel: a job that has not started ends now; a running one is flagged and stops at its next step (at the
    latest, its publish sees the flag and ends it cancelled). False: the job had already ended, so nothing changed.

    Both branches are conditional updates, so a cancel racing a claim or a completion leaves exactly one
    terminal status: whichever update the database serialises first wins and the other matches no row.
    """
    now = db_now(session)
    ended = session.execute(
        update(FineTuningJob)
        .where(
            FineTuningJob.id == job_id,
            FineTuningJob.status.in_([JobStatus.QUEUED, JobStatus.VALIDATING_FILES]),
        )
        .values(status=JobStatus.CANCELLED, cancel_requested=True, finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if ended.rowcount == 1:  # type: ignore[attr-defined]
        add_event(session, job_id, "Job cancelled before it started", data={"status": JobStatus.CANCELLED.value})
        return True
    flagged = session.execute(
        update(FineTuningJob)
        .where(FineTuningJob.id == job_id, FineTuningJob.status == JobStatus.RUNNING)
        .values(status=JobStatus.CANCELLING, cancel_requested=True, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if flagged.rowcount == 1:  # type: ignore[attr-defined]
        add_event(
            session,
            job_id,
            "Cancellation requested; the job stops at its next step",
            data={"status": JobStatus.CANCELLING.value},
        )
        return True
    # Already cancelling (a repeated cancel) counts as accepted; an ended job does not.
    status = session.execute(select(FineTuningJob.status).where(FineTuningJob.id == job_id)).scalar_one_or_none()
    return status == JobStatus.CANCELLING


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything Conch writes is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
