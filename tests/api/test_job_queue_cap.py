"""One tenant's backlog is capped: past MAX_QUEUED_JOBS_PER_TENANT waiting jobs a new job is refused with 429,
nothing is written or enqueued, other tenants' jobs do not count, and a slot frees once a job leaves the queue."""

from __future__ import annotations

from typing import Any

import redis
from fastapi.testclient import TestClient
from sqlalchemy import update

from core.contracts import JobStatus
from core.db import session_scope
from core.orm import FineTuningJob
from tests.api.helpers import assert_envelope, count_rows, job_uuid, make_client, queued_messages
from tests.factories import make_file, make_job


def _create(client: TestClient, training_file: str) -> Any:
    return client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": training_file})


def test_queued_jobs_per_tenant_are_capped(clean_db: None, redis_client: redis.Redis, queue_name: str) -> None:
    with make_client(MAX_QUEUED_JOBS_PER_TENANT="2") as client:
        with session_scope() as session:
            training_file = make_file(session).public_id
            # Another tenant's backlog is its own: these do not count against the default tenant.
            other_file = make_file(session, tenant_id="other")
            for _ in range(3):
                make_job(session, other_file, tenant_id="other")
        first, second = _create(client, training_file), _create(client, training_file)
        assert first.status_code == 200 and second.status_code == 200, (first.text, second.text)

        refused = _create(client, training_file)
        error = assert_envelope(refused, 429, code="too_many_queued_jobs")
        assert error["type"] == "rate_limit_error" and "limit is 2" in error["message"]
        assert count_rows(FineTuningJob) == 5 and len(queued_messages(redis_client, queue_name)) == 2

        # A job that starts leaves the queue and frees a slot.
        with session_scope() as session:
            session.execute(
                update(FineTuningJob)
                .where(FineTuningJob.id == job_uuid(first.json()["id"]))
                .values(status=JobStatus.RUNNING.value)
            )
        assert _create(client, training_file).status_code == 200
