"""Broker faults with a real api, a real Celery worker and a private Redis (never the shared one):
restarting Redis with jobs queued and running loses no job, and Redis being down when a job is submitted still
answers the client ``queued``. Every job succeeds exactly once (one claim, one attempt), and the worker consumes
again after the fault: a job submitted after the restart is trained too."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from tests.faults.servers import FaultStack, RedisServer
from tests.polling import wait_until

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("persistent", [False, True], ids=["data-flushed", "data-kept"])
def test_redis_restart_with_jobs_queued_and_running_loses_nothing(
    clean_db: None, tiny_models: dict[str, Path], log_dir: Path, tmp_path: Path, persistent: bool
) -> None:
    redis = RedisServer(log_dir, persistent=persistent).start()
    stack = FaultStack(log_dir, database_url=os.environ["DATABASE_URL"], redis_url=redis.url)
    try:
        stack.start_api()
        stack.start_workers()
        file_id = stack.upload(tmp_path, examples=16)
        before = [stack.submit(file_id, n_epochs=2)["id"] for _ in range(3)]

        # One worker with concurrency 1: the first job runs while the others wait in the broker.
        running = stack.wait_status(before[0], ("running",), timeout=120)
        assert running["status"] == "running"
        statuses = Counter(stack.job(job_id)["status"] for job_id in before)
        assert statuses["queued"] >= 1, statuses
        if persistent:
            assert redis.dbsize() > 0

        redis.restart()  # a new server on the same port: empty unless it kept an append-only file
        if not persistent:
            assert stack.job(before[0])["status"] in ("running", "succeeded")  # the restart changed no job row

        # Consumption after the restart, not just a live process: a new job is delivered and trained.
        after = stack.submit(file_id, n_epochs=1)["id"]
        jobs = stack.wait_all_finished([*before, after])

        assert [j["status"] for j in jobs] == ["succeeded"] * 4, [(j["id"], j.get("error")) for j in jobs]
        assert [j["attempts"] for j in jobs] == [1] * 4
        assert sorted(stack.claims()) == sorted([*before, after]), stack.logs()  # each job trained once
        assert "Connection to broker lost" in stack.worker_log()  # the worker really lived through the restart
        assert all(w.alive() for w in stack.workers) and stack.api.alive()
    finally:
        stack.stop()
        redis.close()


def test_redis_down_at_submit_still_queues_and_runs_once_redis_is_back(
    clean_db: None, tiny_models: dict[str, Path], log_dir: Path, tmp_path: Path
) -> None:
    redis = RedisServer(log_dir)  # not started: the port answers nothing
    stack = FaultStack(log_dir, database_url=os.environ["DATABASE_URL"], redis_url=redis.url)
    try:
        stack.start_api()
        file_id = stack.upload(tmp_path, examples=8)

        response = stack.client.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": "tiny-llama",
                "training_file": file_id,
                "auto_deploy": False,
                "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
            },
        )
        assert 200 <= response.status_code < 300, response.text
        job_id = response.json()["id"]
        assert response.json()["status"] == "queued"
        wait_until(
            lambda: "job.enqueue_failed" in stack.api.log(),
            "the failed enqueue to be logged",
            timeout=30,
            interval=0.3,
            logs=stack.logs,
        )
        assert stack.job(job_id)["status"] == "queued"

        # The worker starts while the broker is still down, and connects once it is back.
        stack.start_workers(wait_ready=False)
        for worker in stack.workers:
            worker.wait_for_log("Cannot connect to redis", timeout=120)
        redis.start()
        for worker in stack.workers:
            worker.wait_for_log("ready", timeout=120)

        finished = stack.wait_status(job_id, ("succeeded", "failed", "cancelled"), timeout=300)
        assert finished["status"] == "succeeded", finished.get("error")
        assert finished["attempts"] == 1
        assert stack.claims() == [job_id]
    finally:
        stack.stop()
        redis.close()
