"""A model's end of life and a job's point of no return, raced for real on Postgres: delete against deploy, the
artifacts a delete removes, rollback through history, and a cancel against the publish that ends a job."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select, update

from api.services import models as service
from core.contracts import JobStatus
from core.db import get_sessionmaker, session_scope
from core.jobs import claim, finish
from core.orm import Checkpoint, Deployment, FineTuningJob, ModelRecord
from core.settings import get_settings
from core.storage import fine_tuned_dir, job_dir
from tests.api.helpers import activate_deployment, assert_envelope, count_rows
from tests.factories import make_checkpoint, make_deployment, make_job, make_model, minutes_ago

FT = "ft:tiny-llama:persona:ftjob-" + "b" * 32
BLOCKED_SECONDS = 1.5  # how long a request must stay blocked on the other transaction's lock to count as waiting


def _in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def run() -> None:
        result["response"] = call()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def _still_waiting(thread: threading.Thread) -> bool:
    thread.join(BLOCKED_SECONDS)
    return thread.is_alive()


# ------------------------------------------------------------------------------------------------ delete vs deploy


def test_a_deploy_waits_for_a_delete_in_progress_and_then_finds_no_model(client: TestClient) -> None:
    with session_scope() as session:
        make_model(session, FT)
    settings = get_settings()
    deleting = get_sessionmaker()()
    try:
        service.delete_model(deleting, "default", FT, settings)  # holds the row lock, not yet committed
        thread, result = _in_thread(lambda: client.post(f"/v1/models/{FT}/deploy"))
        assert _still_waiting(thread), "the deploy did not wait for the delete"
        deleting.commit()
    finally:
        deleting.close()
    thread.join(30)
    assert_envelope(result["response"], 404, param="model")
    assert count_rows(Deployment) == 0 and count_rows(ModelRecord) == 0


def test_a_delete_waits_for_a_deploy_in_progress_and_then_refuses(client: TestClient) -> None:
    with session_scope() as session:
        make_model(session, FT)
    settings = get_settings()
    deploying = get_sessionmaker()()
    try:
        service.deploy(deploying, tenant_id="default", model_id=FT, actor="test", settings=settings)
        thread, result = _in_thread(lambda: client.delete(f"/v1/models/{FT}"))
        assert _still_waiting(thread), "the delete did not wait for the deploy"
        deploying.commit()
    finally:
        deploying.close()
    thread.join(30)
    assert_envelope(result["response"], 409, code="model_deploying")
    assert count_rows(ModelRecord) == 1 and count_rows(Deployment) == 1


# ------------------------------------------------------------------------------------------------ artifacts


def test_delete_removes_the_model_folder_checkpoints_and_cached_exports(client: TestClient, tmp_path: Path) -> None:
    settings = get_settings()
    outside = tmp_path / "not-ours.bin"
    outside.write_bytes(b"keep")
    with session_scope() as session:
        job = make_job(session, status=JobStatus.SUCCEEDED)
        folder = fine_tuned_dir(job.id, settings)
        (folder / "adapter").mkdir(parents=True, exist_ok=True)
        (folder / "model.safetensors").write_bytes(b"w")
        (folder / "model.f16.gguf").write_bytes(b"g")  # serving files published with the model
        checkpoint = job_dir(job.id, settings) / "checkpoints" / "step-4"
        checkpoint.mkdir(parents=True, exist_ok=True)
        (checkpoint / "adapter.safetensors").write_bytes(b"c")
        make_checkpoint(session, job.id, 4).storage_path = str(checkpoint)
        make_checkpoint(session, job.id, 8).storage_path = str(outside)  # a row naming a path outside the root
        row = make_model(session, FT, storage_path=folder)
        row.job_id = job.id
        row.adapter_path = str(folder / "adapter")
        job_id = job.id
    cache = settings.gguf_cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    exports = [cache / f"{folder.name}-0123abcd.q8_0.gguf", cache / f"{folder.name}-0123abcd.reference.json"]
    other = cache / f"{'c' * 32}-0123abcd.q8_0.gguf"
    for path in [*exports, other]:
        path.write_bytes(b"x")
    try:
        assert client.get(f"/v1/fine_tuning/jobs/ftjob-{job_id.hex}/checkpoints").json()["data"]
        assert client.delete(f"/v1/models/{FT}").status_code == 200
        assert not folder.exists() and not job_dir(job_id, settings).exists()
        assert not any(path.exists() for path in exports)
        assert other.exists() and outside.exists()  # another model's export and a path outside the root stay
        assert count_rows(Checkpoint) == 0
        assert client.get(f"/v1/fine_tuning/jobs/ftjob-{job_id.hex}/checkpoints").json()["data"] == []
        assert_envelope(client.get(f"/v1/models/{FT}"), 404)
        assert FT not in {m["id"] for m in client.get("/v1/models").json()["data"]}
    finally:
        other.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ rollback


def _rollback(client: TestClient) -> str:
    response = client.post("/v1/deployments/rollback")
    assert response.status_code == 200, response.text
    activate_deployment(response.json()["id"])
    return str(response.json()["model"])


def test_repeated_rollbacks_walk_back_to_the_base_model(client: TestClient) -> None:
    a, b, c = FT + "-a", FT + "-b", FT + "-c"
    with session_scope() as session:
        for model in (a, b, c):
            make_model(session, model)
    for model in (a, b, c):
        response = client.post(f"/v1/models/{model}/deploy")
        activate_deployment(response.json()["id"])
        time.sleep(0.01)  # distinct activation times
    assert [_rollback(client) for _ in range(3)] == [b, a, "tiny-llama"]
    assert_envelope(client.post("/v1/deployments/rollback"), 409, code="nothing_to_roll_back")
    # A deploy after rollbacks starts a new branch of history; rolling back from it returns to the base model.
    activate_deployment(client.post(f"/v1/models/{c}/deploy").json()["id"])
    assert _rollback(client) == "tiny-llama"


def test_rollback_skips_deleted_models(client: TestClient) -> None:
    a, b, c = FT + "-a", FT + "-b", FT + "-c"
    with session_scope() as session:
        for model in (a, b, c):
            make_model(session, model)
        make_deployment(session, a, status="superseded", activated_at=minutes_ago(30))
        make_deployment(session, b, status="superseded", activated_at=minutes_ago(20))
        make_deployment(session, c, status="active", activated_at=minutes_ago(10))
    assert client.delete(f"/v1/models/{b}").status_code == 200
    assert client.post("/v1/deployments/rollback").json()["model"] == a
    with session_scope() as session:  # that rollback failed to load, so ``a`` can be deleted too
        session.execute(
            update(Deployment).where(Deployment.model_id == a, Deployment.status == "pending").values(status="failed")
        )
    assert client.delete(f"/v1/models/{a}").status_code == 200
    assert client.post(f"/v1/models/{c}/rollback").json()["model"] == "tiny-llama"


# ------------------------------------------------------------------------------------------------ cancel vs publish


def test_a_cancel_that_loses_to_the_publish_is_refused_with_409(client: TestClient) -> None:
    with session_scope() as session:
        job = make_job(session)
        job_id = job.id
    with session_scope() as session:
        assert claim(session, job_id, "w", lease_seconds=60)
    publishing = get_sessionmaker()()
    try:
        # The publish transaction has written the success (and holds the job's row) but not committed yet.
        assert finish(publishing, job_id, JobStatus.SUCCEEDED, owner="w", message="done")
        publishing.flush()
        thread, result = _in_thread(lambda: client.post(f"/v1/fine_tuning/jobs/ftjob-{job_id.hex}/cancel"))
        assert _still_waiting(thread), "the cancel did not wait for the publish"
        publishing.commit()
    finally:
        publishing.close()
    thread.join(30)
    assert_envelope(result["response"], 409, code="job_finished")
    with session_scope() as session:
        status, flagged = session.execute(
            select(FineTuningJob.status, FineTuningJob.cancel_requested).where(FineTuningJob.id == job_id)
        ).one()
    assert status == JobStatus.SUCCEEDED and flagged is False
