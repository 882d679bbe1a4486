"""What every generation route does: pick the model, acquire it, turn request knobs into sampling parameters, run
the generation on the model's engine and read its text back, cancelling it when the client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from core.db import session_scope
from core.errors import InvalidRequest
from core.settings import Settings
from inference.catalog import ModelNotReady, ModelSource, resolve
from inference.engine.engine import (
    AsyncSink,
    Disconnected,
    EngineUnavailable,
    Failed,
    Finished,
    GenerationRequest,
    TextChunk,
)
from inference.engine.loader import LoadedModel, ModelLoadError
from inference.engine.sampling import SamplingParams
from inference.errors import ClientGone, EngineBusy, GenerationFailed
from inference.registry import Hold, Registry
from inference.schemas import SamplingFields

DEFAULT_ALIASES = frozenset({"", "default"})
ACQUIRE_ATTEMPTS = 3


@dataclass(frozen=True)
class Result:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class Generation:
    """One request's run on a held model. ``close`` cancels it (if still running) and releases the hold."""

    def __init__(self, hold: Hold, prompt_ids: list[int], params: SamplingParams) -> None:
        self.hold = hold
        self.model_name = hold.handle.name
        self.prompt_tokens = len(prompt_ids)
        self.sink = AsyncSink(asyncio.get_running_loop())
        self.job = GenerationRequest(prompt_ids, params, self.sink)
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
                    return Result("".join(parts), event.reason, event.prompt_tokens, event.completion_tokens)
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


class InferenceService:
    def __init__(self, registry: Registry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings

    def model_name(self, tenant: str, requested: str | None) -> str:
        if requested is None or requested.strip() in DEFAULT_ALIASES:
            return self.registry.default_for(tenant)
        return requested

    def _resolve(self, name: str, tenant: str) -> ModelSource:
        with session_scope() as session:
            return resolve(session, name, tenant, self.settings)

    async def acquire(self, tenant: str, requested: str | None) -> Hold:
        """A hold on the model that answers: loaded on demand (within the memory budget) if it is not in memory."""
        name = self.model_name(tenant, requested)
        hold = self.registry.hold(name, tenant)
        if hold is not None:
            return hold
        source = await run_in_threadpool(self._resolve, name, tenant)
        for _ in range(ACQUIRE_ATTEMPTS):
            try:
                await run_in_threadpool(self.registry.ensure, source)
            except ModelLoadError as exc:
                raise ModelNotReady(f"model {name!r} could not be loaded: {exc}", param="model") from exc
            hold = self.registry.hold(name, tenant)
            if hold is not None:
                return hold
        raise ModelNotReady(f"model {name!r} is being swapped out; retry", param="model")

    def sampling(
        self,
        model: LoadedModel,
        fields: SamplingFields,
        *,
        prompt_tokens: int,
        max_new_tokens: int | None,
        length_param: str,
        prompt_param: str,
    ) -> SamplingParams:
        limit = self.settings.max_new_tokens_limit
        if max_new_tokens is not None and max_new_tokens > limit:
            raise InvalidRequest(f"{length_param} is at most {limit}", param=length_param, code="max_tokens_too_large")
        room = model.max_positions - prompt_tokens
        if room < 1:
            raise InvalidRequest(
                f"the prompt has {prompt_tokens} tokens; this model's context is {model.max_positions}",
                param=prompt_param,
                code="context_length_exceeded",
            )
        defaults = model.sampling_defaults
        temperature = fields.temperature if fields.temperature is not None else float(defaults.get("temperature", 0.0))
        return SamplingParams(
            max_new_tokens=min(max_new_tokens or self.settings.max_new_tokens_default, room),
            temperature=temperature,
            top_p=fields.top_p if fields.top_p is not None else float(defaults.get("top_p", 1.0)),
            top_k=fields.top_k if fields.top_k is not None else int(defaults.get("top_k", 0)),
            repetition_penalty=(
                fields.repetition_penalty
                if fields.repetition_penalty is not None
                else float(defaults.get("repetition_penalty", 1.0))
            ),
            presence_penalty=float(getattr(fields, "presence_penalty", None) or 0.0),
            frequency_penalty=float(getattr(fields, "frequency_penalty", None) or 0.0),
            stop=tuple(fields.stop_list),
            seed=fields.seed,
            ignore_eos=fields.ignore_eos,
        )
