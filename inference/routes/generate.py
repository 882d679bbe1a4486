"""``/generate``: the shape existing callers use (``generate_text``), the prompt rendered as one user message. The
work is in ``inference.serving.generate``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from inference.auth import TenantDep
from inference.schemas import GENERATION_RESPONSES, GenerateBody, GenerateResponse, error_responses
from inference.service import ServiceDep
from inference.serving import generate

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
    response: Response,
    tenant: TenantDep,
    service: ServiceDep,
    prompt: Annotated[str, Query(min_length=1, max_length=MAX_PROMPT_CHARS)],
    max_new_tokens: Annotated[int | None, Query(ge=1)] = None,
    temperature: Annotated[float | None, Query(ge=0.0, le=2.0)] = None,
    model: Annotated[str | None, Query(max_length=512)] = None,
) -> GenerateResponse | StreamingResponse:
    body = GenerateBody(prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature, model=model)
    generation = await generate.start(service, tenant, body)
    return await generate.respond(generation, body, request, response)


@router.post(
    "/generate",
    summary="Answer a prompt or a conversation; SSE with stream=true",
    response_model=GenerateResponse,
    responses=GENERATION_RESPONSES,
)
async def generate_post(
    request: Request, response: Response, tenant: TenantDep, service: ServiceDep, body: GenerateBody
) -> GenerateResponse | StreamingResponse:
    generation = await generate.start(service, tenant, body)
    return await generate.respond(generation, body, request, response)
