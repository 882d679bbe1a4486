"""One generation thread per loaded model, batching every request that is waiting when a step starts.

Continuous batching: between two decode steps, waiting requests are prefilled together and join the running batch;
finished, stopped and cancelled rows leave it. Long prompts are read in chunks of ``prefill_chunk`` tokens with a
decode step of the running batch after each chunk, so a long prompt arriving does not stall every other stream.
The event loop never runs model code: it hands a request to the thread through a queue and receives text through
a ``Sink`` (an asyncio queue fed with ``call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from inference.engine.cache import RowCache
from inference.engine.device import Threads
from inference.engine.loader import LoadedModel
from inference.engine.sampling import RowSampler, SamplingParams, choose_tokens
from inference.engine.text import IncrementalDetokenizer, StopMatcher

log = logging.getLogger("conch.inference.engine")


# ---------------------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class TextChunk:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str
    unavailable: bool = False  # the engine stopped (died or unloaded): the request may be retried (a 503)


@dataclass(frozen=True)
class Disconnected:
    """Put in a request's queue by the request side itself when its client goes away."""


Event = TextChunk | Finished | Failed


class Sink(Protocol):
    def put(self, event: Event) -> None: ...


class AsyncSink:
    """Delivers events from the generation thread into an asyncio queue owned by one request handler."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Event | Disconnected] = asyncio.Queue()

    def put(self, event: Event) -> None:
        # A closed loop (shutdown) has nobody left to read.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class EngineUnavailable(Exception):
    """The engine is stopped or its thread died; the request was not accepted."""


class EngineObserver(Protocol):
    """What the engine reports (the Prometheus metrics implement it)."""

    def queue_depth(self, model: str, depth: int) -> None: ...
    def batch(self, model: str, size: int) -> None: ...
    def first_token(self, model: str, seconds: float) -> None: ...
    def tokens(self, model: str, count: int) -> None: ...
    def finished(self, model: str, reason: str, decode_tokens_per_second: float | None) -> None: ...
    def failure(self, kind: str) -> None: ...


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    submitted_at: float = field(default_factory=time.perf_counter)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Called from the event loop when the client goes away; the row leaves the batch before the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass
class _Row:
    request: GenerationRequest
    sampler: RowSampler
    detokenizer: IncrementalDetokenizer
    stops: StopMatcher
    generated: int = 0
    last_token: int = 0
    first_token_at: float | None = None
    finish_reason: str | None = None


@dataclass
class _Prefill:
    """Arrivals whose prompts are being read chunk by chunk; they join the batch after the last chunk."""

    requests: list[GenerationRequest]
    ids: torch.Tensor  # [rows, longest] left-padded prompts
    mask: torch.Tensor
    cache: RowCache  # its length is how many prompt columns have been read


# ---------------------------------------------------------------------------------------------- engine


class Engine:
    def __init__(
        self,
        model: LoadedModel,
        *,
        max_batch_size: int,
        prefill_chunk: int = 256,
        observer: EngineObserver | None = None,
    ) -> None:
        self.model = model
        self.max_batch_size = max(1, max_batch_size)
        self.prefill_chunk = prefill_chunk  # 0: a whole prompt in one forward pass
        self._pending: _Prefill | None = None
        self.observer = observer
        self._incoming: queue.Queue[GenerationRequest] = queue.Queue()
        self._rows: list[_Row] = []
        self._cache: RowCache | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"generate:{model.name}", daemon=True)
        self.error: str | None = None  # the last generation error, cleared by the next good step
        self.death: str | None = None  # why the thread ended, if it did not end by stop()
        self.steps = 0
        self.max_batch_seen = 0
        self._threads_wanted: Threads | None = None  # applied by the generation thread between steps

    # ----------------------------------------------------------------------------------- control

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set() and self.death is None

    @property
    def healthy(self) -> bool:
        return self.alive and self.error is None

    @property
    def thread_ident(self) -> int | None:
        return self._thread.ident

    @property
    def queue_depth(self) -> int:
        return self._incoming.qsize()

    @property
    def running(self) -> int:
        return len(self._rows)

    def set_threads(self, threads: Threads) -> None:
        """Ask the generation thread to compute on ``threads`` from its next step on (a native backend's
        context may only be touched by that thread)."""
        self._threads_wanted = threads

    def _apply_threads(self) -> None:
        wanted, self._threads_wanted = self._threads_wanted, None
        set_threads = getattr(self.model.decoder, "set_threads", None)
        if wanted is not None and set_threads is not None:
            set_threads(wanted.decode, wanted.prefill)

    def submit(self, request: GenerationRequest) -> None:
        if not self.alive:
            raise EngineUnavailable(self.death or f"the engine of {self.model.name} is stopped")
        self._incoming.put(request)
        self._report_queue()

    # ----------------------------------------------------------------------------------- thread

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                if self._threads_wanted is not None:
                    self._apply_threads()
                self._drop_cancelled()
                if self._pending is None:
                    arrivals = self._take(self.max_batch_size - len(self._rows), wait=not self._rows)
                    if arrivals:
                        self._guarded(self._start_prefill, arrivals)
                if self._pending is not None:
                    self._guarded(self._prefill_step)
                if self._rows:
                    self._guarded(self._decode_step)
        except BaseException as exc:  # anything escaping the guarded steps kills the thread: say why
            self.death = f"generation thread died: {type(exc).__name__}: {exc}"
            log.error("engine.died", extra={"model": self.model.name, "error": self.death})
            if self.observer:
                self.observer.failure("engine_died")
        finally:
            reason = self.death or f"{self.model.name} was unloaded"
            for request in [row.request for row in self._rows] + (self._pending.requests if self._pending else []):
                request.sink.put(Failed(reason, unavailable=True))
            self._drop_batch()
            while True:
                try:
                    self._incoming.get_nowait().sink.put(Failed(reason, unavailable=True))
                except queue.Empty:
                    break
            # Native weights (llama.cpp) are freed here, on the only thread that ever used them.
            close = getattr(self.model.decoder, "close", None)
            if close is not None:
                close()

    def _take(self, room: int, *, wait: bool) -> list[GenerationRequest]:
        taken: list[GenerationRequest] = []
        if room <= 0:
            return taken
        try:
            if wait:
                taken.append(self._incoming.get(timeout=0.2))
            while len(taken) < room:
                taken.append(self._incoming.get_nowait())
        except queue.Empty:
            pass
        self._report_queue()
        return [r for r in taken if not r.cancelled]

    def _guarded(self, step: Callable[..., None], *arrivals: list[GenerationRequest]) -> None:
        """A generation error fails the requests involved and marks the engine unhealthy; the thread lives on."""
        try:
            step(*arrivals)
            self.error = None
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("engine.generation_failed", extra={"model": self.model.name})
            if self.observer:
                self.observer.failure("generation")
            involved = {id(row.request): row.request for row in self._rows}
            for group in [*arrivals, self._pending.requests if self._pending else []]:
                involved.update({id(request): request for request in group})
            for request in involved.values():
                request.sink.put(Failed(f"generation failed: {self.error}"))
            self._drop_batch()

    def _drop_batch(self) -> None:
        """Forget every row and hand their caches back (a llama.cpp context frees its sequences)."""
        for cache in (self._cache, self._pending.cache if self._pending else None):
            if cache is not None:
                with contextlib.suppress(Exception):  # a broken cache must not stop the failure being reported
                    cache.release()
        self._rows, self._cache, self._pending = [], None, None

    def _drop_cancelled(self) -> None:
        if any(row.request.cancelled for row in self._rows):
            for row in self._rows:
                if row.request.cancelled:
                    row.finish_reason = "cancelled"
            self._retire_finished()

    def _start_prefill(self, requests: list[GenerationRequest]) -> None:
        model = self.model
        longest = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), longest), model.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), longest), dtype=torch.bool)
        for row, request in enumerate(requests):
            ids[row, longest - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids, dtype=torch.long)
            mask[row, longest - len(request.prompt_ids) :] = True
        device = model.decoder.device
        # Room for a few dozen tokens now; the cache doubles when it fills.
        cache = model.decoder.new_cache(len(requests), longest + 32)
        self._pending = _Prefill(requests, ids.to(device), mask.to(device), cache)

    def _prefill_step(self) -> None:
        """Read the next chunk of the pending prompts; after the last one they join the running batch."""
        pending = self._pending
        assert pending is not None
        width, done = pending.ids.shape[1], pending.cache.length
        end = width if self.prefill_chunk <= 0 else min(width, done + self.prefill_chunk)
        logits = self.model.decoder.forward(pending.ids[:, done:end], pending.mask[:, done:end], pending.cache)
        if end < width:
            return
        self._pending = None
        model, requests, cache = self.model, pending.requests, pending.cache
        rows = [
            _Row(
                request=r,
                sampler=RowSampler.create(r.params, r.prompt_ids),
                detokenizer=IncrementalDetokenizer(model.tokenizer),
                stops=StopMatcher(tuple(r.params.stop) + model.stop_texts),
            )
            for r in requests
        ]
        if self._cache is None or not self._rows:
            self._cache, self._rows = cache, rows
        else:
            self._cache.extend(cache)
            self._rows.extend(rows)
        self._advance(rows, self._choose(logits, rows))

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """Next tokens; a row whose logits are not finite (broken weights, overflow) fails instead of
        answering garbage. Its token is a placeholder: the row leaves the batch before it is used."""
        finite = torch.isfinite(logits).all(dim=-1)
        if not bool(finite.all()):
            for row, ok in zip(rows, finite.tolist(), strict=True):
                if not ok:
                    row.finish_reason = "failed"
                    row.request.sink.put(Failed("the model produced non-finite logits"))
            if self.observer:
                self.observer.failure("non_finite_logits")
            logits = torch.nan_to_num(logits, nan=0.0, posinf=0.0, neginf=0.0)
        return choose_tokens(logits, [row.sampler for row in rows])

    def _decode_step(self) -> None:
        assert self._cache is not None
        device = self.model.decoder.device
        tokens = torch.tensor([[row.last_token] for row in self._rows], dtype=torch.long, device=device)
        ones = torch.ones_like(tokens, dtype=torch.bool)
        logits = self.model.decoder.forward(tokens, ones, self._cache)
        size = len(self._rows)
        self.steps += 1
        self.max_batch_seen = max(self.max_batch_seen, size)
        if self.observer:
            self.observer.batch(self.model.name, size)
        rows = list(self._rows)
        self._advance(rows, self._choose(logits, rows))

    def _advance(self, rows: list[_Row], tokens: list[int]) -> None:
        now = time.perf_counter()
        model = self.model
        for row, token in zip(rows, tokens, strict=True):
            if row.finish_reason is not None:  # failed while choosing
                continue
            request, params = row.request, row.request.params
            row.generated += 1
            row.last_token = token
            row.sampler.observe(token)
            if row.first_token_at is None:
                row.first_token_at = now
                if self.observer:
                    self.observer.first_token(model.name, now - request.submitted_at)
            if token in model.stop_token_ids and not params.ignore_eos:
                row.finish_reason = "stop"
                continue
            text = row.stops.feed(row.detokenizer.push(token))
            if text:
                request.sink.put(TextChunk(text))
            if row.stops.stopped:
                row.finish_reason = "stop"
            elif row.generated >= params.max_new_tokens or (
                len(request.prompt_ids) + row.generated >= model.max_positions
            ):
                row.finish_reason = "length"
        if self.observer:
            self.observer.tokens(model.name, len(rows))
        self._retire_finished()

    def _retire_finished(self) -> None:
        if all(row.finish_reason is None for row in self._rows):
            return
        now = time.perf_counter()
        keep: list[int] = []
        for index, row in enumerate(self._rows):
            if row.finish_reason is None:
                keep.append(index)
                continue
            if row.finish_reason == "failed":
                continue  # its Failed event went out already
            if row.finish_reason != "cancelled":
                tail = row.stops.flush()
                if tail:
                    row.request.sink.put(TextChunk(tail))
            row.request.sink.put(Finished(row.finish_reason, len(row.request.prompt_ids), row.generated))
            if self.observer:
                rate = None
                if row.first_token_at is not None and row.generated > 1 and now > row.first_token_at:
                    rate = (row.generated - 1) / (now - row.first_token_at)
                self.observer.finished(self.model.name, row.finish_reason, rate)
        self._rows = [self._rows[i] for i in keep]
        if self._cache is not None:
            if self._rows:
                self._cache.select(keep)
            else:
                self._cache.release()
                self._cache = None

    def _report_queue(self) -> None:
        if self.observer:
            self.observer.queue_depth(self.model.name, self._incoming.qsize())
