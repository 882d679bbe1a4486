"""The model side of every generation route: which model answers, acquiring it (loaded on demand within the memory
budget), and the request's knobs turned into sampling parameters within the model's context. The serving layer
(``inference.serving``) runs the generation itself."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from core.db import session_scope
from core.errors import InvalidRequest
from core.settings import Settings
from inference.admission import Admission
from inference.catalog import ModelNotReady, ModelSource, resolve
from inference.engine.loader import LoadedModel, ModelLoadError
from inference.engine.sampling import SamplingParams
from inference.registry import Hold, Registry
from inference.schemas import SamplingFields

DEFAULT_ALIASES = frozenset({"", "default"})
ACQUIRE_ATTEMPTS = 3  # a model unloaded between its load and the hold is loaded again, this often


class InferenceService:
    def __init__(self, registry: Registry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings
        self.admission = Admission(settings.max_queued_requests, settings.max_concurrent_requests_per_tenant)
        # Loads (and requests waiting on one) get threads of their own: a slow load or a crowd waiting on it
        # never takes the shared pool's threads that authentication, the database and health checks run on.
        self.loads = ThreadPoolExecutor(max_workers=settings.model_load_threads, thread_name_prefix="model-load")

    def model_name(self, tenant: str, requested: str | None) -> str:
        if requested is None or requested.strip() in DEFAULT_ALIASES:
            return self.registry.default_for(tenant)
        return requested

    def _resolve(self, name: str, tenant: str) -> ModelSource:
        with session_scope() as session:
            return resolve(session, name, tenant, self.settings)

    async def acquire(self, tenant: str, requested: str | None) -> Hold:
        """A hold on the model that answers, for an admitted request (429 past the tenant's limit, 503 past the
        service's): the admission's place goes back with the hold, or at once if no hold is had."""
        ticket = self.admission.admit(tenant)
        try:
            hold = await self._acquire(tenant, requested)
        except BaseException:
            ticket.release()
            raise
        hold.also_release(ticket.release)
        return hold

    async def _acquire(self, tenant: str, requested: str | None) -> Hold:
        """A hold on the model that answers: loaded on demand (within the memory budget) if it is not in memory."""
        name = self.model_name(tenant, requested)
        hold = self.registry.hold(name, tenant)
        if hold is not None:
            return hold
        source = await run_in_threadpool(self._resolve, name, tenant)
        for _ in range(ACQUIRE_ATTEMPTS):
            try:
                await asyncio.get_running_loop().run_in_executor(self.loads, self._ensure, source)
            except ModelLoadError as exc:
                raise ModelNotReady(f"model {name!r} could not be loaded: {exc}", param="model") from exc
            hold = self.registry.hold(name, tenant)
            if hold is not None:
                return hold
        raise ModelNotReady(f"model {name!r} is being swapped out; retry", param="model")

    def _ensure(self, source: ModelSource) -> None:
        self.registry.ensure(source, on_demand=True)

    def close(self) -> None:
        self.loads.shutdown(wait=False, cancel_futures=True)

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


def service_of(request: Request) -> InferenceService:
    service: InferenceService = request.app.state.service
    return service


ServiceDep = Annotated[InferenceService, Depends(service_of)]
