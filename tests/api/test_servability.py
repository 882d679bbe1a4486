"""The servability gate at creation: with INFERENCE_BACKEND=vllm a job whose adapter the vLLM servers would refuse
(a rank above VLLM_MAX_LORA_RANK, a target module the model class takes no LoRA on, a base model of a type vLLM
serves no adapters on) is refused, a 422 naming the field with code not_servable, with no row and nothing queued.
The other backends serve merged weights and accept them all."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import update

from core import deployments
from core.db import session_scope
from core.orm import FineTuningJob, InferenceReplica, utcnow
from tests.api.helpers import assert_envelope, count_rows, make_client
from tests.factories import alpaca_records, jsonl

# Base models by their config.json alone (the api reads nothing else of them): a Llama, a GPTBigCode (served by
# vLLM's Transformers backend, whose linear layers are c_attn, c_proj and c_fc) and a GPT-2 (no LoRA on vLLM).
BASES = {"tiny-llama": "llama", "tiny-bigcode": "gpt_bigcode", "tiny-gpt2": "gpt2"}


def _client(tmp_path: Path, backend: str) -> Iterator[TestClient]:
    models: dict[str, str] = {}
    for name, model_type in BASES.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": model_type, "num_hidden_layers": 2}))
        models[name] = str(folder)
    with make_client(BASE_MODELS=json.dumps(models), INFERENCE_BACKEND=backend, VLLM_MAX_LORA_RANK="8") as client:
        yield client


@pytest.fixture
def vllm_client(clean_db: None, queue_name: str, tmp_path: Path) -> Iterator[TestClient]:
    yield from _client(tmp_path, "vllm")


@pytest.fixture
def lean_client(clean_db: None, queue_name: str, tmp_path: Path) -> Iterator[TestClient]:
    yield from _client(tmp_path, "lean")


def _create(
    client: TestClient, knobs: dict[str, object], *, where: str = "method", model: str = "tiny-llama"
) -> object:
    upload = client.post(
        "/v1/files",
        files={"file": ("train.jsonl", jsonl(alpaca_records(8)), "application/octet-stream")},
        data={"purpose": "fine-tune"},
    )
    assert upload.status_code == 200, upload.text
    body: dict[str, object] = {"model": model, "training_file": upload.json()["id"]}
    if where == "method":
        body["method"] = {"type": "supervised", "supervised": {"hyperparameters": knobs}}
    else:
        body["hyperparameters"] = knobs
    return client.post("/v1/fine_tuning/jobs", json=body)


@pytest.mark.parametrize(
    ("where", "param"),
    [("method", "method.supervised.hyperparameters.lora_rank"), ("top", "hyperparameters.lora_rank")],
)
def test_a_rank_above_the_vllm_limit_is_refused_at_creation(
    vllm_client: TestClient, redis_client: redis.Redis, queue_name: str, where: str, param: str
) -> None:
    response = _create(vllm_client, {"lora_rank": 16}, where=where)
    assert_envelope(response, 422, param=param, code="not_servable")
    assert "VLLM_MAX_LORA_RANK" in response.json()["error"]["message"]  # type: ignore[attr-defined]
    assert count_rows(FineTuningJob) == 0
    assert redis_client.llen(queue_name) == 0


def test_a_rank_within_the_limit_is_accepted(vllm_client: TestClient) -> None:
    response = _create(vllm_client, {"lora_rank": 8})
    assert response.status_code == 200, response.text  # type: ignore[attr-defined]


@pytest.mark.parametrize("where", ["method", "top"])
def test_a_target_module_vllm_takes_no_lora_on_is_refused_at_creation(
    vllm_client: TestClient, redis_client: redis.Redis, queue_name: str, where: str
) -> None:
    # No table of the api's lora_target check knows GPTBigCode, so it passes q_proj on; vLLM would refuse it.
    response = _create(vllm_client, {"lora_target": "c_attn,q_proj"}, where=where, model="tiny-bigcode")
    prefix = "method.supervised.hyperparameters" if where == "method" else "hyperparameters"
    assert_envelope(response, 422, param=f"{prefix}.lora_target", code="not_servable")
    message = response.json()["error"]["message"]  # type: ignore[attr-defined]
    assert "'q_proj'" in message and "c_attn" in message and "'c_attn'" not in message
    assert count_rows(FineTuningJob) == 0
    assert redis_client.llen(queue_name) == 0


def test_targets_and_paths_vllm_takes_lora_on_are_accepted(vllm_client: TestClient) -> None:
    for model, target in [("tiny-bigcode", "attn.c_attn,c_fc"), ("tiny-bigcode", "all"), ("tiny-llama", "all")]:
        response = _create(vllm_client, {"lora_target": target}, model=model)
        assert response.status_code == 200, response.text  # type: ignore[attr-defined]
    response = _create(vllm_client, {"lora_target": "model.layers.1.self_attn.q_proj,mlp.down_proj"})
    assert response.status_code == 200, response.text  # type: ignore[attr-defined]


def test_a_base_model_vllm_serves_no_adapters_on_is_refused_at_creation(
    vllm_client: TestClient, redis_client: redis.Redis, queue_name: str
) -> None:
    response = _create(vllm_client, {"lora_target": "c_attn"}, model="tiny-gpt2")
    assert_envelope(response, 422, param="model", code="not_servable")
    assert "'gpt2'" in response.json()["error"]["message"]  # type: ignore[attr-defined]
    assert count_rows(FineTuningJob) == 0
    assert redis_client.llen(queue_name) == 0


def test_the_first_problem_is_the_one_named(vllm_client: TestClient) -> None:
    response = _create(vllm_client, {"lora_rank": 16, "lora_target": "q_proj"}, model="tiny-gpt2")
    assert_envelope(response, 422, param="model", code="not_servable")
    response = _create(vllm_client, {"lora_rank": 16, "lora_target": "q_proj"}, model="tiny-bigcode")
    assert_envelope(response, 422, param="method.supervised.hyperparameters.lora_rank", code="not_servable")


def test_other_backends_serve_merged_models_whatever_the_adapter(lean_client: TestClient) -> None:
    for model, knobs in [
        ("tiny-llama", {"lora_rank": 16}),
        ("tiny-bigcode", {"lora_target": "q_proj"}),
        ("tiny-gpt2", {"lora_target": "c_attn"}),
    ]:
        response = _create(lean_client, knobs, model=model)
        assert response.status_code == 200, response.text  # type: ignore[attr-defined]


def test_a_live_vllm_replica_holds_an_api_on_another_backend_to_its_limit(
    lean_client: TestClient, redis_client: redis.Redis, queue_name: str
) -> None:
    """As in ``docker compose --profile vllm``: the api and the workers keep their backend, the vLLM replica
    advertises its VLLM_MAX_LORA_RANK in its heartbeat, and new jobs are held to the lowest live one."""
    with session_scope() as session:
        deployments.heartbeat(session, "vllm-gpu0", max_lora_rank=8)
        deployments.heartbeat(session, "vllm-gpu1", max_lora_rank=32)
        deployments.heartbeat(session, "merged-only")  # serves merged weights: no limit
    response = _create(lean_client, {"lora_rank": 16})
    assert_envelope(response, 422, param="method.supervised.hyperparameters.lora_rank", code="not_servable")
    assert "inference replica 'vllm-gpu0'" in response.json()["error"]["message"]  # type: ignore[attr-defined]
    assert count_rows(FineTuningJob) == 0 and redis_client.llen(queue_name) == 0
    # The target modules are held to vLLM's too, though this api's own backend would take any.
    assert_envelope(_create(lean_client, {"lora_target": "c_attn"}, model="tiny-gpt2"), 422, code="not_servable")

    # A replica that stopped beating (or left) no longer constrains: the other one's limit is the one now.
    with session_scope() as session:
        session.execute(
            update(InferenceReplica)
            .where(InferenceReplica.replica_id == "vllm-gpu0")
            .values(heartbeat_at=utcnow() - timedelta(hours=1))
        )
    assert _create(lean_client, {"lora_rank": 16}).status_code == 200  # type: ignore[attr-defined]
    with session_scope() as session:
        deployments.leave(session, "vllm-gpu1")
    assert _create(lean_client, {"lora_rank": 64}).status_code == 200  # type: ignore[attr-defined]


def test_the_serving_limit_is_one_vllm_accepts() -> None:
    from pydantic import ValidationError

    from core.settings import Settings

    assert Settings(vllm_max_lora_rank=16).vllm_max_lora_rank == 16
    with pytest.raises(ValidationError, match="vllm_max_lora_rank"):
        Settings(vllm_max_lora_rank=12)  # vLLM's server would refuse to start with it
