"""/v1/models (base and fine-tuned with lineage), delete, deploy with its pub/sub announcement, rollback, and
/v1/deployments."""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from fastapi.testclient import TestClient

from core.db import session_scope
from core.orm import Deployment, ModelRecord
from core.settings import get_settings
from tests.api.helpers import assert_envelope, count_rows
from tests.factories import make_deployment, make_model, minutes_ago

FT = "ft:tiny-llama:persona:ftjob-" + "a" * 32


def test_list_shows_base_and_fine_tuned_with_lineage(client: TestClient) -> None:
    with session_scope() as session:
        make_model(session, FT)
        make_model(session, "ft:tiny-llama:other-tenant:x", tenant_id="acme")
        make_deployment(session, FT, status="active", activated_at=minutes_ago(1))
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert set(get_settings().base_models) | {FT} == set(models)
    base = models["tiny-llama"]
    assert base["object"] == "model" and base["owned_by"] == "conch"
    assert base["conch"]["kind"] == "base" and isinstance(base["conch"]["prepared"], bool)
    assert base["conch"]["default"] is True and base["conch"]["deployed"] is False
    tuned = models[FT]["conch"]
    assert tuned["kind"] == "fine-tuned" and tuned["base_model"] == "tiny-llama"
    assert tuned["dataset_sha256"] == "ab" * 32 and tuned["metrics"] == {"train_loss": 1.25}
    assert tuned["deployed"] is True
    assert isinstance(models[FT]["created"], int)


def test_retrieve_by_id_with_colons(client: TestClient) -> None:
    with session_scope() as session:
        make_model(session, FT)
    assert client.get(f"/v1/models/{FT}").json()["id"] == FT
    assert client.get("/v1/models/tiny-qwen2").json()["conch"]["kind"] == "base"
    assert_envelope(client.get("/v1/models/ft:tiny-llama:nope:ftjob-0"), 404)
    assert_envelope(client.get("/v1/models/a/b/c"), 404)


def test_delete_fine_tuned_model(client: TestClient) -> None:
    artifacts = get_settings().artifacts / "models" / "delete-me"
    (artifacts / "weights").mkdir(parents=True, exist_ok=True)
    (artifacts / "weights" / "model.safetensors").write_bytes(b"x")
    with session_scope() as session:
        make_model(session, FT, storage_path=str(artifacts))
    assert client.delete(f"/v1/models/{FT}").json() == {"id": FT, "object": "model", "deleted": True}
    assert count_rows(ModelRecord) == 0
    assert not artifacts.exists()
    assert_envelope(client.delete(f"/v1/models/{FT}"), 404)
    assert_envelope(client.delete("/v1/models/tiny-llama"), 400, param="model")


def test_deleting_the_deployed_model_is_refused(client: TestClient) -> None:
    with session_scope() as session:
        make_model(session, FT)
        make_model(session, FT + "-2")
        make_deployment(session, FT, status="active", activated_at=minutes_ago(1))
        make_deployment(session, FT + "-2", status="loading")
    assert_envelope(client.delete(f"/v1/models/{FT}"), 409, code="model_deployed")
    assert_envelope(client.delete(f"/v1/models/{FT}-2"), 409, code="model_deploying")
    assert count_rows(ModelRecord) == 2


def _next_message(pubsub: Any, timeout: float = 10.0) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if message is not None:
            return dict(json.loads(message["data"]))
    return None


def test_deploy_records_and_announces(client: TestClient, redis_client: redis.Redis) -> None:
    with session_scope() as session:
        make_model(session, FT)
        make_model(session, FT + "-broken", status="failed")
    pubsub = redis_client.pubsub()
    pubsub.subscribe(get_settings().deployments_channel)
    try:
        response = client.post(f"/v1/models/{FT}/deploy")
        assert response.status_code == 200, response.text
        deployment = response.json()
        assert deployment["object"] == "deployment" and deployment["id"].startswith("deploy-")
        assert deployment["model"] == FT and deployment["status"] == "pending"
        announced = _next_message(pubsub)
    finally:
        pubsub.close()
    assert announced is not None
    assert announced["model_id"] == FT and announced["tenant_id"] == "default"
    assert f"deploy-{announced['deployment_id'].replace('-', '')}" == deployment["id"]

    assert client.get(f"/v1/deployments/{deployment['id']}").json() == deployment
    assert client.post("/v1/models/tiny-llama/deploy").json()["model"] == "tiny-llama"
    assert_envelope(client.post("/v1/models/ft:nope/deploy"), 404)
    assert_envelope(client.post(f"/v1/models/{FT}-broken/deploy"), 409, code="model_not_ready")
    assert count_rows(Deployment) == 2


def test_deploy_is_idempotent_with_a_key(client: TestClient) -> None:
    with session_scope() as session:
        make_model(session, FT)
    first = client.post(f"/v1/models/{FT}/deploy", headers={"Idempotency-Key": "d1"}).json()
    again = client.post(f"/v1/models/{FT}/deploy", headers={"Idempotency-Key": "d1"}).json()
    assert first == again and count_rows(Deployment) == 1


def test_rollback_deploys_the_previous_good_model(client: TestClient) -> None:
    with session_scope() as session:
        make_model(session, FT)
        make_model(session, FT + "-v2")
        make_deployment(session, FT, status="superseded", activated_at=minutes_ago(10))
        make_deployment(session, FT + "-v2", status="active", activated_at=minutes_ago(1))
    by_model = client.post(f"/v1/models/{FT}-v2/rollback")
    assert by_model.status_code == 200, by_model.text
    assert by_model.json()["model"] == FT and by_model.json()["status"] == "pending"
    assert by_model.json()["requested_by"].startswith("rollback:")
    active = client.post("/v1/deployments/rollback")
    assert active.json()["model"] == FT

    listed = client.get("/v1/deployments").json()
    assert listed["object"] == "list" and len(listed["data"]) == 4
    assert listed["data"][0]["id"] == active.json()["id"]
    page = client.get("/v1/deployments", params={"limit": 3}).json()
    assert page["has_more"] is True
    rest = client.get("/v1/deployments", params={"after": page["data"][-1]["id"]}).json()
    assert len(rest["data"]) == 1 and rest["has_more"] is False


def test_rollback_with_nothing_before_is_409(client: TestClient) -> None:
    assert_envelope(client.post("/v1/deployments/rollback"), 409, code="nothing_to_roll_back")
    with session_scope() as session:
        make_model(session, FT)
        make_deployment(session, FT, status="active", activated_at=minutes_ago(1))
    # Before the first deployment the default base model served: that is what a first rollback returns to.
    assert client.post(f"/v1/models/{FT}/rollback").json()["model"] == "tiny-llama"
    assert_envelope(client.post("/v1/models/tiny-llama/rollback"), 409, code="nothing_to_roll_back")
    assert_envelope(client.post(f"/v1/models/{FT}-never-served/rollback"), 409, code="nothing_to_roll_back")
    assert_envelope(client.get("/v1/deployments/deploy-" + "0" * 32), 404)
    assert_envelope(client.get("/v1/deployments/garbage"), 404)
