"""``serve_as`` on a deploy: a fine-tune served as its adapter (INFERENCE_BACKEND=vllm, the default there) or as its
merged weights (every backend). Validated (422 naming the field, nothing written), stored on the deployment row,
shown in the deployment's JSON, and kept by a rollback to that deployment."""

from __future__ import annotations

from fastapi.testclient import TestClient

from core.db import session_scope
from core.ids import Prefix, parse_public_id
from core.orm import Deployment, InferenceReplica, utcnow
from tests.api.helpers import activate_deployment, assert_envelope, count_rows, make_client
from tests.factories import make_model

FT = "ft:tiny-llama:serve:ftjob-s1"
CONTINUED = "ft:tiny-llama:serve2:ftjob-s2"


def _models() -> None:
    with session_scope() as session:
        make_model(session, FT)
        make_model(session, CONTINUED).parent_model = FT  # trained on FT's weights: its adapter is not the base's


def _stored(deployment_id: str) -> str | None:
    with session_scope() as session:
        row = session.get(Deployment, parse_public_id(deployment_id, Prefix.DEPLOYMENT))
        assert row is not None
        return row.serve_as


def _deploy(client: TestClient, model: str, serve_as: str | None = None) -> dict[str, object]:
    body = {"serve_as": serve_as} if serve_as is not None else None
    response = client.post(f"/v1/models/{model}/deploy", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_merged_everywhere_adapter_refused_where_it_cannot_be_honoured(client: TestClient) -> None:
    """The default backend serves merged weights only: merged is the default and accepted, adapter is a 422."""
    _models()
    default = _deploy(client, FT)
    assert default["serve_as"] == "merged" and _stored(str(default["id"])) == "merged"
    merged = _deploy(client, FT, "merged")
    assert merged["serve_as"] == "merged"
    shown = client.get(f"/v1/deployments/{merged['id']}").json()
    assert shown["serve_as"] == "merged"
    assert {d["id"]: d["serve_as"] for d in client.get("/v1/deployments").json()["data"]}[merged["id"]] == "merged"

    before = count_rows(Deployment)
    refused = client.post(f"/v1/models/{FT}/deploy", json={"serve_as": "adapter"})
    error = assert_envelope(refused, 422, param="serve_as")
    assert "INFERENCE_BACKEND" in error["message"]
    for body in ({"serve_as": "quantized"}, {"serve_as": 1}, {"serve": "merged"}):
        assert_envelope(client.post(f"/v1/models/{FT}/deploy", json=body), 422)
    unknown = client.post(f"/v1/models/{FT}/deploy", json={"serve_as": "quantized"}).json()["error"]
    assert "serve_as" in (unknown["param"] or "")
    assert count_rows(Deployment) == before  # nothing written


def test_adapter_is_the_default_on_vllm_where_the_adapter_fits_a_base(clean_db: None) -> None:
    with make_client(INFERENCE_BACKEND="vllm") as client:
        _models()
        default = _deploy(client, FT)
        assert default["serve_as"] == "adapter" and _stored(str(default["id"])) == "adapter"
        assert _deploy(client, FT, "merged")["serve_as"] == "merged"
        assert _deploy(client, FT, "adapter")["serve_as"] == "adapter"
        # A continued fine-tune's adapter applies to its parent's weights: merged by default, adapter refused.
        assert _deploy(client, CONTINUED)["serve_as"] == "merged"
        error = assert_envelope(
            client.post(f"/v1/models/{CONTINUED}/deploy", json={"serve_as": "adapter"}), 422, param="serve_as"
        )
        assert FT in error["message"]
        # A base model is its own weights.
        assert _deploy(client, "tiny-qwen2")["serve_as"] == "merged"
        assert_envelope(
            client.post("/v1/models/tiny-qwen2/deploy", json={"serve_as": "adapter"}), 422, param="serve_as"
        )


def test_a_live_vllm_replica_serves_adapters_whatever_the_apis_own_backend(client: TestClient) -> None:
    """As in ``docker compose --profile vllm``: the api on the default backend, a vLLM replica beside it (it
    advertises its VLLM_MAX_LORA_RANK in its heartbeat)."""
    _models()
    assert _deploy(client, FT)["serve_as"] == "merged"
    with session_scope() as session:
        now = utcnow()
        session.add(InferenceReplica(replica_id="vllm-gpu0", started_at=now, heartbeat_at=now, max_lora_rank=8))
    assert _deploy(client, FT)["serve_as"] == "adapter"
    assert _deploy(client, FT, "adapter")["serve_as"] == "adapter"


def test_the_same_idempotency_key_with_another_serve_as_is_another_request(clean_db: None) -> None:
    with make_client(INFERENCE_BACKEND="vllm") as client:
        _models()
        headers = {"Idempotency-Key": "deploy-serve-1"}
        first = client.post(f"/v1/models/{FT}/deploy", json={"serve_as": "merged"}, headers=headers)
        again = client.post(f"/v1/models/{FT}/deploy", json={"serve_as": "merged"}, headers=headers)
        assert first.status_code == again.status_code == 200 and first.json()["id"] == again.json()["id"]
        other = client.post(f"/v1/models/{FT}/deploy", json={"serve_as": "adapter"}, headers=headers)
        assert other.status_code >= 400  # the key was used for a different request
        assert count_rows(Deployment) == 1


def test_rollback_keeps_the_way_the_deployment_it_returns_to_served(clean_db: None) -> None:
    with make_client(INFERENCE_BACKEND="vllm") as client:
        _models()
        activate_deployment(str(_deploy(client, FT, "merged")["id"]))
        activate_deployment(str(_deploy(client, "tiny-qwen2")["id"]))
        back = client.post("/v1/deployments/rollback").json()
        assert back["model"] == FT and back["serve_as"] == "merged"  # not the adapter, vLLM's default
        activate_deployment(str(back["id"]))
        # The same model served the other way is a step of its own: rolling back returns to the first way.
        activate_deployment(str(_deploy(client, FT, "adapter")["id"]))
        back = client.post(f"/v1/models/{FT}/rollback").json()
        assert back["model"] == FT and back["serve_as"] == "merged"
        activate_deployment(str(back["id"]))
        back = client.post("/v1/deployments/rollback").json()
        assert back["model"] == "tiny-llama" and back["serve_as"] == "merged"
