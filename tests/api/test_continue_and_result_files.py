"""Creating a job that continues a fine-tuned model or checkpoint (this tenant's only), lineage in /v1/models,
and a job's result files through /v1/files (metadata, typed content, delete)."""

from __future__ import annotations

import csv
import io
from typing import Any

import redis
from fastapi.testclient import TestClient

from core.db import session_scope
from core.orm import FileObject, FineTuningJob, ModelRecord
from core.settings import get_settings
from tests.api.helpers import assert_envelope, count_rows, job_uuid, queued_messages
from tests.factories import make_checkpoint, make_file, make_job, make_model
from worker.pipeline.results import COLUMNS, write_result_files

OURS = "ft:tiny-llama:ours:ftjob-" + "a" * 32
THEIRS = "ft:tiny-llama:theirs:ftjob-" + "b" * 32


def published(model_id: str, tenant_id: str = "default", *, parent: str | None = None) -> None:
    """A succeeded job that published ``model_id``, with a checkpoint at step 4."""
    with session_scope() as session:
        job = make_job(session, tenant_id=tenant_id, status="succeeded", fine_tuned_model=model_id)
        make_checkpoint(session, job.id, 4)
        record = make_model(session, model_id, tenant_id=tenant_id)
        record.job_id, record.parent_model = job.id, parent


def create(client: TestClient, training_file: str, model: str) -> Any:
    return client.post("/v1/fine_tuning/jobs", json={"model": model, "training_file": training_file})


def test_a_job_continues_this_tenants_fine_tune_or_checkpoint_only(
    client: TestClient, training_file: str, redis_client: redis.Redis, queue_name: str
) -> None:
    published(OURS)
    published(THEIRS, "acme")
    before = count_rows(FineTuningJob)
    for model in (THEIRS, f"{THEIRS}:ckpt-step-4", f"{OURS}:ckpt-step-5", "ft:tiny-llama:x:ftjob-0", "nope"):
        error = assert_envelope(create(client, training_file, model), 400, param="model", code="model_not_found")
        assert model in error["message"] and "acme" not in error["message"]
    assert count_rows(FineTuningJob) == before and queued_messages(redis_client, queue_name) == []

    for model in (OURS, f"{OURS}:ckpt-step-4"):
        response = create(client, training_file, model)
        assert response.status_code == 200, response.text
        job = response.json()
        assert job["model"] == model and job["result_files"] == []
        with session_scope() as session:
            row = session.get(FineTuningJob, job_uuid(job["id"]))
            assert row is not None and row.model == model and row.base_model == "tiny-llama"
    assert len(queued_messages(redis_client, queue_name)) == 2

    # The parent cannot be deleted while a job trains from it.
    assert_envelope(client.delete(f"/v1/models/{OURS}"), 409, code="model_in_use")


def test_lineage_lists_every_generation_down_to_the_parent(client: TestClient) -> None:
    child = "ft:tiny-llama:child:ftjob-" + "c" * 32
    grandchild = "ft:tiny-llama:grand:ftjob-" + "d" * 32
    published(OURS)
    published(child, parent=OURS)
    published(grandchild, parent=f"{child}:ckpt-step-4")
    conch = client.get(f"/v1/models/{grandchild}").json()["conch"]
    assert conch["parent_model"] == f"{child}:ckpt-step-4" and conch["base_model"] == "tiny-llama"
    assert conch["lineage"] == ["tiny-llama", OURS, child, f"{child}:ckpt-step-4"]
    listed = {m["id"]: m["conch"] for m in client.get("/v1/models").json()["data"]}
    assert listed[grandchild]["lineage"] == conch["lineage"] and listed[OURS]["lineage"] == ["tiny-llama"]
    # A deleted ancestor still shows by its id; the chain then goes straight to the root base.
    assert client.delete(f"/v1/models/{child}").status_code == 200
    assert client.get(f"/v1/models/{grandchild}").json()["conch"]["lineage"] == [
        "tiny-llama",
        child,
        f"{child}:ckpt-step-4",
    ]


def test_result_files_are_served_typed_and_deletable(client: TestClient) -> None:
    from PIL import Image  # comes with matplotlib (the worker extra)

    events = [{"step": s, "loss": 2.0 / s, "token_accuracy": 0.1 * s} for s in range(1, 5)]
    events.append({"step": 4, "eval_loss": 0.7, "eval_token_accuracy": 0.4})
    written = write_result_files(events, "a job", get_settings())
    with session_scope() as session:
        job = make_job(session, status="succeeded", fine_tuned_model=OURS)
        for result in written:
            session.add(result.row(job.tenant_id, job.public_id))
        job.result_files = [r.public_id for r in written]
        job_id = job.public_id
    csv_id, png_id = (r.public_id for r in written)
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["result_files"] == [csv_id, png_id]

    meta = client.get(f"/v1/files/{png_id}").json()
    assert meta["purpose"] == "fine-tune-results" and meta["filename"] == "loss_curve.png"
    listed = client.get("/v1/files", params={"purpose": "fine-tune-results"}).json()["data"]
    assert {f["id"] for f in listed} == {csv_id, png_id}

    picture = client.get(f"/v1/files/{png_id}/content")
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(picture.content)) as image:
        assert image.format == "PNG" and image.size == (800, 450)
    table = client.get(f"/v1/files/{csv_id}/content")
    assert table.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(table.text)))
    assert tuple(rows[0]) == COLUMNS and len(rows) == 5
    assert rows[4] == ["4", "0.5", "0.4", "0.7", "0.4"] and rows[1][3:] == ["", ""]

    # Deleting one drops it from the job's result_files, as OpenAI allows.
    assert client.delete(f"/v1/files/{png_id}").json()["deleted"] is True
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["result_files"] == [csv_id]
    assert not written[1].path.exists()
    with session_scope() as session:
        assert session.get(FileObject, written[1].id) is None
    assert count_rows(ModelRecord) == 0


def test_a_dataset_still_downloads_as_plain_bytes(client: TestClient) -> None:
    with session_scope() as session:
        file_id = make_file(session).public_id
    response = client.get(f"/v1/files/{file_id}/content")
    assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
