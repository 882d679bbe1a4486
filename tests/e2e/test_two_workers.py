"""Two worker processes (as two hosts would run them) share one api, Postgres and Redis: every job is trained
exactly once, and both workers take work."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.factories import alpaca_records, write_jsonl
from tests.processes import free_port, uvicorn_process, worker_process

pytestmark = pytest.mark.e2e


def _claims(log: str) -> list[str]:
    claimed = []
    for line in log.splitlines():
        if '"job.claimed"' in line:
            claimed.append(json.loads(line[line.index("{") :])["job_id"])
    return claimed


def test_two_workers_share_the_queue_and_each_job_trains_once(clean_db, tiny_models, log_dir, tmp_path: Path):
    port = free_port()
    api = uvicorn_process("api", "api.app:create_app", port, log_dir).start()
    workers = [worker_process(f"host{i}", log_dir).start() for i in (1, 2)]
    try:
        api.wait_http(f"http://127.0.0.1:{port}/healthz")
        for worker in workers:
            worker.wait_for_log("ready", timeout=90)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        dataset = write_jsonl(tmp_path / "d.jsonl", alpaca_records(8))
        with dataset.open("rb") as handle:
            file_id = client.post(
                "/v1/files", files={"file": ("d.jsonl", handle)}, data={"purpose": "fine-tune"}
            ).json()["id"]
        job_ids = [
            client.post(
                "/v1/fine_tuning/jobs",
                json={
                    "model": "tiny-llama",
                    "training_file": file_id,
                    "auto_deploy": False,
                    "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
                },
            ).json()["id"]
            for _ in range(4)
        ]
        deadline = time.monotonic() + 300
        jobs: list[dict] = []
        while time.monotonic() < deadline:
            jobs = [client.get(f"/v1/fine_tuning/jobs/{j}").json() for j in job_ids]
            if all(j["status"] in ("succeeded", "failed", "cancelled") for j in jobs):
                break
            time.sleep(1)
        assert [j["status"] for j in jobs] == ["succeeded"] * 4, [j.get("error") for j in jobs]
        claims = [_claims(w.log()) for w in workers]
        assert sorted(claims[0] + claims[1]) == sorted(job_ids)  # each job claimed once, by one worker
        assert claims[0] and claims[1]  # both hosts took work
        assert all(j["attempts"] == 1 for j in jobs)
    finally:
        for process in (api, *workers):
            process.stop()
