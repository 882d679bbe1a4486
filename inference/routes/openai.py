"""OpenAI-compatible ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``: the official SDK works
against these unchanged. Extensions (``top_k``, ``repetition_penalty``, ``ignore_eos``) ride along as extra
body fields. The work is in ``inference.serving``."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from inference.auth import TenantDep
from inference.schemas import (
    GENERATION_RESPONSES,
    READ_RESPONSES,
    ChatCompletionBody,
    ChatCompletionResponse,
    CompletionBody,
    CompletionResponse,
    ModelList,
    ModelObject,
)
from inference.service import ServiceDep
from inference.serving import chat, models
from inference.serving import completions as completion_serving

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post(
    "/chat/completions",
    summary="Chat completion (SSE chunks with stream=true)",
    response_model=ChatCompletionResponse,
    responses=GENERATION_RESPONSES,
)
async def chat_completions(
    request: Request, response: Response, tenant: TenantDep, service: ServiceDep, body: ChatCompletionBody
) -> ChatCompletionResponse | StreamingResponse:
    generation = await chat.start(service, tenant, body)
    return await chat.respond(generation, body, request, response)


@router.post(
    "/completions",
    summary="Raw text continuation, no chat template (SSE with stream=true)",
    response_model=CompletionResponse,
    responses=GENERATION_RESPONSES,
)
async def completions(
    request: Request, response: Response, tenant: TenantDep, service: ServiceDep, body: CompletionBody
) -> CompletionResponse | StreamingResponse:
    generation = await completion_serving.start(service, tenant, body)
    return await completion_serving.respond(generation, body, request, response)


@router.get(
    "/models",
    summary="Models this caller may use: base models and its fine-tuned ones",
    response_model=ModelList,
    responses=READ_RESPONSES,
)
async def list_models(tenant: TenantDep, service: ServiceDep) -> ModelList:
    return await models.list_models(service, tenant)


@router.get("/models/{model_id:path}", summary="One model", response_model=ModelObject, responses=READ_RESPONSES)
async def retrieve_model(tenant: TenantDep, service: ServiceDep, model_id: str) -> ModelObject:
    return await models.retrieve_model(service, tenant, model_id)
