"""A generation feature's answer, whole or streamed, and the one SSE adapter every stream goes through.

Whole: the answer is collected (a client that leaves meanwhile cancels it) into the feature's response model, which
the route returns, with the model that answered in the ``x-conch-model`` header. Streamed: the feature's chunks go
out as server-sent events, ``data: [DONE]`` last; a generation that fails midway ends the stream with an error event
in OpenAI's envelope, and the generation is closed (cancelled, its hold released) however the stream ends, also
when the client leaves before the first byte.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from fastapi import Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask

from core.errors import error_body
from inference.errors import GenerationFailed
from inference.serving.generation import Generation, Result

MODEL_HEADER = "x-conch-model"
SSE_DONE = "data: [DONE]\n\n"

AnswerT = TypeVar("AnswerT", bound=BaseModel)


async def collect_or_stream(
    generation: Generation,
    request: Request,
    response: Response,
    *,
    stream: bool,
    answer: Callable[[Result], AnswerT],
    chunks: Callable[[], AsyncIterator[BaseModel]],
) -> AnswerT | StreamingResponse:
    """``answer`` builds the whole response from the collected result; ``chunks`` yields the stream's events."""
    if stream:
        return event_stream(generation, chunks())
    result = await generation.collect(request)
    response.headers[MODEL_HEADER] = generation.model_name
    return answer(result)


def event_stream(generation: Generation, chunks: AsyncIterator[BaseModel]) -> StreamingResponse:
    return StreamingResponse(
        _events(generation, chunks),
        media_type="text/event-stream",
        headers={MODEL_HEADER: generation.model_name, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        # Runs even when the client leaves before the body starts (the generator's finally would never run).
        background=BackgroundTask(generation.close),
    )


async def _events(generation: Generation, chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield _event(chunk.model_dump_json())
        yield SSE_DONE
    except GenerationFailed as exc:
        yield _event(json.dumps(error_body(exc.message, type_=exc.error_type, code=exc.code), ensure_ascii=False))
    finally:
        generation.close()


def _event(data: str) -> str:
    return f"data: {data}\n\n"
