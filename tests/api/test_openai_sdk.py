"""The official openai SDK, unchanged, against a real api server process (uvicorn) with authentication on."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from cli.client import ConchClient
from core.db import session_scope
from tests.api.helpers import create_key
from tests.factories import make_checkpoint, make_model, openai_records, write_jsonl
from tests.processes import ServiceProcess, free_port, uvicorn_process

pytestmark = pytest.mark.e2e


@pytest.fixture
def api_server(clean_db: None, queue_name: str, log_dir: Path) -> Iterator[tuple[str, ServiceProcess]]:
    port = free_port()
    server = uvicorn_process("api", "api.app:create_app", port, log_dir, env={"AUTH_REQUIRED": "true"}).start()
    try:
        server.wait_http(f"http://127.0.0.1:{port}/healthz", timeout=60)
        yield f"http://127.0.0.1:{port}/v1", server
    finally:
        server.stop()


def test_openai_sdk_flow(api_server: tuple[str, ServiceProcess], tmp_path: Path) -> None:
    base_url, server = api_server
    key = create_key("sdk-tenant")
    client = OpenAI(base_url=base_url, api_key=key, max_retries=0)

    # Files.
    path = write_jsonl(tmp_path / "train.jsonl", openai_records(8))
    with path.open("rb") as handle:
        uploaded = client.files.create(file=handle, purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.status == "processed"
    assert uploaded.filename == "train.jsonl" and uploaded.bytes == path.stat().st_size
    assert client.files.retrieve(uploaded.id).purpose == "fine-tune"
    assert [f.id for f in client.files.list()] == [uploaded.id]
    assert client.files.content(uploaded.id).content == path.read_bytes()

    # Jobs: create with the OpenAI method shape, retrieve, list (filter and auto-pagination).
    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=uploaded.id,
        suffix="sdk",
        seed=3,
        metadata={"run": "sdk"},
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 0.5}},
        },
    )
    assert job.object == "fine_tuning.job" and job.status == "queued" and job.seed == 3
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 2
    assert job.method is not None and job.method.supervised is not None
    assert job.method.supervised.hyperparameters is not None
    assert job.method.supervised.hyperparameters.learning_rate_multiplier == 0.5
    assert job.metadata == {"run": "sdk"} and job.organization_id == "sdk-tenant"
    second = client.fine_tuning.jobs.create(model="tiny-llama", training_file=uploaded.id)

    retrieved = client.fine_tuning.jobs.retrieve(job.id)
    assert retrieved.id == job.id and retrieved.training_file == uploaded.id
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"run": "sdk"})] == [job.id]
    assert [j.id for j in client.fine_tuning.jobs.list(limit=1)] == [second.id, job.id]

    # Events and checkpoints.
    events = client.fine_tuning.jobs.list_events(job.id, limit=5)
    assert events.data[0].object == "fine_tuning.job.event" and events.data[0].message.startswith("Created")
    with session_scope() as session:
        make_checkpoint(session, uuid.UUID(hex=job.id[6:]), 5, metrics={"train_loss": 0.5})
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id)
    assert [c.step_number for c in checkpoints] == [5]
    assert checkpoints.data[0].metrics.train_loss == 0.5
    assert checkpoints.data[0].fine_tuned_model_checkpoint.endswith(":ckpt-step-5")

    # Cancel a queued job: it never starts.
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    newest = client.fine_tuning.jobs.list_events(job.id, limit=1).data[0]
    assert newest.message == "Job cancelled before it started"
    # The live event stream over a real server, read the way the CLI reads it; it ends with the job.
    cli = ConchClient(base_url.removesuffix("/v1"), "http://127.0.0.1:1", api_key=key)
    streamed = [event["message"] for event in cli.stream_events(job.id)]
    assert streamed[0].startswith("Created") and streamed[-1] == "Job cancelled before it started"

    # Errors arrive as the SDK's typed exceptions, with the envelope's fields.
    with pytest.raises(openai.NotFoundError) as missing:
        client.fine_tuning.jobs.retrieve("ftjob-" + "0" * 32)
    assert missing.value.code == "not_found"
    with pytest.raises(openai.BadRequestError) as bad_model:
        client.fine_tuning.jobs.create(model="gpt-9", training_file=uploaded.id)
    assert bad_model.value.param == "model"
    with pytest.raises(openai.UnprocessableEntityError) as bad_knob:
        client.fine_tuning.jobs.create(model="tiny-llama", training_file=uploaded.id, hyperparameters={"n_epochs": 0})
    assert bad_knob.value.param == "hyperparameters.n_epochs"
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=base_url, api_key="conch-wrong", max_retries=0).models.list()

    # Models.
    assert "tiny-llama" in [m.id for m in client.models.list()]
    assert client.models.retrieve("tiny-llama").owned_by == "conch"
    tuned_id = f"ft:tiny-llama:sdk:{job.id}"
    with session_scope() as session:
        make_model(session, tuned_id, tenant_id="sdk-tenant")
    assert client.models.retrieve(tuned_id).id == tuned_id
    assert client.models.delete(tuned_id).deleted is True

    # The file is free once its jobs are over.
    client.fine_tuning.jobs.cancel(second.id)
    assert client.files.delete(uploaded.id).deleted is True

    server.stop()
    log = server.log()
    assert key not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(line.get("event") == "job.created" for line in lines)
    assert any(line.get("event") == "http.request" and line.get("tenant_id") == "sdk-tenant" for line in lines)
