"""A Postgres restart in the middle of a training run, on a private Postgres cluster (never the shared one):
the worker keeps training, retries the writes that hit the outage, and the job succeeds once.

The lease is set to 30 s here (production default: 60 s) so that a few seconds of outage is shorter than the
lease; with the suite's 6 s lease the outage itself would expire it and the reconciler would rightly requeue."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.servers import FaultStack, PostgresServer, RedisServer
from tests.polling import wait_until

pytestmark = pytest.mark.e2e


def test_postgres_restart_mid_job_retries_writes_and_the_job_completes_once(
    tiny_models: dict[str, Path], log_dir: Path, tmp_path: Path
) -> None:
    postgres = PostgresServer(log_dir)
    redis = RedisServer(log_dir)
    stack: FaultStack | None = None
    try:
        postgres.init()
        redis.start()
        stack = FaultStack(log_dir, database_url=postgres.url, redis_url=redis.url, env={"LEASE_SECONDS": "30"})
        stack.start_api()
        stack.start_workers()
        file_id = stack.upload(tmp_path, examples=64)
        job_id = stack.submit(file_id, n_epochs=3)["id"]

        def training() -> bool:
            events = stack.client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()
            return any(e.get("type") == "metrics" for e in events.get("data", []))

        wait_until(training, "the first training metrics", timeout=240, interval=0.3, logs=stack.logs)
        assert stack.job(job_id)["status"] == "running"

        postgres.stop()
        time.sleep(3)  # heartbeats (every second) and progress writes hit the outage
        postgres.start()

        finished = stack.wait_status(job_id, ("succeeded", "failed", "cancelled"), timeout=300)
        assert finished["status"] == "succeeded", (finished.get("error"), stack.logs())
        assert finished["attempts"] == 1
        assert stack.claims() == [job_id]
        worker_log = stack.worker_log()
        # The outage hit while the job held its lease: its lease renewals (heartbeat) or its progress and event
        # writes (db.retry) failed and were tried again, and the job still succeeded on its first attempt.
        assert "job.heartbeat_failed" in worker_log or "db.retry" in worker_log, worker_log[-4000:]
        assert postgres.query("select count(*) from fine_tuning_jobs where status = 'succeeded'") == [(1,)]
    finally:
        if stack is not None:
            stack.stop()
        redis.close()
        postgres.close()
