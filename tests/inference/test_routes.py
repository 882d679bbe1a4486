"""Every route of the inference service, in process (the app's own lifespan, listener and engine threads), on the
tiny models with real Postgres and Redis."""

from __future__ import annotations

import json
import shutil
import threading
import uuid
from pathlib import Path

import pytest

from artifacts.serving import DEFAULT_CPU_TYPE
from core.api_keys import hash_key
from core.orm import ApiKey
from tests.factories import make_checkpoint, make_job, make_model
from tests.inference.helpers import app_client, metric
from tests.polling import wait_until

pytestmark = pytest.mark.usefixtures("clean_db", "tiny_models")


def _sse_payloads(lines: list[str]) -> list[object]:
    data = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_quantized_route_chosen_in_settings_serves_answers(scheme: str) -> None:
    with app_client(inference_quant=scheme) as client:
        (model,) = client.get("/readyz").json()["models"]
        assert model["quant"] == scheme
        answer = client.post("/generate", json={"prompt": "Hello", "max_new_tokens": 5, "ignore_eos": True})
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] == 5


def test_probes_and_metrics() -> None:
    with app_client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["model"] == "tiny-llama"
        (served,) = ready.json()["models"]
        # The default route on a CPU with llama.cpp installed (this suite's install has it), and its fidelity.
        assert served["backend"] == "llamacpp" and served["route"] == f"llamacpp:{DEFAULT_CPU_TYPE}"
        assert served["fidelity"]["passed"] and served["fidelity"]["golden_prompts"] == "builtin"
        client.get("/generate", params={"prompt": "Hello", "max_new_tokens": 3})
        text = client.get("/metrics").text
        for name in (
            "conch_inference_time_to_first_token_seconds_count",
            "conch_inference_generated_tokens_total",
            "conch_inference_queue_depth",
            "conch_inference_batch_size_count",
            "conch_inference_swaps_total",
            "conch_inference_failures_total",
            "conch_inference_decode_tokens_per_second_count",
        ):
            assert name in text, name
        assert metric(text, "conch_inference_time_to_first_token_seconds_count") >= 1
        assert metric(text, "conch_inference_requests_total", route="/generate", status="200") == 1
        assert metric(text, "conch_inference_ready") == 1


def test_get_generate_answers_in_the_shape_callers_use() -> None:
    with app_client() as client:
        response = client.get("/generate", params={"prompt": "What is your name?", "max_new_tokens": 5})
        assert response.status_code == 200
        body = response.json()
        assert isinstance(body["generate_text"], str)
        assert body["model"] == "tiny-llama"
        assert response.headers["x-conch-model"] == "tiny-llama"
        assert body["usage"]["completion_tokens"] <= 5
        assert body["finish_reason"] in ("stop", "length")
        # The prompt is one user message rendered with the model's chat template.
        tokenizer = client.app.state.registry.loaded("tiny-llama").model.tokenizer  # type: ignore[attr-defined]
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is your name?"}], tokenize=False, add_generation_prompt=True
        )
        assert body["usage"]["prompt_tokens"] == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def test_post_generate_takes_messages_and_sampling_knobs() -> None:
    with app_client() as client:
        request = {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello"},
            ],
            "max_new_tokens": 12,
            "temperature": 0.9,
            "top_p": 0.95,
            "top_k": 40,
            "repetition_penalty": 1.1,
            "seed": 7,
            "ignore_eos": True,
        }
        first = client.post("/generate", json=request).json()
        second = client.post("/generate", json=request).json()
        assert first["generate_text"] == second["generate_text"]  # same seed, same answer
        assert first["usage"]["completion_tokens"] == 12
        assert first["finish_reason"] == "length"
        full = client.post("/generate", json={"prompt": "Hello", "max_new_tokens": 20, "ignore_eos": True}).json()
        text = full["generate_text"]
        stop = text[4:7]
        if stop and stop in text:
            cut = client.post(
                "/generate", json={"prompt": "Hello", "max_new_tokens": 20, "ignore_eos": True, "stop": stop}
            ).json()
            assert cut["generate_text"] == text[: text.index(stop)]
            assert cut["finish_reason"] == "stop"


def test_post_generate_streams_server_sent_events() -> None:
    with app_client() as client:
        with client.stream(
            "POST", "/generate", json={"prompt": "Hello", "max_new_tokens": 8, "stream": True, "ignore_eos": True}
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["x-conch-model"] == "tiny-llama"
            events = _sse_payloads(list(response.iter_lines()))
        final = events[-1]
        assert isinstance(final, dict)
        assert final["finish_reason"] == "length" and final["usage"]["completion_tokens"] == 8
        streamed = "".join(e["text"] for e in events if isinstance(e, dict))
        whole = client.post("/generate", json={"prompt": "Hello", "max_new_tokens": 8, "ignore_eos": True}).json()
        assert streamed == whole["generate_text"]


def test_chat_completions_answer_and_stream_like_openai() -> None:
    with app_client() as client:
        body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6}
        answer = client.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200
        data = answer.json()
        assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
        assert data["model"] == "tiny-llama" and answer.headers["x-conch-model"] == "tiny-llama"
        choice = data["choices"][0]
        assert choice["message"]["role"] == "assistant"
        assert choice["finish_reason"] in ("stop", "length")
        usage = data["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with client.stream("POST", "/v1/chat/completions", json=stream_body) as response:
            chunks = _sse_payloads(list(response.iter_lines()))
        assert all(isinstance(c, dict) and c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"  # type: ignore[index]
        assert chunks[-1]["usage"] == usage  # type: ignore[index]
        assert chunks[-2]["choices"][0]["finish_reason"] == choice["finish_reason"]  # type: ignore[index]
        content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])  # type: ignore[index]
        assert content == choice["message"]["content"]


def test_completions_continue_raw_text_without_a_template() -> None:
    with app_client() as client:
        answer = client.post("/v1/completions", json={"prompt": "The capital of France", "max_tokens": 5})
        data = answer.json()
        assert data["object"] == "text_completion"
        tokenizer = client.app.state.registry.loaded("tiny-llama").model.tokenizer  # type: ignore[attr-defined]
        assert data["usage"]["prompt_tokens"] == len(tokenizer("The capital of France")["input_ids"])
        echoed = client.post(
            "/v1/completions", json={"prompt": "The capital of France", "max_tokens": 5, "echo": True}
        ).json()
        assert echoed["choices"][0]["text"] == "The capital of France" + data["choices"][0]["text"]
        ids = tokenizer("The capital of France")["input_ids"]
        by_ids = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 5}).json()
        assert by_ids["choices"][0]["text"] == data["choices"][0]["text"]
        with client.stream(
            "POST", "/v1/completions", json={"prompt": "The capital of France", "max_tokens": 5, "stream": True}
        ) as response:
            chunks = _sse_payloads(list(response.iter_lines()))
        assert "".join(c["choices"][0]["text"] for c in chunks) == data["choices"][0]["text"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("post", "/generate", {"prompt": "x", "max_new_tokens": 100_000}, 400, "max_tokens_too_large"),
        ("post", "/generate", {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 422, "value_error"),
        ("post", "/generate", {"prompt": "x", "temperature": 9}, 422, "less_than_equal"),
        ("post", "/generate", {"prompt": "x", "model": "no-such-model"}, 404, "model_not_found"),
        ("post", "/v1/chat/completions", {"messages": []}, 422, "too_short"),
        ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "unsupported"),
        ("post", "/v1/completions", {"prompt": [1, 999_999]}, 400, None),
        ("post", "/v1/completions", {"prompt": ["a", "b"]}, 400, "unsupported"),
        ("get", "/v1/models/nope", None, 404, "model_not_found"),
        ("get", "/no/such/route", None, 404, "not_found"),
        ("get", "/generate", None, 422, "missing"),
    ],
)
def test_errors_come_in_the_openai_envelope(method, path, body, status, code) -> None:  # type: ignore[no-untyped-def]
    with app_client() as client:
        response = client.request(method.upper(), path, json=body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"}
        if code:
            assert error["code"] == code
        assert "Traceback" not in response.text


def test_validation_lists_every_bad_field_by_its_dotted_name() -> None:
    with app_client() as client:
        response = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "x"}, {"role": "nobody"}], "temperature": 9},
        )
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        params = [listed["param"] for listed in error["errors"]]
        assert error["param"] == params[0] and error["message"].startswith(f"{params[0]}: ")
        assert "temperature" in params and any(p.startswith("messages[1]") for p in params), params


def test_malformed_json_is_a_400_envelope() -> None:
    with app_client() as client:
        response = client.post(
            "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_json"


def test_a_named_fine_tuned_model_loads_on_demand(db, finetuned) -> None:  # type: ignore[no-untyped-def]
    model_id = "ft:tiny-llama:shell:ftjob-ondemand"
    make_model(db, model_id, storage_path=finetuned)
    job = make_job(db, status="succeeded", fine_tuned_model=model_id)
    make_checkpoint(db, job.id, 3)
    db.commit()
    with app_client() as client:
        listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert listed["tiny-llama"]["deployed"] and listed["tiny-llama"]["loaded"]
        # Merged weights are served here, so a checkpoint (an adapter) is not a model this service answers as.
        assert f"{model_id}:ckpt-step-3" not in listed
        assert not listed[model_id]["loaded"]
        assert client.get(f"/v1/models/{model_id}").json()["base_model"] == "tiny-llama"
        response = client.get("/generate", params={"prompt": "Hello", "model": model_id, "max_new_tokens": 4})
        assert response.status_code == 200
        assert response.json()["model"] == model_id and response.headers["x-conch-model"] == model_id
        listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert listed[model_id]["loaded"] and not listed[model_id]["deployed"]
        # Requests that name no model still get the deployed one.
        assert client.get("/generate", params={"prompt": "Hello", "max_new_tokens": 2}).json()["model"] == "tiny-llama"


def test_models_beyond_the_memory_budget_are_unloaded_least_recently_used(db, finetuned, finetuned_two) -> None:  # type: ignore[no-untyped-def]
    make_model(db, "ft:tiny-llama:a:ftjob-1", storage_path=finetuned)
    make_model(db, "ft:tiny-llama:b:ftjob-2", storage_path=finetuned_two)
    db.commit()
    # Room for two tiny models on the default 16-bit route (212 kB each, and a KV cache of one row of 64 tokens),
    # not three.
    with app_client(model_memory_budget_bytes=600_000, max_batch_size=1, llamacpp_context_tokens=64) as client:
        registry = client.app.state.registry  # type: ignore[attr-defined]
        for model_id in ("ft:tiny-llama:a:ftjob-1", "ft:tiny-llama:b:ftjob-2"):
            assert (
                client.post("/generate", json={"prompt": "Hi", "model": model_id, "max_new_tokens": 2}).status_code
                == 200
            )
        loaded = {h.name for h in registry.handles()}
        assert loaded == {"tiny-llama", "ft:tiny-llama:b:ftjob-2"}  # the deployed model is never the one evicted
        assert metric(client.get("/metrics").text, "conch_inference_evictions_total") == 1
        again = client.post("/generate", json={"prompt": "Hi", "model": "ft:tiny-llama:a:ftjob-1", "max_new_tokens": 2})
        assert again.status_code == 200 and again.json()["model"] == "ft:tiny-llama:a:ftjob-1"


def _key(db, tenant: str) -> str:  # type: ignore[no-untyped-def]
    plaintext = f"conch-{uuid.uuid4().hex}"
    db.add(ApiKey(tenant_id=tenant, name="test", prefix=plaintext[:12], key_hash=hash_key(plaintext)))
    db.commit()
    return plaintext


def test_api_keys_name_the_tenant_and_tenants_see_only_their_models(db, finetuned) -> None:  # type: ignore[no-untyped-def]
    make_model(db, "ft:tiny-llama:mine:ftjob-a", storage_path=finetuned, tenant_id="tenant-a")
    db.commit()
    key_a, key_b = _key(db, "tenant-a"), _key(db, "tenant-b")
    with app_client(auth_required=True) as client:
        assert client.get("/healthz").status_code == 200
        missing = client.get("/generate", params={"prompt": "Hi"})
        assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
        wrong = client.get("/v1/models", headers={"Authorization": "Bearer conch-not-a-key"})
        assert wrong.status_code == 401
        a = {"Authorization": f"Bearer {key_a}"}
        b = {"Authorization": f"Bearer {key_b}"}
        assert "ft:tiny-llama:mine:ftjob-a" in {m["id"] for m in client.get("/v1/models", headers=a).json()["data"]}
        assert "ft:tiny-llama:mine:ftjob-a" not in {m["id"] for m in client.get("/v1/models", headers=b).json()["data"]}
        body = {"model": "ft:tiny-llama:mine:ftjob-a", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        assert client.post("/v1/chat/completions", json=body, headers=a).status_code == 200
        # Loaded now, but still another tenant's: it answers exactly like a model that does not exist.
        other = client.post("/v1/chat/completions", json=body, headers=b)
        assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"


def test_readyz_is_503_until_the_base_model_is_prepared(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    late = tmp_path / "late-model"
    with app_client(wait_ready=False, base_models={"late-model": str(late)}, default_base_model="late-model") as client:
        wait_until(lambda: client.app.state.registry.synced, what="deployments read")  # type: ignore[attr-defined]
        response = client.get("/readyz")
        assert response.status_code == 503
        assert "not prepared" in response.json()["reason"]
        assert response.json()["status"] == "unavailable"
        assert response.json()["error"]["code"] == "service_unavailable"
        assert response.json()["error"]["message"] == response.json()["reason"]
        refused = client.get("/generate", params={"prompt": "Hi"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_not_ready"
        shutil.copytree(tiny_models["tiny-llama"], late)  # what the worker's preparation does, atomically
        wait_until(lambda: client.get("/readyz").status_code == 200, what="ready once prepared")
        assert client.get("/generate", params={"prompt": "Hi", "max_new_tokens": 2}).json()["model"] == "late-model"


def test_readyz_turns_503_when_the_engine_dies_and_recovers_after_a_reload() -> None:
    from tests.inference.test_engine import kill_thread

    # A long poll interval: nothing repairs the engine until the test wakes the reconciler.
    with app_client(deployment_poll_seconds=3600) as client:
        registry = client.app.state.registry  # type: ignore[attr-defined]
        engine = registry.loaded("tiny-llama").engine
        kill_thread(engine.thread_ident)
        wait_until(lambda: not engine.alive, what="engine dead")
        response = client.get("/readyz")
        assert response.status_code == 503
        assert "InjectedFault" in response.json()["reason"]
        assert metric(client.get("/metrics").text, "conch_inference_failures_total", kind="engine_died") == 1
        client.app.state.listener.wake()  # type: ignore[attr-defined]
        wait_until(lambda: client.get("/readyz").status_code == 200, what="ready after reload")
        assert client.get("/generate", params={"prompt": "Hi", "max_new_tokens": 2}).status_code == 200


def test_concurrent_requests_share_decode_steps() -> None:
    with app_client() as client:
        results: list[int] = []

        def call() -> None:
            response = client.post("/generate", json={"prompt": "Hello", "max_new_tokens": 300, "ignore_eos": True})
            results.append(response.status_code)

        threads = [threading.Thread(target=call) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert results == [200] * 6
        text = client.get("/metrics").text
        steps = metric(text, "conch_inference_batch_size_count")
        single = metric(text, "conch_inference_batch_size_bucket", le="1.0")
        assert steps - single > 0  # some decode steps ran more than one sequence


def test_a_request_whose_engine_dies_while_it_answers_gets_a_503() -> None:
    from tests.inference.test_engine import kill_thread

    with app_client(deployment_poll_seconds=3600) as client:
        engine = client.app.state.registry.loaded("tiny-llama").engine  # type: ignore[attr-defined]
        outcome: list[object] = []

        def call() -> None:
            body = {"prompt": "Hello", "max_new_tokens": 1000, "ignore_eos": True}
            outcome.append(client.post("/generate", json=body))

        caller = threading.Thread(target=call)
        caller.start()
        wait_until(lambda: engine.running == 1, what="the request decoding")
        assert engine.thread_ident is not None
        kill_thread(engine.thread_ident)
        caller.join(60)
        (response,) = outcome
        assert response.status_code == 503, response.text  # type: ignore[attr-defined]
        assert "stopped while answering" in response.json()["error"]["message"]  # type: ignore[attr-defined]
