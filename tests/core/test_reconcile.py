"""The reconciler sweeps the database for jobs the broker lost, on real Postgres and Redis."""

from __future__ import annotations

import json
import os
from datetime import timedelta

import redis

from core.contracts import TASK_FINE_TUNE, JobStatus
from core.db import session_scope
from core.orm import FineTuningJob, utcnow
from core.reconcile import reconcile_once
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
