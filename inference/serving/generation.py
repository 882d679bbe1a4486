"""One request's generation on a held model, and the part of every feature's ``start`` that is the same.

``start_generation`` acquires the model, lets the feature turn its request into a ``Prompt`` (token ids and sampling
parameters) and hands it to the model's engine; if anything before that fails, the hold goes back at once. From
then on the ``Generation`` owns the hold until it is closed, however the request ends (answer collected, stream
finished or broken, client gone).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from core.errors import InvalidRequest
from core.templates import Message
from inference.engine.engine import (
    AsyncSink,
    Disconnected,
    EngineUnavailable,
    Failed,
    Finished,
    GenerationRequest,
    TextChunk,
)
from inference.engine.loader import LoadedModel
from inference.engine.sampling import SamplingParams
from inference.errors import ClientGone, EngineBusy, GenerationFailed
from inference.registry import Hold
from inference.schemas import FinishReason, Usage
from inference.service import InferenceService


@dataclass(frozen=True)
class Prompt:
    """A request made ready for the engine by its feature."""

    ids: list[int]
    params: SamplingParams
    text: str = ""  # the prompt as text, for a feature that echoes it (/v1/completions)


@dataclass(frozen=True)
class Result:
    """A whole answer."""

    text: str
    finish_reason: FinishReason
    usage: Usage


def usage_of(finished: Finished) -> Usage:
    return Usage(
        prompt_tokens=finished.prompt_tokens,
        completion_tokens=finished.completion_tokens,
        total_tokens=finished.prompt_tokens + finished.completion_tokens,
    )


def finish_reason_of(finished: Finished) -> FinishReason:
    if finished.reason == "stop":
        return "stop"
    if finished.reason == "length":
        return "length"
    # The engine says "cancelled" only to a request that cancelled itself: its client went away, nobody reads on.
    raise ClientGone()


class Generation:
    """One request's run on a held model. ``close`` cancels it (if still running) and releases the hold."""

    def __init__(self, hold: Hold, prompt: Prompt) -> None:
        self.hold = hold
        self.prompt = prompt
        self.model_name = hold.handle.name
        self.sink = AsyncSink(asyncio.get_running_loop())
        self.job = GenerationRequest(prompt.ids, prompt.params, self.sink)
        self._closed = False

    def start(self) -> Generation:
        try:
            self.hold.handle.engine.submit(self.job)
        except EngineUnavailable as exc:
            self.close()
            raise EngineBusy(f"model {self.model_name!r} is not available right now: {exc}") from exc
        return self

    async def events(self) -> AsyncIterator[TextChunk | Finished]:
        while True:
            event = await self.sink.queue.get()
            if isinstance(event, Failed):
                if event.unavailable:
                    raise EngineBusy(f"model {self.model_name!r} stopped while answering ({event.message}); retry")
                raise GenerationFailed(event.message)
            if isinstance(event, Disconnected):
                raise ClientGone()
            yield event
            if isinstance(event, Finished):
                return

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.job.cancel()
            self.hold.release()

    async def collect(self, request: Request | None = None) -> Result:
        """Read the whole answer; a client that disconnects meanwhile cancels the generation."""
        watcher = asyncio.create_task(_watch_disconnect(request, self.sink)) if request is not None else None
        parts: list[str] = []
        try:
            async for event in self.events():
                if isinstance(event, TextChunk):
                    parts.append(event.text)
                else:
                    return Result("".join(parts), finish_reason_of(event), usage_of(event))
            raise GenerationFailed("the generation ended without an answer")
        finally:
            if watcher is not None:
                watcher.cancel()
            self.close()


async def _watch_disconnect(request: Request | None, sink: AsyncSink) -> None:
    """Wait for the ASGI disconnect message (the body was read already) and tell the reader."""
    if request is None:
        return
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            sink.queue.put_nowait(Disconnected())
            return


async def start_generation(
    service: InferenceService, tenant: str, requested: str | None, prepare: Callable[[LoadedModel], Prompt]
) -> Generation:
    """Acquire the model ``requested`` names (the tenant's deployed one if none), ``prepare`` the request on it (in a
    worker thread) and start the generation. Until the Generation owns the hold, an error while preparing gives it
    back."""
    hold = await service.acquire(tenant, requested)
    try:
        # Rendering and tokenizing take time in proportion to the request: in a worker thread, so one large
        # request never holds up the event loop every other request (and /healthz) is answered on.
        prompt = await run_in_threadpool(prepare, hold.handle.model)
        return Generation(hold, prompt).start()
    except BaseException:
        hold.release()  # a no-op if the Generation released it already
        raise


def encode_chat(model: LoadedModel, messages: list[Message]) -> list[int]:
    """The conversation rendered with the model's chat template and encoded; a template's refusal is a 400."""
    try:
        return model.encode_chat(messages)
    except ValueError as exc:  # the template cannot render this conversation (e.g. a role out of place)
        raise InvalidRequest(str(exc), param="messages", code="invalid_messages") from exc
    except Exception as exc:  # a template's own raise_exception() reports a jinja error
        raise InvalidRequest(f"the model's chat template refused these messages: {exc}", param="messages") from exc
