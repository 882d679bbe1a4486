"""The reconciler sweeps the database for jobs the broker lost, on real Postgres and Redis."""

from __future__ import annotations

import json
import os
from datetime import timedelta

import redis
from sqlalchemy import func, select

from core.contracts import TASK_FINE_TUNE, JobStatus
from core.db import session_scope
from core.jobs import LOCK_NAMESPACE
from core.orm import FineTuningJob, utcnow
from core.reconcile import SWEEP_LOCK, reconcile_once, ring_delay
from core.settings import get_settings
from tests.factories import make_job


def _queued_job_ids() -> list[str]:
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    messages = [json.loads(m) for m in client.lrange(os.environ["TRAINING_QUEUE"], 0, -1)]
    client.close()
    ids = []
    for message in messages:
        assert message["headers"]["task"] == TASK_FINE_TUNE
        ids.append(message["headers"]["kwargsrepr"])
    return ids


def _drain() -> None:
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    client.delete(os.environ["TRAINING_QUEUE"])
    client.close()


def test_stale_queued_job_is_enqueued_again(db) -> None:
    _drain()
    stale = make_job(db, enqueued_at=utcnow() - timedelta(minutes=5))
    fresh = make_job(db)
    db.commit()
    counts = reconcile_once(get_settings())
    assert counts["requeued"] == 1
    queued = _queued_job_ids()
    assert len(queued) == 1 and stale.public_id in queued[0] and fresh.public_id not in queued[0]
    _drain()


def test_job_whose_worker_died_is_queued_again_then_failed_after_max_attempts(db) -> None:
    _drain()
    job = make_job(
        db, status=JobStatus.RUNNING, attempts=1, lease_owner="dead", lease_expires_at=utcnow() - timedelta(seconds=5)
    )
    spent = make_job(
        db, status=JobStatus.RUNNING, attempts=3, lease_owner="dead", lease_expires_at=utcnow() - timedelta(seconds=5)
    )
    cancelling = make_job(
        db,
        status=JobStatus.CANCELLING,
        cancel_requested=True,
        attempts=1,
        lease_owner="dead",
        lease_expires_at=utcnow() - timedelta(seconds=5),
    )
    db.commit()
    counts = reconcile_once(get_settings())
    assert counts == {"requeued": 0, "recovered": 1, "failed": 1, "cancelled": 1}
    with session_scope() as session:
        assert session.get(FineTuningJob, job.id).status == JobStatus.QUEUED
        failed = session.get(FineTuningJob, spent.id)
        assert failed.status == JobStatus.FAILED and failed.error["code"] == "max_attempts_exceeded"
        assert session.get(FineTuningJob, cancelling.id).status == JobStatus.CANCELLED
    assert len(_queued_job_ids()) == 1
    _drain()


def test_live_lease_is_left_alone(db) -> None:
    make_job(
        db, status=JobStatus.RUNNING, attempts=1, lease_owner="alive", lease_expires_at=utcnow() + timedelta(seconds=60)
    )
    db.commit()
    assert reconcile_once(get_settings()) == {"requeued": 0, "recovered": 0, "failed": 0, "cancelled": 0}


def _rows(*jobs) -> list[FineTuningJob]:
    with session_scope() as session:
        rows = [session.get(FineTuningJob, job.id) for job in jobs]
        session.expunge_all()
        return rows


def test_a_queued_job_is_rung_again_after_doubling_waits(db) -> None:
    _drain()
    settings = get_settings()  # REQUEUE_AFTER_SECONDS=5 in the tests
    job = make_job(db, enqueued_at=utcnow() - timedelta(minutes=5))
    db.commit()
    assert reconcile_once(settings)["requeued"] == 1
    assert reconcile_once(settings)["requeued"] == 0  # not again on the very next sweep
    (row,) = _rows(job)
    assert row.rings == 1 and row.next_ring_at is not None
    assert abs((row.next_ring_at - row.enqueued_at) - timedelta(seconds=10)) < timedelta(seconds=1)

    with session_scope() as session:  # the wait has passed: rung once more, and the next wait doubles
        session.get(FineTuningJob, job.id).next_ring_at = utcnow() - timedelta(seconds=1)
    assert reconcile_once(settings)["requeued"] == 1
    (row,) = _rows(job)
    assert row.rings == 2
    assert abs((row.next_ring_at - row.enqueued_at) - timedelta(seconds=20)) < timedelta(seconds=1)
    assert len(_queued_job_ids()) == 2
    _drain()


def test_ring_waits_are_capped() -> None:
    settings = get_settings().model_copy(update={"requeue_after_seconds": 30, "requeue_max_backoff_seconds": 600})
    assert [ring_delay(settings, n).total_seconds() for n in (0, 1, 2, 4, 5, 40)] == [30, 60, 120, 480, 600, 600]


def test_a_sweep_is_bounded_and_takes_tenants_in_turns(db) -> None:
    _drain()
    settings = get_settings().model_copy(update={"reconcile_batch_size": 4})
    old = utcnow() - timedelta(minutes=5)
    hog = [make_job(db, tenant_id="hog", enqueued_at=old, created_at=old - timedelta(minutes=10 - i)) for i in range(6)]
    small = [make_job(db, tenant_id="small", enqueued_at=old, created_at=old) for _ in range(2)]
    db.commit()
    assert reconcile_once(settings)["requeued"] == 4
    rung = {row.id for row in _rows(*hog, *small) if row.rings == 1}
    # Both of the small tenant's jobs, and the hog's two oldest: not the hog's six first.
    assert rung == {small[0].id, small[1].id, hog[0].id, hog[1].id}
    _drain()


def test_a_tenant_at_its_running_cap_is_not_rung(db) -> None:
    _drain()
    settings = get_settings().model_copy(update={"max_concurrent_jobs_per_tenant": 1})
    old = utcnow() - timedelta(minutes=5)
    make_job(
        db,
        tenant_id="busy",
        status=JobStatus.RUNNING,
        attempts=1,
        lease_owner="alive",
        lease_expires_at=utcnow() + timedelta(seconds=60),
    )
    waiting = make_job(db, tenant_id="busy", enqueued_at=old)
    other = make_job(db, tenant_id="idle", enqueued_at=old)
    db.commit()
    assert reconcile_once(settings)["requeued"] == 1
    assert [row.rings for row in _rows(waiting, other)] == [0, 1]
    _drain()


def test_only_one_process_sweeps_at_a_time(db) -> None:
    """While one sweep holds the lock, another (the api's, or another worker's) does nothing."""
    _drain()
    make_job(db, enqueued_at=utcnow() - timedelta(minutes=5))
    db.commit()
    with session_scope() as holder:
        holder.execute(select(func.pg_advisory_xact_lock(LOCK_NAMESPACE, SWEEP_LOCK)))
        assert reconcile_once(get_settings())["requeued"] == 0
    assert reconcile_once(get_settings())["requeued"] == 1
    _drain()


def test_the_sweep_judges_leases_by_the_database_clock(db, monkeypatch) -> None:
    """A reconciler on a host whose clock runs fast must not take a live job from its worker."""
    import core.orm
    import core.reconcile

    live = make_job(
        db, status=JobStatus.RUNNING, attempts=1, lease_owner="alive", lease_expires_at=utcnow() + timedelta(seconds=60)
    )
    db.commit()
    fast = lambda: utcnow() + timedelta(hours=1)  # noqa: E731
    monkeypatch.setattr(core.orm, "utcnow", fast)
    monkeypatch.setattr(core.reconcile, "utcnow", fast, raising=False)
    assert reconcile_once(get_settings())["recovered"] == 0
    assert _rows(live)[0].lease_owner == "alive"
