"""Against a real uvicorn process: the official openai SDK, a swap under concurrent load, and client disconnects."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.factories import make_model
from tests.inference.helpers import (
    ACTIVE,
    FAILED,
    copy_model,
    deploy,
    metric,
    wait_deployment,
)
from tests.polling import wait_until
from tests.processes import ServiceProcess, free_port, uvicorn_process

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean_db", "tiny_models")]


def _start(log_dir: Path, **env: str) -> tuple[ServiceProcess, str]:
    port = free_port()
    process = uvicorn_process("inference", "inference.app:create_app", port, log_dir, env=env).start()
    base = f"http://127.0.0.1:{port}"
    process.wait_http(f"{base}/readyz", timeout=120)
    return process, base


@pytest.fixture
def server(log_dir: Path) -> Iterator[str]:
    process, base = _start(log_dir)
    try:
        yield base
    finally:
        process.stop()


def test_the_openai_sdk_works_unchanged(server: str) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "Hello"}], max_tokens=8
    )
    assert chat.model == "tiny-llama"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage is not None and chat.usage.completion_tokens <= 8

    raw = client.chat.completions.with_raw_response.create(
        model="tiny-llama", messages=[{"role": "user", "content": "Hello"}], max_tokens=2
    )
    assert raw.headers["x-conch-model"] == "tiny-llama"

    stream = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [chat.choices[0].finish_reason]
    assert text == chat.choices[0].message.content  # greedy by default: the same answer streamed
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == chat.usage.total_tokens

    completion = client.completions.create(model="tiny-llama", prompt="The capital of France", max_tokens=6)
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None and completion.usage.prompt_tokens > 0
    streamed = client.completions.create(model="tiny-llama", prompt="The capital of France", max_tokens=6, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text

    extra = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=4,
        extra_body={"top_k": 5, "repetition_penalty": 1.2, "ignore_eos": True},
    )
    assert extra.usage is not None and extra.usage.completion_tokens == 4

    models = {m.id for m in client.models.list()}
    assert {"tiny-llama", "tiny-qwen2"} <= models
    assert client.models.retrieve("tiny-llama").id == "tiny-llama"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "x"}], max_tokens=1_000_000
        )


def test_a_swap_under_concurrent_load_fails_no_request(db, log_dir: Path, finetuned: Path) -> None:  # type: ignore[no-untyped-def]
    new_model = "ft:tiny-llama:swap:ftjob-0003"
    make_model(db, new_model, storage_path=finetuned)
    db.commit()
    process, base = _start(log_dir)
    answers: list[tuple[float, float, int, str]] = []  # started, ended, status, model
    errors: list[str] = []
    stop = threading.Event()

    def client_loop(index: int) -> None:
        with httpx.Client(base_url=base, timeout=60) as http:
            while not stop.is_set():
                try:
                    started = time.monotonic()
                    if index % 2:
                        response = http.get("/generate", params={"prompt": f"Hello {index}", "max_new_tokens": 16})
                        model = response.json().get("model", "")
                    else:
                        response = http.post(
                            "/v1/chat/completions",
                            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16},
                        )
                        model = response.json().get("model", "")
                    answers.append(
                        (started, time.monotonic(), response.status_code, response.headers.get("x-conch-model", ""))
                    )
                    assert model == response.headers.get("x-conch-model")
                except Exception as exc:
                    errors.append(repr(exc))

    workers = [threading.Thread(target=client_loop, args=(i,)) for i in range(8)]
    try:
        for worker in workers:
            worker.start()
        wait_until(lambda: len(answers) >= 40, what="load before the swap")
        row = deploy(db, new_model)
        active = wait_deployment(db, row, ACTIVE, FAILED)
        assert active.status == ACTIVE, active.reason
        swapped_at = time.monotonic()
        wait_until(lambda: sum(1 for t, _, _, _ in answers if t > swapped_at) >= 40, what="load after the swap")
    finally:
        stop.set()
        for worker in workers:
            worker.join(60)
        metrics_text = httpx.get(f"{base}/metrics").text
        process.stop()
    assert errors == []
    assert all(status == 200 for _, _, status, _ in answers)
    models = [model for _, _, _, model in answers]
    assert models[0] == "tiny-llama" and new_model in models
    # Once a request has been answered by the new model, every request started later gets it too; the old one
    # only finishes what started before the swap.
    first_new_answered = min(ended for _, ended, _, model in answers if model == new_model)
    assert {model for started, _, _, model in answers if started > first_new_answered} == {new_model}
    assert metric(metrics_text, "conch_inference_batch_size_count") > metric(
        metrics_text, "conch_inference_batch_size_bucket", le="1.0"
    )


LONG_ANSWER = 30_000  # tokens asked for: minutes of decoding (40,000 took six minutes on two cores)


@pytest.fixture
def long_context_server(tmp_path: Path, log_dir: Path, tiny_models: dict[str, Path]) -> Iterator[str]:
    """A tiny model whose context (on every route: llama.cpp's per-sequence cache too) holds LONG_ANSWER tokens, so
    a generation asked for all of them is still running when the test lets go of it."""
    folder = copy_model(
        tiny_models["tiny-llama"], tmp_path / "long", config_changes={"max_position_embeddings": 40_000}
    )
    process, base = _start(
        log_dir,
        BASE_MODELS=json.dumps({"tiny-long": str(folder)}),
        DEFAULT_BASE_MODEL="tiny-long",
        MAX_NEW_TOKENS_LIMIT=str(LONG_ANSWER),
        LLAMACPP_CONTEXT_TOKENS="40000",
    )
    try:
        yield base
    finally:
        process.stop()


def _metrics(base: str) -> str:
    return httpx.get(f"{base}/metrics").text


def _post_then_hang_up(base: str, path: str, body: dict[str, Any], *, once: Callable[[], bool]) -> None:
    """POST ``body`` on a connection of its own, wait until ``once()`` holds, then close the connection without
    reading a byte of the answer: what a client that gives up on a blocking request does."""
    url = httpx.URL(base)
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    with socket.create_connection((url.host, url.port)) as connection:
        connection.sendall(head.encode() + payload)
        wait_until(once, "the generation to be under way")


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_stops_its_generation(long_context_server: str, stream: bool) -> None:
    base = long_context_server
    before = _metrics(base)
    finished_before = metric(before, "conch_inference_completions_total", reason="length")
    produced_before = metric(before, "conch_inference_generated_tokens_total")
    body = {"prompt": "Hello", "max_new_tokens": LONG_ANSWER, "ignore_eos": True, "stream": stream}
    if stream:
        # Streamed tokens arrive, then the client closes the stream mid-answer.
        with httpx.Client(timeout=60) as http, http.stream("POST", f"{base}/generate", json=body) as response:
            lines = response.iter_lines()
            received = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in received)
    else:
        # Nothing arrives before the whole answer: the client hangs up once the service is decoding for it.
        _post_then_hang_up(
            base,
            "/generate",
            body,
            once=lambda: metric(_metrics(base), "conch_inference_generated_tokens_total") > produced_before,
        )

    def cancelled() -> bool:
        return metric(_metrics(base), "conch_inference_cancelled_total") >= 1

    wait_until(cancelled, "generation cancelled", timeout=60)
    text = _metrics(base)
    assert metric(text, "conch_inference_completions_total", reason="length") == finished_before
    assert metric(text, "conch_inference_generated_tokens_total") - produced_before < LONG_ANSWER
    ready = httpx.get(f"{base}/readyz").json()
    assert all(m["running"] == 0 for m in ready["models"])
