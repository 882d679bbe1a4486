"""``/v1/completions``: raw text continuation, no chat template; the prompt as text or as token ids, echoed on
request; the answer whole or as ``text_completion`` events."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from core.errors import InvalidRequest
from inference.engine.engine import TextChunk
from inference.engine.loader import LoadedModel
from inference.schemas import (
    CompletionBody,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionResponse,
    FinishReason,
)
from inference.service import InferenceService
from inference.serving.answer import collect_or_stream
from inference.serving.generation import Generation, Prompt, Result, finish_reason_of, start_generation, usage_of
from inference.serving.limits import check_text
from inference.serving.openai import Stamp, refuse_several_choices, refuse_unsupported


async def start(service: InferenceService, tenant: str, body: CompletionBody) -> Generation:
    refuse_several_choices(body)
    refuse_unsupported(body)
    if isinstance(body.prompt, str):
        check_text(body.prompt, "prompt", service.settings)
    elif body.prompt and isinstance(body.prompt[0], str):
        check_text(str(body.prompt[0]), "prompt[0]", service.settings)

    def prepare(model: LoadedModel) -> Prompt:
        ids, text = _encode_prompt(model, body.prompt)
        params = service.sampling(
            model,
            body,
            prompt_tokens=len(ids),
            max_new_tokens=body.max_tokens,
            length_param="max_tokens",
            prompt_param="prompt",
        )
        return Prompt(ids, params, text)

    return await start_generation(service, tenant, body.model, prepare)


async def respond(
    generation: Generation, body: CompletionBody, request: Request, response: Response
) -> CompletionResponse | StreamingResponse:
    stamp = Stamp.new("cmpl", generation.model_name)
    echo = generation.prompt.text if body.echo else ""

    def answer(result: Result) -> CompletionResponse:
        choice = CompletionChoice(text=echo + result.text, index=0, finish_reason=result.finish_reason)
        return CompletionResponse(
            id=stamp.id,
            object="text_completion",
            created=stamp.created,
            model=stamp.model,
            choices=[choice],
            usage=result.usage,
        )

    def chunk(text: str, finish_reason: FinishReason | None = None) -> CompletionChunk:
        choice = CompletionChunkChoice(text=text, finish_reason=finish_reason)
        return CompletionChunk(id=stamp.id, created=stamp.created, model=stamp.model, choices=[choice])

    async def chunks() -> AsyncIterator[CompletionChunk]:
        if echo:
            yield chunk(echo)
        async for event in generation.events():
            if isinstance(event, TextChunk):
                yield chunk(event.text)
            else:
                yield chunk("", finish_reason_of(event))
                if body.include_usage:
                    yield CompletionChunk(
                        id=stamp.id, created=stamp.created, model=stamp.model, choices=[], usage=usage_of(event)
                    )

    return await collect_or_stream(generation, request, response, stream=body.stream, answer=answer, chunks=chunks)


def _encode_prompt(model: LoadedModel, prompt: str | list[str] | list[int]) -> tuple[list[int], str]:
    """The prompt's token ids and its text (decoded, when it came as ids)."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        ids = [int(p) for p in prompt]
        if any(not 0 <= i < model.decoder.vocab_size for i in ids):
            raise InvalidRequest("token ids must lie within the model's vocabulary", param="prompt")
        text = str(model.tokenizer.decode(ids))
    else:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise InvalidRequest("exactly one prompt per request", param="prompt", code="unsupported")
        text = str(prompt[0] if isinstance(prompt, list) else prompt)
        ids = model.encode_text(text)
    if not ids:
        raise InvalidRequest("the prompt is empty", param="prompt")
    return ids, text
