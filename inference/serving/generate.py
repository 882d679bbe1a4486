"""``/generate``: the shape existing callers use (``generate_text``); a prompt is rendered as one user message with
the model's chat template, a conversation as it is. Streamed, each event carries ``text`` and ``model``, the last
also ``finish_reason`` and ``usage``."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from core.templates import Message
from inference.engine.engine import TextChunk
from inference.engine.loader import LoadedModel
from inference.schemas import GenerateBody, GenerateChunk, GenerateResponse
from inference.service import InferenceService
from inference.serving.answer import collect_or_stream
from inference.serving.generation import (
    Generation,
    Prompt,
    Result,
    encode_chat,
    finish_reason_of,
    start_generation,
    usage_of,
)
from inference.serving.limits import check_messages, check_text
from inference.serving.openai import refuse_unsupported


async def start(service: InferenceService, tenant: str, body: GenerateBody) -> Generation:
    refuse_unsupported(body, body.messages or ())
    messages: list[Message]
    if body.prompt is not None:
        check_text(body.prompt, "prompt", service.settings)
        messages = [{"role": "user", "content": body.prompt}]
    else:
        check_messages(body.messages or [], service.settings)
        messages = [m.as_template_message() for m in body.messages or []]

    def prepare(model: LoadedModel) -> Prompt:
        ids = encode_chat(model, messages)
        params = service.sampling(
            model,
            body,
            prompt_tokens=len(ids),
            max_new_tokens=body.max_new_tokens,
            length_param="max_new_tokens",
            prompt_param="prompt" if body.prompt is not None else "messages",
        )
        return Prompt(ids, params)

    return await start_generation(service, tenant, body.model, prepare)


async def respond(
    generation: Generation, body: GenerateBody, request: Request, response: Response
) -> GenerateResponse | StreamingResponse:
    model = generation.model_name

    def answer(result: Result) -> GenerateResponse:
        return GenerateResponse(
            generate_text=result.text, model=model, finish_reason=result.finish_reason, usage=result.usage
        )

    async def chunks() -> AsyncIterator[GenerateChunk]:
        async for event in generation.events():
            if isinstance(event, TextChunk):
                yield GenerateChunk(text=event.text, model=model)
            else:
                yield GenerateChunk(text="", model=model, finish_reason=finish_reason_of(event), usage=usage_of(event))

    return await collect_or_stream(generation, request, response, stream=body.stream, answer=answer, chunks=chunks)
