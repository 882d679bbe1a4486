"""An ``Engine`` whose generation runs in a vLLM server: the serving layer submits requests to it unchanged.

Each request goes to the server's ``/v1/completions`` as token ids (Conch renders and tokenizes, so the prompt is
the same token for token on every backend), streamed; its text comes back through the request's sink as
``TextChunk`` events and ends with ``Finished`` (token counts from vLLM's usage) or ``Failed``. vLLM batches the
requests itself (continuous batching, paged KV cache). A fine-tune served as an adapter is the same base server
asked for the adapter's name. The requests run on an event loop in the engine's own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import httpx

from inference.engine.engine import Engine, EngineObserver, EngineUnavailable, Failed, Finished, GenerationRequest
from inference.engine.engine import TextChunk as TextChunk
from inference.engine.loader import LoadedModel
from inference.vllm.server import VllmServer

log = logging.getLogger("conch.inference.vllm")

CANCEL_POLL_SECONDS = 0.05


def completion_payload(served_name: str, request: GenerationRequest, model: LoadedModel) -> dict[str, Any]:
    """The OpenAI completions body for ``request``: its ids as the prompt and Conch's stops and sampling."""
    params = request.params
    payload: dict[str, Any] = {
        "model": served_name,
        "prompt": list(request.prompt_ids),
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "repetition_penalty": params.repetition_penalty,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "stop": sorted({*params.stop, *model.stop_texts}),
        "stop_token_ids": sorted(model.stop_token_ids),
        "ignore_eos": params.ignore_eos,
        "skip_special_tokens": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if params.top_k > 0:
        payload["top_k"] = params.top_k
    if params.seed is not None:
        payload["seed"] = params.seed
    if params.ignore_eos:
        payload["stop_token_ids"] = []
    return payload


class VllmEngine(Engine):
    """Runs ``served_name`` (the base model, or an adapter) on ``server``; ``on_stop`` runs when it is stopped
    (an adapter's engine unloads its adapter there)."""

    def __init__(
        self,
        model: LoadedModel,
        server: VllmServer,
        served_name: str,
        *,
        observer: EngineObserver | None = None,
        wait_seconds: float = 300.0,
        on_stop: Any = None,
    ) -> None:
        super().__init__(model, max_batch_size=1, observer=observer)
        self.server = server
        self.served_name = served_name
        self.wait_seconds = wait_seconds  # how long a request waits for a restarting server
        self._on_stop = on_stop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None
        self._running: set[asyncio.Task[None]] = set()

    # ----------------------------------------------------------------------------------- control

    def start(self) -> VllmEngine:
        super().start()
        deadline = time.monotonic() + 10
        while self._loop is None and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        first = not self._stopping.is_set()
        self._stopping.set()
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(lambda: None)  # wake the loop so it sees the stop
        super().stop(timeout)
        if first and self._on_stop is not None:
            self._on_stop()

    @property
    def alive(self) -> bool:
        return super().alive and not self.server.stopped

    @property
    def healthy(self) -> bool:
        return self.alive and self.server.healthy

    @property
    def queue_depth(self) -> int:
        return 0  # vLLM queues; Conch passes every request on at once

    @property
    def running(self) -> int:
        return len(self._running)

    def set_threads(self, threads: Any) -> None:
        """vLLM's threads are set when its process starts."""

    def submit(self, request: GenerationRequest) -> None:
        loop = self._loop
        if not self.alive or loop is None:
            raise EngineUnavailable(self.death or self.server.problem or f"the engine of {self.model.name} is stopped")
        loop.call_soon_threadsafe(self._begin, request)

    # ----------------------------------------------------------------------------------- thread

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main(loop))
        except BaseException as exc:
            self.death = f"vLLM client thread died: {type(exc).__name__}: {exc}"
            log.error("engine.died", extra={"model": self.model.name, "error": self.death})
        finally:
            loop.close()

    async def _main(self, loop: asyncio.AbstractEventLoop) -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0), limits=limits) as client:
            self._client = client
            self._loop = loop
            while not self._stopping.is_set():
                await asyncio.sleep(0.1)
            reason = f"{self.model.name} was unloaded"
            for task in list(self._running):
                task.cancel()
            if self._running:
                await asyncio.gather(*self._running, return_exceptions=True)
            self._fail_unstarted(reason)

    def _fail_unstarted(self, reason: str) -> None:
        self._loop = None
        log.info("engine.stopped", extra={"model": self.model.name, "reason": reason})

    def _begin(self, request: GenerationRequest) -> None:
        if self._stopping.is_set():
            request.sink.put(Failed(f"{self.model.name} was unloaded", unavailable=True))
            return
        task = asyncio.get_running_loop().create_task(self._serve(request))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _serve(self, request: GenerationRequest) -> None:
        try:
            finished = await self._generate(request)
        except asyncio.CancelledError:
            request.sink.put(Failed(f"{self.model.name} was unloaded", unavailable=True))
            return
        except _Unavailable as exc:
            if self.observer:
                self.observer.failure("engine_unavailable")
            request.sink.put(Failed(str(exc), unavailable=True))
            return
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            if self.observer:
                self.observer.failure("generation")
            request.sink.put(Failed(f"generation failed: {exc}"))
            return
        self.error = None
        request.sink.put(finished)

    async def _wait_server(self) -> None:
        deadline = time.monotonic() + self.wait_seconds
        while not self.server.healthy:
            if self.server.stopped or self._stopping.is_set() or time.monotonic() > deadline:
                raise _Unavailable(self.server.problem or "vLLM server is not running")
            await asyncio.sleep(0.1)

    async def _generate(self, request: GenerationRequest) -> Finished:
        await self._wait_server()
        client = self._client
        assert client is not None
        payload = completion_payload(self.served_name, request, self.model)
        name = self.model.name
        prompt_tokens, completion_tokens, reason = len(request.prompt_ids), 0, "length"
        first_at: float | None = None
        try:
            async with client.stream("POST", f"{self.server.url}/v1/completions", json=payload) as response:
                if response.status_code != 200:
                    body = (await response.aread()).decode(errors="replace")
                    if response.status_code >= 500 or response.status_code == 404:
                        raise _Unavailable(f"vLLM answered {response.status_code}: {_message(body)}")
                    raise RuntimeError(f"vLLM refused the request ({response.status_code}): {_message(body)}")
                async for line in response.aiter_lines():
                    if request.cancelled:
                        return Finished("cancelled", prompt_tokens, completion_tokens)
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage")
                    if usage:
                        prompt_tokens = int(usage.get("prompt_tokens") or prompt_tokens)
                        completion_tokens = int(usage.get("completion_tokens") or completion_tokens)
                    for choice in chunk.get("choices") or []:
                        text = choice.get("text") or ""
                        if text:
                            if first_at is None:
                                first_at = time.perf_counter()
                                if self.observer:
                                    self.observer.first_token(name, first_at - request.submitted_at)
                            request.sink.put(TextChunk(text))
                        if choice.get("finish_reason"):
                            reason = "stop" if choice["finish_reason"] == "stop" else "length"
        except httpx.TransportError as exc:
            # The process died or restarts under this request: retryable, like an unloaded engine.
            raise _Unavailable(f"vLLM server connection lost: {exc}") from exc
        if self.observer:
            self.observer.tokens(name, completion_tokens)
            rate = None
            if first_at is not None and completion_tokens > 1:
                elapsed = time.perf_counter() - first_at
                rate = (completion_tokens - 1) / elapsed if elapsed > 0 else None
            self.observer.finished(name, reason, rate)
        return Finished(reason, prompt_tokens, completion_tokens)


class _Unavailable(Exception):
    pass


def _message(body: str) -> str:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        parsed = json.loads(body)
        error = parsed.get("error", parsed)
        if isinstance(error, dict):
            return str(error.get("message", body))[:500]
        return str(error)[:500]
    return body[:500]
