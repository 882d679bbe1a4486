"""OpenAI-compatible ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``: the official SDK works
against these unchanged. Extensions (``top_k``, ``repetition_penalty``, ``ignore_eos``) ride along as extra
body fields."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from core.db import session_scope
from core.errors import InvalidRequest, error_body
from inference.auth import TenantDep
from inference.catalog import ModelEntry, ModelNotFound, visible_models
from inference.engine.engine import Finished, TextChunk
from inference.errors import GenerationFailed
from inference.routes.common import (
    SSE_DONE,
    encode_messages,
    event_stream,
    model_headers,
    released_on_error,
    service_of,
    sse,
)
from inference.schemas import (
    GENERATION_RESPONSES,
    READ_RESPONSES,
    ChatCompletionBody,
    ChatCompletionResponse,
    CompletionBody,
    CompletionResponse,
    ModelList,
    ModelObject,
    OpenAIFields,
)
from inference.service import Generation, Result

router = APIRouter(prefix="/v1", tags=["openai"])


def _refuse_unsupported(body: OpenAIFields) -> None:
    if body.n != 1:
        raise InvalidRequest("only n=1 is supported", param="n", code="unsupported")
    if isinstance(body, ChatCompletionBody):
        if body.logprobs:
            raise InvalidRequest("logprobs are not supported", param="logprobs", code="unsupported")
        if body.tools:
            raise InvalidRequest("tools are not supported", param="tools", code="unsupported")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise InvalidRequest("only text responses are supported", param="response_format", code="unsupported")
    if isinstance(body, CompletionBody):
        if body.logprobs:
            raise InvalidRequest("logprobs are not supported", param="logprobs", code="unsupported")
        if body.suffix:
            raise InvalidRequest("suffix is not supported", param="suffix", code="unsupported")
        if body.best_of not in (None, 1):
            raise InvalidRequest("only best_of=1 is supported", param="best_of", code="unsupported")


def _usage(finished: Finished | Result) -> dict[str, int]:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
    }


def _include_usage(body: OpenAIFields) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


# ------------------------------------------------------------------------------------------- chat


@router.post(
    "/chat/completions",
    summary="Chat completion (SSE chunks with stream=true)",
    response_model=ChatCompletionResponse,
    responses=GENERATION_RESPONSES,
)
async def chat_completions(request: Request, tenant: TenantDep, body: ChatCompletionBody) -> Response:
    _refuse_unsupported(body)
    service = service_of(request)
    hold = await service.acquire(tenant, body.model)
    with released_on_error(hold):
        model = hold.handle.model
        ids = encode_messages(model, [m.as_template_message() for m in body.messages])
        params = service.sampling(
            model,
            body,
            prompt_tokens=len(ids),
            max_new_tokens=body.max_completion_tokens or body.max_tokens,
            length_param="max_completion_tokens" if body.max_completion_tokens else "max_tokens",
            prompt_param="messages",
        )
        generation = Generation(hold, ids, params).start()
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": generation.model_name}
    if body.stream:
        return event_stream(generation, _chat_stream(generation, head, _include_usage(body)))
    result = await generation.collect(request)
    return JSONResponse(
        {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "logprobs": None,
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": result.usage,
            "system_fingerprint": None,
        },
        headers=model_headers(generation.model_name),
    )


async def _chat_stream(generation: Generation, head: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
    chunk = {**head, "object": "chat.completion.chunk", "system_fingerprint": None}

    def choice(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
        return {**chunk, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    try:
        yield sse(choice({"role": "assistant", "content": ""}))
        async for event in generation.events():
            if isinstance(event, TextChunk):
                yield sse(choice({"content": event.text}))
            else:
                yield sse(choice({}, event.reason))
                if include_usage:
                    yield sse({**chunk, "choices": [], "usage": _usage(event)})
        yield SSE_DONE
    except GenerationFailed as exc:
        yield sse(error_body(exc.message, type_=exc.error_type, code=exc.code))
    finally:
        generation.close()


# ------------------------------------------------------------------------------------------- completions


@router.post(
    "/completions",
    summary="Raw text continuation, no chat template (SSE with stream=true)",
    response_model=CompletionResponse,
    responses=GENERATION_RESPONSES,
)
async def completions(request: Request, tenant: TenantDep, body: CompletionBody) -> Response:
    _refuse_unsupported(body)
    service = service_of(request)
    hold = await service.acquire(tenant, body.model)
    with released_on_error(hold):
        model = hold.handle.model
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            ids = [int(p) for p in prompt]
            if any(not 0 <= i < model.decoder.vocab_size for i in ids):
                raise InvalidRequest("token ids must lie within the model's vocabulary", param="prompt")
            prompt_text = str(model.tokenizer.decode(ids))
        else:
            if isinstance(prompt, list) and len(prompt) != 1:
                raise InvalidRequest("exactly one prompt per request", param="prompt", code="unsupported")
            prompt_text = str(prompt[0] if isinstance(prompt, list) else prompt)
            ids = model.encode_text(prompt_text)
        if not ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        params = service.sampling(
            model,
            body,
            prompt_tokens=len(ids),
            max_new_tokens=body.max_tokens,
            length_param="max_tokens",
            prompt_param="prompt",
        )
        generation = Generation(hold, ids, params).start()
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": generation.model_name}
    echo = prompt_text if body.echo else ""
    if body.stream:
        return event_stream(generation, _completion_stream(generation, head, echo, _include_usage(body)))
    result = await generation.collect(request)
    return JSONResponse(
        {
            **head,
            "object": "text_completion",
            "choices": [
                {"text": echo + result.text, "index": 0, "logprobs": None, "finish_reason": result.finish_reason}
            ],
            "usage": result.usage,
            "system_fingerprint": None,
        },
        headers=model_headers(generation.model_name),
    )


async def _completion_stream(
    generation: Generation, head: dict[str, Any], echo: str, include_usage: bool
) -> AsyncIterator[str]:
    chunk = {**head, "object": "text_completion", "system_fingerprint": None}

    def choice(text: str, finish_reason: str | None = None) -> dict[str, Any]:
        return {**chunk, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}]}

    try:
        if echo:
            yield sse(choice(echo))
        async for event in generation.events():
            if isinstance(event, TextChunk):
                yield sse(choice(event.text))
            else:
                yield sse(choice("", event.reason))
                if include_usage:
                    yield sse({**chunk, "choices": [], "usage": _usage(event)})
        yield SSE_DONE
    except GenerationFailed as exc:
        yield sse(error_body(exc.message, type_=exc.error_type, code=exc.code))
    finally:
        generation.close()


# ------------------------------------------------------------------------------------------- models


def _model_object(entry: ModelEntry, loaded: set[str], deployed: str) -> dict[str, Any]:
    return {
        "id": entry.id,
        "object": "model",
        "created": entry.created,
        "owned_by": entry.owned_by,
        "base_model": entry.base_model,
        "ready": entry.ready,
        "loaded": entry.id in loaded,
        "deployed": entry.id == deployed,
    }


async def _entries(request: Request, tenant: str) -> list[ModelEntry]:
    settings = request.app.state.settings

    def read() -> list[ModelEntry]:
        with session_scope() as session:
            return visible_models(session, tenant, settings)

    return await run_in_threadpool(read)


@router.get(
    "/models",
    summary="Models this caller may use: base models and its fine-tuned ones",
    response_model=ModelList,
    responses=READ_RESPONSES,
)
async def list_models(request: Request, tenant: TenantDep) -> dict[str, Any]:
    service = service_of(request)
    loaded = {h.name for h in service.registry.handles()}
    deployed = service.registry.default_for(tenant)
    entries = await _entries(request, tenant)
    return {"object": "list", "data": [_model_object(e, loaded, deployed) for e in entries]}


@router.get("/models/{model_id:path}", summary="One model", response_model=ModelObject, responses=READ_RESPONSES)
async def retrieve_model(request: Request, tenant: TenantDep, model_id: str) -> dict[str, Any]:
    service = service_of(request)
    for entry in await _entries(request, tenant):
        if entry.id == model_id:
            loaded = {h.name for h in service.registry.handles()}
            return _model_object(entry, loaded, service.registry.default_for(tenant))
    raise ModelNotFound(f"The model {model_id!r} does not exist", param="model")
