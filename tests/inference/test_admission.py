"""Admission control on the real app and the tiny models: bounded requests per tenant (429) and in all (503), both
with Retry-After and given back however a request ends, and a hard memory budget (idle models evicted to make
room, a model that still does not fit refused before it is loaded)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.api_keys import hash_key
from core.orm import DEFAULT_TENANT, ApiKey
from tests.factories import make_model
from tests.inference.helpers import app_client, copy_model, metric
from tests.polling import wait_until
from tests.processes import free_port, uvicorn_process

pytestmark = pytest.mark.usefixtures("clean_db", "tiny_models")

HI = {"prompt": "Hi", "max_new_tokens": 2}
# One engine row of 64 tokens: the tiny models' KV cache stays small beside their weights.
SMALL_CACHE: dict[str, Any] = {"max_batch_size": 1, "llamacpp_context_tokens": 64}


def _key(db, tenant: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    plaintext = f"conch-{uuid.uuid4().hex}"
    db.add(ApiKey(tenant_id=tenant, name="test", prefix=plaintext[:12], key_hash=hash_key(plaintext)))
    db.commit()
    return {"Authorization": f"Bearer {plaintext}"}


def _assert_retry_later(response: Any, status: int, code: str) -> None:  # httpx's or the test client's
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and set(error) >= {"message", "type", "param", "code"}
    assert int(response.headers["Retry-After"]) >= 1


def test_a_tenant_at_its_limit_gets_429_while_another_tenant_is_served(db) -> None:  # type: ignore[no-untyped-def]
    a, b = _key(db, "tenant-a"), _key(db, "tenant-b")
    with app_client(auth_required=True, max_concurrent_requests_per_tenant=2) as client:
        admission = client.app.state.service.admission  # type: ignore[attr-defined]
        running = [admission.admit("tenant-a") for _ in range(2)]  # tenant-a's two requests in flight
        refused = client.post("/generate", json=HI, headers=a)
        _assert_retry_later(refused, 429, "rate_limit_exceeded")
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=a).status_code == 429
        assert client.post("/generate", json=HI, headers=b).status_code == 200  # another tenant is not held up
        for ticket in running:
            ticket.release()
        assert client.post("/generate", json=HI, headers=a).status_code == 200
        # Answered, streamed, refused after admission (bad length, unknown model): every place went back.
        stream = client.post("/generate", json={**HI, "stream": True}, headers=a)
        assert stream.status_code == 200 and "[DONE]" in stream.text
        assert client.post("/generate", json={**HI, "max_new_tokens": 10**6}, headers=a).status_code == 400
        assert client.post("/generate", json={**HI, "model": "no-such-model"}, headers=a).status_code == 404
        assert admission.in_flight == 0 and admission.of("tenant-a") == 0


def test_a_saturated_service_answers_503_with_retry_after() -> None:
    with app_client(max_queued_requests=2, max_concurrent_requests_per_tenant=2) as client:
        admission = client.app.state.service.admission  # type: ignore[attr-defined]
        running = [admission.admit("tenant-x"), admission.admit("tenant-y")]
        _assert_retry_later(client.post("/generate", json=HI), 503, "service_saturated")
        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
        _assert_retry_later(client.post("/v1/chat/completions", json=chat), 503, "service_saturated")
        assert client.get("/healthz").status_code == 200  # the probes are not generation requests
        running[0].release()
        assert client.post("/generate", json=HI).status_code == 200
        running[1].release()
        assert admission.in_flight == 0


def test_a_model_that_does_not_fit_the_budget_is_refused_before_it_is_loaded(db, finetuned) -> None:  # type: ignore[no-untyped-def]
    make_model(db, "ft:tiny-llama:a:ftjob-1", storage_path=finetuned)
    db.commit()
    # Room for the deployed tiny model (212 kB on the default 16-bit route, and a KV cache of one row of 64
    # tokens), not for a second one.
    with app_client(model_memory_budget_bytes=400_000, **SMALL_CACHE) as client:
        registry = client.app.state.registry  # type: ignore[attr-defined]
        refused = client.post("/generate", json={**HI, "model": "ft:tiny-llama:a:ftjob-1"})
        _assert_retry_later(refused, 503, "model_does_not_fit")
        message = refused.json()["error"]["message"]
        assert "ft:tiny-llama:a:ftjob-1" in message and str(finetuned) not in message and "/" not in message
        assert {h.name for h in registry.handles()} == {"tiny-llama"}
        text = client.get("/metrics").text
        assert metric(text, "conch_inference_model_loads_total", result="refused") == 1
        assert metric(text, "conch_inference_model_loads_total", result="ok") == 1  # only the deployed model
        assert client.post("/generate", json=HI).status_code == 200  # the deployed model still answers


def test_the_budget_counts_the_kv_cache_each_model_can_fill(db, finetuned) -> None:  # type: ignore[no-untyped-def]
    make_model(db, "ft:tiny-llama:a:ftjob-1", storage_path=finetuned)
    db.commit()
    # Two tiny models' weights (212 kB each) fit 2 MB; with the default cache (8 rows x 2,048 tokens x 256 bytes a
    # token on llama.cpp, about 4 MiB) not even one does: the deployed one is installed regardless, the other is
    # refused before it is loaded.
    with app_client(model_memory_budget_bytes=2_000_000) as client:
        registry = client.app.state.registry  # type: ignore[attr-defined]
        (deployed,) = registry.handles()
        per_token = 2 * 2 * 2 * 16  # keys and values x layers x key/value heads x head size
        assert deployed.model.cache_bytes >= 8 * 2048 * per_token * 2  # f16 cache, every row's full context
        assert deployed.model.size_bytes == deployed.model.weight_bytes + deployed.model.cache_bytes
        text = client.get("/metrics").text
        assert metric(text, "conch_inference_loaded_bytes") == deployed.model.size_bytes
        refused = client.post("/generate", json={**HI, "model": "ft:tiny-llama:a:ftjob-1"})
        _assert_retry_later(refused, 503, "model_does_not_fit")
        assert metric(client.get("/metrics").text, "conch_inference_model_loads_total", result="refused") == 1
        assert {h.name for h in registry.handles()} == {"tiny-llama"}
    # A smaller cache makes the same budget room for both.
    with app_client(model_memory_budget_bytes=2_000_000, **SMALL_CACHE) as client:
        assert client.post("/generate", json={**HI, "model": "ft:tiny-llama:a:ftjob-1"}).status_code == 200


def test_a_torch_route_counts_every_row_at_the_full_context() -> None:
    # The lean decoder's cache grows with use: the budget counts the most it can reach.
    with app_client(inference_backend="lean", max_batch_size=2) as client:
        (deployed,) = client.app.state.registry.handles()  # type: ignore[attr-defined]
        model = deployed.model
        value_bytes = model.decoder.dtype.itemsize
        assert model.cache_bytes == 2 * model.max_positions * (2 * 2 * 2 * 16) * value_bytes
        assert model.max_positions == 1024  # the tiny models' context


def test_idle_models_are_evicted_to_make_room_and_held_ones_are_not(db, finetuned, finetuned_two) -> None:  # type: ignore[no-untyped-def]
    make_model(db, "ft:tiny-llama:a:ftjob-1", storage_path=finetuned)
    make_model(db, "ft:tiny-llama:b:ftjob-2", storage_path=finetuned_two)
    db.commit()
    with app_client(model_memory_budget_bytes=600_000, **SMALL_CACHE) as client:  # two tiny models, not three
        registry = client.app.state.registry  # type: ignore[attr-defined]
        assert client.post("/generate", json={**HI, "model": "ft:tiny-llama:a:ftjob-1"}).status_code == 200
        hold = registry.hold("ft:tiny-llama:a:ftjob-1", DEFAULT_TENANT)  # a request still running on it
        assert hold is not None
        busy = client.post("/generate", json={**HI, "model": "ft:tiny-llama:b:ftjob-2"})
        _assert_retry_later(busy, 503, "model_does_not_fit")
        assert {h.name for h in registry.handles()} == {"tiny-llama", "ft:tiny-llama:a:ftjob-1"}
        hold.release()
        served = client.post("/generate", json={**HI, "model": "ft:tiny-llama:b:ftjob-2"})
        assert served.status_code == 200, served.text
        assert {h.name for h in registry.handles()} == {"tiny-llama", "ft:tiny-llama:b:ftjob-2"}


LONG_ANSWER = 30_000  # tokens: minutes of decoding, so the stream is still running while the test looks


@pytest.fixture
def one_per_tenant_server(tmp_path: Path, log_dir: Path, tiny_models: dict[str, Path]) -> Iterator[str]:
    """A real uvicorn process serving a tiny model with room for LONG_ANSWER tokens, one request per tenant."""
    folder = copy_model(
        tiny_models["tiny-llama"], tmp_path / "long", config_changes={"max_position_embeddings": 40_000}
    )
    port = free_port()
    env = {
        "BASE_MODELS": json.dumps({"tiny-long": str(folder)}),
        "DEFAULT_BASE_MODEL": "tiny-long",
        "MAX_NEW_TOKENS_LIMIT": str(LONG_ANSWER),
        "LLAMACPP_CONTEXT_TOKENS": "40000",
        "MAX_CONCURRENT_REQUESTS_PER_TENANT": "1",
    }
    process = uvicorn_process("inference", "inference.app:create_app", port, log_dir, env=env).start()
    base = f"http://127.0.0.1:{port}"
    try:
        process.wait_http(f"{base}/readyz", timeout=120)
        yield base
    finally:
        process.stop()


@pytest.mark.e2e
def test_a_burst_past_the_limit_gets_429_and_a_disconnect_gives_the_place_back(one_per_tenant_server: str) -> None:
    base = one_per_tenant_server
    body = {"prompt": "Hello", "max_new_tokens": LONG_ANSWER, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{base}/generate", json=body) as response:
            lines = response.iter_lines()
            assert any(next(lines).startswith("data: ") for _ in range(6))
            burst = [http.post(f"{base}/generate", json=HI) for _ in range(3)]
            for refused in burst:
                _assert_retry_later(refused, 429, "rate_limit_exceeded")
        # The client went away mid-stream: its place is given back once the generation is cancelled.
        wait_until(
            lambda: http.post(f"{base}/generate", json=HI).status_code == 200,
            "the place to be given back",
            timeout=60,
        )
