"""Job transitions on the real Postgres: every change happens at most once, whoever races whom."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select

from core.contracts import JobStatus
from core.db import session_scope
from core.jobs import LeaseLost, claim, finish, release_to_queue, renew_lease, request_cancel, update_owned
from core.orm import FineTuningJob, JobEvent, utcnow
from tests.factories import make_job


def _new_job(db, **values) -> FineTuningJob:
    job = make_job(db, **values)
    db.commit()
    return job


def _status(job_id) -> str:
    with session_scope() as session:
        return session.get(FineTuningJob, job_id).status


def test_concurrent_claims_have_one_winner(db) -> None:
    job = _new_job(db)
    winners: list[str] = []
    barrier = threading.Barrier(8)

    def contend(owner: str) -> None:
        barrier.wait()
        with session_scope() as session:
            if claim(session, job.id, owner, lease_seconds=60):
                winners.append(owner)

    threads = [threading.Thread(target=contend, args=(f"w{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    with session_scope() as session:
        row = session.get(FineTuningJob, job.id)
        assert row.status == JobStatus.RUNNING and row.lease_owner == winners[0] and row.attempts == 1


def test_expired_lease_can_be_taken_over_and_the_old_owner_is_refused(db) -> None:
    job = _new_job(db)
    with session_scope() as session:
        assert claim(session, job.id, "old", lease_seconds=60)
    with session_scope() as session:
        assert claim(session, job.id, "new", lease_seconds=60) is None  # lease still valid
        session.get(FineTuningJob, job.id).lease_expires_at = utcnow() - timedelta(seconds=1)
    with session_scope() as session:
        taken = claim(session, job.id, "new", lease_seconds=60)
        assert taken is not None and taken.attempts == 2
    with session_scope() as session, pytest.raises(LeaseLost):
        renew_lease(session, job.id, "old", 60)
    with session_scope() as session, pytest.raises(LeaseLost):
        update_owned(session, job.id, "old", progress={"step": 1})
    with session_scope() as session:
        assert not finish(session, job.id, JobStatus.SUCCEEDED, owner="old", message="done")
        assert finish(session, job.id, JobStatus.SUCCEEDED, owner="new", message="done")
    assert _status(job.id) == JobStatus.SUCCEEDED


def test_cancel_of_a_queued_job_ends_it_and_it_never_starts(db) -> None:
    job = _new_job(db)
    with session_scope() as session:
        request_cancel(session, job.id)
    assert _status(job.id) == JobStatus.CANCELLED
    with session_scope() as session:
        assert claim(session, job.id, "w", lease_seconds=60) is None


def test_cancel_of_a_running_job_sets_the_flag_seen_by_the_heartbeat(db) -> None:
    job = _new_job(db)
    with session_scope() as session:
        claim(session, job.id, "w", lease_seconds=60)
    with session_scope() as session:
        assert renew_lease(session, job.id, "w", 60) is False
        request_cancel(session, job.id)
    assert _status(job.id) == JobStatus.CANCELLING
    with session_scope() as session:
        assert renew_lease(session, job.id, "w", 60) is True


def _race_completion_with_cancel(job_id) -> bool:
    barrier = threading.Barrier(2)
    outcome: dict[str, bool] = {}

    def complete() -> None:
        barrier.wait()
        with session_scope() as session:
            outcome["finished"] = finish(session, job_id, JobStatus.SUCCEEDED, owner="w", message="done")

    def cancel() -> None:
        barrier.wait()
        with session_scope() as session:
            request_cancel(session, job_id)

    threads = [threading.Thread(target=complete), threading.Thread(target=cancel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcome["finished"]


def test_cancel_racing_completion_leaves_one_terminal_state(db) -> None:
    for _ in range(10):
        job = _new_job(db)
        with session_scope() as session:
            claim(session, job.id, "w", lease_seconds=60)
        finished = _race_completion_with_cancel(job.id)
        with session_scope() as session:
            status = session.get(FineTuningJob, job.id).status
            terminal_events = session.scalars(
                select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.message == "done")
            ).all()
        # The worker's finish ends the job whether or not the cancel flag landed first; the cancel never adds
        # a second terminal state.
        assert finished and status == JobStatus.SUCCEEDED
        assert len(terminal_events) == 1


def test_release_to_queue_refunds_the_attempt(db) -> None:
    job = _new_job(db)
    with session_scope() as session:
        claim(session, job.id, "w", lease_seconds=60)
    with session_scope() as session:
        assert release_to_queue(session, job.id, "w", refund_attempt=True, message="shutting down")
    with session_scope() as session:
        row = session.get(FineTuningJob, job.id)
        assert row.status == JobStatus.QUEUED and row.attempts == 0 and row.lease_owner is None


def test_tenant_cap_keeps_extra_jobs_queued(db) -> None:
    first, second = _new_job(db, tenant_id="acme"), _new_job(db, tenant_id="acme")
    other_tenant = _new_job(db, tenant_id="globex")
    with session_scope() as session:
        assert claim(session, first.id, "w1", 60, max_running_per_tenant=1)
        assert claim(session, second.id, "w2", 60, max_running_per_tenant=1) is None
        assert claim(session, other_tenant.id, "w3", 60, max_running_per_tenant=1)
    assert _status(second.id) == JobStatus.QUEUED
    with session_scope() as session:
        finish(session, first.id, JobStatus.SUCCEEDED, owner="w1", message="done")
    with session_scope() as session:
        assert claim(session, second.id, "w2", 60, max_running_per_tenant=1)
