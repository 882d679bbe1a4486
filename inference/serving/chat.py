"""``/v1/chat/completions``: the conversation rendered with the model's chat template; the answer whole
(``chat.completion``) or as ``chat.completion.chunk`` events."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from inference.engine.engine import TextChunk
from inference.engine.loader import LoadedModel
from inference.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionBody,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    FinishReason,
)
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
from inference.serving.limits import check_messages
from inference.serving.openai import Stamp, refuse_several_choices, refuse_unsupported


async def start(service: InferenceService, tenant: str, body: ChatCompletionBody) -> Generation:
    refuse_several_choices(body)
    refuse_unsupported(body, body.messages)
    check_messages(body.messages, service.settings)

    def prepare(model: LoadedModel) -> Prompt:
        ids = encode_chat(model, [m.as_template_message() for m in body.messages])
        params = service.sampling(
            model,
            body,
            prompt_tokens=len(ids),
            max_new_tokens=body.max_completion_tokens or body.max_tokens,
            length_param="max_completion_tokens" if body.max_completion_tokens else "max_tokens",
            prompt_param="messages",
        )
        return Prompt(ids, params)

    return await start_generation(service, tenant, body.model, prepare)


async def respond(
    generation: Generation, body: ChatCompletionBody, request: Request, response: Response
) -> ChatCompletionResponse | StreamingResponse:
    stamp = Stamp.new("chatcmpl", generation.model_name)

    def answer(result: Result) -> ChatCompletionResponse:
        message = AssistantMessage(role="assistant", content=result.text)
        return ChatCompletionResponse(
            id=stamp.id,
            object="chat.completion",
            created=stamp.created,
            model=stamp.model,
            choices=[ChatChoice(index=0, message=message, finish_reason=result.finish_reason)],
            usage=result.usage,
        )

    def chunk(delta: ChatDelta, finish_reason: FinishReason | None = None) -> ChatCompletionChunk:
        choice = ChatChunkChoice(delta=delta, finish_reason=finish_reason)
        return ChatCompletionChunk(id=stamp.id, created=stamp.created, model=stamp.model, choices=[choice])

    async def chunks() -> AsyncIterator[ChatCompletionChunk]:
        yield chunk(ChatDelta(role="assistant", content=""))
        async for event in generation.events():
            if isinstance(event, TextChunk):
                yield chunk(ChatDelta(content=event.text))
            else:
                yield chunk(ChatDelta(), finish_reason_of(event))
                if body.include_usage:
                    yield ChatCompletionChunk(
                        id=stamp.id, created=stamp.created, model=stamp.model, choices=[], usage=usage_of(event)
                    )

    return await collect_or_stream(generation, request, response, stream=body.stream, answer=answer, chunks=chunks)
