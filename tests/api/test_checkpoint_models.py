"""A fine-tuned model's checkpoints are models of their own in ``/v1/models`` (``<model id>:ckpt-step-N``), for as
long as the model they belong to, and only for its tenant."""

from __future__ import annotations

from fastapi.testclient import TestClient

from core import deployments
from core.contracts import JobStatus
from core.db import session_scope
from tests.api.helpers import assert_envelope
from tests.factories import make_checkpoint, make_job, make_model

FT = "ft:tiny-llama:persona:ftjob-" + "c" * 32


def _publish_with_checkpoints(tenant_id: str = "default") -> None:
    with session_scope() as session:
        job = make_job(session, tenant_id=tenant_id, status=JobStatus.SUCCEEDED, fine_tuned_model=FT)
        make_checkpoint(session, job.id, 5, metrics={"train_loss": 1.5})
        make_checkpoint(session, job.id, 10, metrics={"train_loss": 1.1})
        make_model(session, FT, tenant_id=tenant_id)


def test_each_checkpoint_is_listed_after_its_model_newest_first(client: TestClient) -> None:
    _publish_with_checkpoints()
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    at = ids.index(FT)
    assert ids[at : at + 3] == [FT, f"{FT}:ckpt-step-10", f"{FT}:ckpt-step-5"]
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    conch = listed[f"{FT}:ckpt-step-5"]["conch"]
    assert conch["kind"] == "checkpoint" and conch["parent_model"] == FT and conch["step"] == 5
    assert conch["base_model"] == "tiny-llama" and conch["metrics"] == {"train_loss": 1.5}
    assert conch["job_id"].startswith("ftjob-")
    # The tests' services serve merged weights (no adapter loads): a checkpoint is for continuing from there.
    assert conch["servable"] is False


def test_a_checkpoint_is_retrieved_by_its_id(client: TestClient) -> None:
    _publish_with_checkpoints()
    got = client.get(f"/v1/models/{FT}:ckpt-step-10")
    assert got.status_code == 200, got.text
    assert got.json()["id"] == f"{FT}:ckpt-step-10" and got.json()["conch"]["step"] == 10
    assert_envelope(client.get(f"/v1/models/{FT}:ckpt-step-7"), 404, param="model")


def test_another_tenants_checkpoints_are_not_listed_or_found(client: TestClient) -> None:
    _publish_with_checkpoints(tenant_id="acme")
    assert not [m for m in client.get("/v1/models").json()["data"] if m["id"].startswith(FT)]
    assert_envelope(client.get(f"/v1/models/{FT}:ckpt-step-10"), 404, param="model")


def test_a_checkpoint_is_deleted_with_its_model_not_alone(client: TestClient) -> None:
    _publish_with_checkpoints()
    assert_envelope(client.delete(f"/v1/models/{FT}:ckpt-step-10"), 400, param="model")
    assert client.get(f"/v1/models/{FT}:ckpt-step-10").status_code == 200
    assert client.delete(f"/v1/models/{FT}").status_code == 200
    assert not [m for m in client.get("/v1/models").json()["data"] if m["id"].startswith(FT)]


def test_a_checkpoint_is_servable_once_a_live_replica_serves_adapters(client: TestClient) -> None:
    """The api's own INFERENCE_BACKEND serves merged weights; a vLLM replica beside it (its heartbeat advertising
    its LoRA rank limit) answers checkpoints as adapters, listed and retrieved alike."""
    _publish_with_checkpoints()
    with session_scope() as session:
        deployments.heartbeat(session, "merged-only")
    assert client.get(f"/v1/models/{FT}:ckpt-step-10").json()["conch"]["servable"] is False
    with session_scope() as session:
        deployments.heartbeat(session, "vllm-gpu0", max_lora_rank=16)
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert listed[f"{FT}:ckpt-step-5"]["conch"]["servable"] is True
    assert client.get(f"/v1/models/{FT}:ckpt-step-10").json()["conch"]["servable"] is True
