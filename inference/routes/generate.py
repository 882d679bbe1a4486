"""``/generate``: the shape existing callers use (``generate_text``), the prompt rendered as one user message."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from core.errors import error_body
from inference.auth import TenantDep
from inference.engine.engine import TextChunk
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
from inference.schemas import GENERATION_RESPONSES, GenerateBody, GenerateResponse, error_responses
from inference.service import Generation

router = APIRouter(tags=["generate"])

MAX_PROMPT_CHARS = 200_000


@router.get(
    "/generate",
    summary="Answer one prompt (rendered as a user message)",
    response_model=GenerateResponse,
    responses=error_responses(400, 401, 404, 422, 500, 503),
)
async def generate_get(
    request: Request,
    tenant: TenantDep,
    prompt: Annotated[str, Query(min_length=1, max_length=MAX_PROMPT_CHARS)],
    max_new_tokens: Annotated[int | None, Query(ge=1)] = None,
    temperature: Annotated[float | None, Query(ge=0.0, le=2.0)] = None,
    model: Annotated[str | None, Query(max_length=512)] = None,
) -> Response:
    body = GenerateBody(prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature, model=model)
    return await _generate(request, tenant, body)


@router.post(
    "/generate",
    summary="Answer a prompt or a conversation; SSE with stream=true",
    response_model=GenerateResponse,
    responses=GENERATION_RESPONSES,
)
async def generate_post(request: Request, tenant: TenantDep, body: GenerateBody) -> Response:
    return await _generate(request, tenant, body)


async def _generate(request: Request, tenant: str, body: GenerateBody) -> Response:
    service = service_of(request)
    hold = await service.acquire(tenant, body.model)
    with released_on_error(hold):
        model = hold.handle.model
        if body.prompt is not None:
            messages = [{"role": "user", "content": body.prompt}]
        else:
            messages = [m.as_template_message() for m in body.messages or []]
        ids = encode_messages(model, messages)
        params = service.sampling(
            model,
            body,
            prompt_tokens=len(ids),
            max_new_tokens=body.max_new_tokens,
            length_param="max_new_tokens",
            prompt_param="prompt" if body.prompt is not None else "messages",
        )
        generation = Generation(hold, ids, params).start()
    if body.stream:
        return event_stream(generation, _stream(generation))
    result = await generation.collect(request)
    return JSONResponse(
        {
            "generate_text": result.text,
            "model": generation.model_name,
            "finish_reason": result.finish_reason,
            "usage": result.usage,
        },
        headers=model_headers(generation.model_name),
    )


async def _stream(generation: Generation) -> AsyncIterator[str]:
    try:
        async for event in generation.events():
            if isinstance(event, TextChunk):
                yield sse({"text": event.text, "model": generation.model_name})
            else:
                usage = {
                    "prompt_tokens": event.prompt_tokens,
                    "completion_tokens": event.completion_tokens,
                    "total_tokens": event.prompt_tokens + event.completion_tokens,
                }
                yield sse({"text": "", "model": generation.model_name, "finish_reason": event.reason, "usage": usage})
        yield SSE_DONE
    except GenerationFailed as exc:
        yield sse(error_body(exc.message, type_=exc.error_type, code=exc.code))
    finally:
        generation.close()
