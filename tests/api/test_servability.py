"""The servability gate: with INFERENCE_BACKEND=vllm a job whose adapter the vLLM servers would refuse (a rank
above VLLM_MAX_LORA_RANK) is refused at creation, a 422 naming the field, with no row and nothing queued."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from core.orm import FineTuningJob
from tests.api.helpers import assert_envelope, count_rows, make_client
from tests.factories import alpaca_records, jsonl


def _client(tmp_path: Path, backend: str) -> Iterator[TestClient]:
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    models = json.dumps({"tiny-llama": str(folder)})
    with make_client(BASE_MODELS=models, INFERENCE_BACKEND=backend, VLLM_MAX_LORA_RANK="8") as client:
        yield client


@pytest.fixture
def vllm_client(clean_db: None, queue_name: str, tmp_path: Path) -> Iterator[TestClient]:
    yield from _client(tmp_path, "vllm")


@pytest.fixture
def lean_client(clean_db: None, queue_name: str, tmp_path: Path) -> Iterator[TestClient]:
    yield from _client(tmp_path, "lean")


def _create(client: TestClient, knobs: dict[str, object], *, where: str = "method") -> object:
    upload = client.post(
        "/v1/files",
        files={"file": ("train.jsonl", jsonl(alpaca_records(8)), "application/octet-stream")},
        data={"purpose": "fine-tune"},
    )
    assert upload.status_code == 200, upload.text
    body: dict[str, object] = {"model": "tiny-llama", "training_file": upload.json()["id"]}
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


def test_other_backends_serve_merged_models_whatever_the_rank(lean_client: TestClient) -> None:
    response = _create(lean_client, {"lora_rank": 16})
    assert response.status_code == 200, response.text  # type: ignore[attr-defined]


def test_the_serving_limit_is_one_vllm_accepts() -> None:
    from pydantic import ValidationError

    from core.settings import Settings

    assert Settings(vllm_max_lora_rank=16).vllm_max_lora_rank == 16
    with pytest.raises(ValidationError, match="vllm_max_lora_rank"):
        Settings(vllm_max_lora_rank=12)  # vLLM's server would refuse to start with it
