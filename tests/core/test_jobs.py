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
        # Whichever the database serialises first wins: the success (the cancel then changes nothing), or the
        # cancel (the success is refused and the job stays cancelling, for its worker to end cancelled).
        if finished:
            assert status == JobStatus.SUCCEEDED and len(terminal_events) == 1
        else:
            assert status == JobStatus.CANCELLING and terminal_events == []


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


def test_a_cancel_committed_before_the_success_wins(db) -> None:
    job = _new_job(db)
    with session_scope() as session:
        claim(session, job.id, "w", lease_seconds=60)
    with session_scope() as session:
        assert request_cancel(session, job.id) is True
    with session_scope() as session:
        assert not finish(session, job.id, JobStatus.SUCCEEDED, owner="w", message="done")
    assert _status(job.id) == JobStatus.CANCELLING
    with session_scope() as session:
        assert finish(session, job.id, JobStatus.CANCELLED, owner="w", message="Job cancelled")
        assert request_cancel(session, job.id) is False  # ended: nothing to cancel
    assert _status(job.id) == JobStatus.CANCELLED


def test_a_cancel_during_merge_is_honoured_by_the_publish(db, tmp_path) -> None:
    """The publish transaction is the point of no return: a cancel committed before it leaves no model, no
    deployment and no success, even with auto_deploy."""
    from core.db import get_sessionmaker
    from core.orm import Deployment, ModelRecord
    from core.settings import get_settings
    from worker.pipeline.errors import TrainingStopped
    from worker.pipeline.publish import register_model
    from worker.spec import JobSpec

    job = _new_job(db, auto_deploy=True)
    with session_scope() as session:
        claim(session, job.id, "w", lease_seconds=60)
        spec = JobSpec.from_row(session.get(FineTuningJob, job.id), get_settings())
    with session_scope() as session:
        request_cancel(session, job.id)  # arrives while the worker merges
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"w")
    with pytest.raises(TrainingStopped) as stopped:
        register_model(
            get_sessionmaker(),
            spec,
            "w",
            model_id="ft:tiny-llama:t:" + spec.public_id,
            folder=folder,
            metrics={},
            trained_tokens=1,
            progress={},
            settings=get_settings(),
        )
    assert stopped.value.reason == "cancel"
    with session_scope() as session:
        assert session.scalars(select(ModelRecord)).all() == []
        assert session.scalars(select(Deployment)).all() == []
    assert _status(job.id) == JobStatus.CANCELLING


def test_running_cap_holds_when_two_claims_overlap(db) -> None:
    """Two claims for the same tenant in overlapping transactions: the second waits for the first to commit and
    then counts its job, so a cap of one lets exactly one run."""
    first, second = _new_job(db), _new_job(db)
    results: list[object] = []
    with session_scope() as holder:
        assert claim(holder, first.id, "a", lease_seconds=60, max_running_per_tenant=1) is not None

        def contend() -> None:
            with session_scope() as session:
                results.append(claim(session, second.id, "b", lease_seconds=60, max_running_per_tenant=1))

        racer = threading.Thread(target=contend)
        racer.start()
        racer.join(timeout=1.0)  # it blocks on the tenant's lock while the first claim is uncommitted
        assert racer.is_alive() and results == []
    racer.join(timeout=10)
    assert results == [None]
    assert _status(first.id) == JobStatus.RUNNING and _status(second.id) == JobStatus.QUEUED


def test_running_cap_holds_under_many_concurrent_claims(db) -> None:
    jobs = [_new_job(db) for _ in range(8)]
    barrier = threading.Barrier(len(jobs))
    won: list[str] = []

    def contend(job: FineTuningJob) -> None:
        barrier.wait()
        with session_scope() as session:
            if claim(session, job.id, f"w-{job.id.hex[:6]}", lease_seconds=60, max_running_per_tenant=2):
                won.append(job.public_id)

    threads = [threading.Thread(target=contend, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 2
    with session_scope() as session:
        running = session.scalars(select(FineTuningJob).where(FineTuningJob.status == JobStatus.RUNNING)).all()
        assert len(running) == 2


def test_leases_are_set_by_the_database_clock_not_the_host_s(db, monkeypatch) -> None:
    """A host whose clock runs an hour fast must not hand out leases that outlive a dead worker by an hour."""
    import core.jobs
    import core.orm

    fast = lambda: utcnow() + timedelta(hours=1)  # noqa: E731
    monkeypatch.setattr(core.orm, "utcnow", fast)
    monkeypatch.setattr(core.jobs, "utcnow", fast, raising=False)
    job = _new_job(db)
    with session_scope() as session:
        claimed = claim(session, job.id, "w", lease_seconds=60)
        assert claimed is not None
        expires, started = claimed.lease_expires_at, claimed.started_at
    assert abs((expires - utcnow()) - timedelta(seconds=60)) < timedelta(seconds=10)
    assert abs(started - utcnow()) < timedelta(seconds=10)
    with session_scope() as session:
        renew_lease(session, job.id, "w", lease_seconds=30)
    with session_scope() as session:
        renewed = session.get(FineTuningJob, job.id).lease_expires_at
    assert abs((renewed - utcnow()) - timedelta(seconds=30)) < timedelta(seconds=10)
