"""Which models are in memory, which one answers each tenant, and the swap between them.

Every model in memory passed a smoke generation before it became reachable. Requests take a ``Hold`` on the
model they run on, so a swap (which only changes the tenant's default name) never interrupts them, and eviction
(least recently used first, to stay within ``MODEL_MEMORY_BUDGET_BYTES``) only ever unloads a model nobody holds
and nobody gets by default.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sqlalchemy import select

from artifacts import llamacpp as native
from artifacts.golden import Reference, ReferenceError
from core.contracts import ModelStatus, parse_checkpoint_model_id
from core.db import session_scope
from core.hostload import training_on_this_host
from core.orm import DEFAULT_TENANT, ModelRecord
from core.settings import Settings
from inference.catalog import ModelSource
from inference.engine.cache import KV_CACHE_BYTES_LLAMACPP, kv_values_per_token
from inference.engine.device import choose_device, configure_threads, generation_threads
from inference.engine.engine import Engine, EngineUnavailable, Failed, Finished, GenerationRequest, TextChunk
from inference.engine.loader import MAX_CONTEXT, LlamaCppOptions, LoadedModel, ModelLoadError, load_model
from inference.engine.routes import Route, plan_routes
from inference.engine.sampling import SamplingParams
from inference.errors import ModelDoesNotFit
from inference.gate import GateResult, reference_for, run_gate
from inference.metrics import Metrics
from inference.vllm.pool import VllmPool

log = logging.getLogger("conch.inference.registry")

SMOKE_MESSAGES = [{"role": "user", "content": "Say hello."}]
SMOKE_TIMEOUT_SECONDS = 120.0
# A model that failed to load is not retried on every request (each try costs seconds of CPU) for this long;
# a deployment naming it tries again at once.
RETRY_FAILED_LOAD_SECONDS = 10.0
RETRY_NO_ROOM_SECONDS = 5  # a model refused for want of room: held models are released within seconds
MAX_SAFETENSORS_HEADER = 100 * 1024**2  # the format's own limit


@dataclass
class ModelHandle:
    source: ModelSource
    model: LoadedModel
    engine: Engine
    gate: GateResult | None = None
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    in_use: int = 0
    retired: bool = False  # no longer in the registry; stopped once the last hold is released

    @property
    def name(self) -> str:
        return self.source.name


def _mib(size: int) -> str:
    return f"{size / 1024**2:.1f}"


# Bytes per weight on each route, at least (block scales come on top): a lower bound, so that the estimate made
# before a load never refuses a model that would fit.
_BYTES_PER_WEIGHT = {"f32": 4.0, "fp32": 4.0, "int8": 1.0, "q8_0": 1.0, "int4": 0.5, "q4_0": 0.5, "q4_1": 0.5}
_BYTES_PER_WEIGHT["iq4_nl"] = 0.5


def _route_bytes_per_weight(route: Route) -> float:
    if route.backend == "llamacpp":
        return _BYTES_PER_WEIGHT.get(route.quant, 2.0)
    if route.quant != "none":
        return _BYTES_PER_WEIGHT.get(route.quant, 0.5)
    return _BYTES_PER_WEIGHT.get(route.dtype, 2.0)  # auto is 16-bit or wider


@dataclass(frozen=True)
class CacheShape:
    """How the service sizes a model's KV cache: rows at once, and llama.cpp's context per row."""

    rows: int
    llamacpp_context_per_row: int


def _route_cache_tokens(route: Route, shape: CacheShape, max_positions: int) -> tuple[int, float]:
    """The KV cache tokens ``route`` can hold for a model, and bytes per cached value."""
    if route.backend == "llamacpp":
        return shape.rows * shape.llamacpp_context_per_row, KV_CACHE_BYTES_LLAMACPP
    return shape.rows * min(max_positions, MAX_CONTEXT), _BYTES_PER_WEIGHT.get(route.dtype, 2.0)


def estimate_bytes(folder: Path, routes: list[Route], shape: CacheShape) -> int:
    """A lower bound of the memory ``folder`` takes once loaded on the cheapest of ``routes``: weights (their
    count from the safetensors headers, no tensor is read) plus the KV cache its engine can fill (from
    config.json). 0 when it cannot be told."""
    weights = 0
    try:
        for path in folder.glob("*.safetensors"):
            with path.open("rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                if length > MAX_SAFETENSORS_HEADER:
                    return 0
                header = json.loads(handle.read(length))
            for key, entry in header.items():
                if key != "__metadata__":
                    weights += math.prod(int(n) for n in entry["shape"])
        config = json.loads((folder / "config.json").read_text())
        per_token = kv_values_per_token(SimpleNamespace(**config.get("text_config", config)))
        max_positions = int(config.get("max_position_embeddings") or 4096)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError, struct.error):
        return 0  # a broken folder: its load fails with the loader's own message
    if not routes:
        return 0
    sizes = []
    for route in routes:
        tokens, bytes_per_value = _route_cache_tokens(route, shape, max_positions)
        sizes.append(weights * _route_bytes_per_weight(route) + tokens * per_token * bytes_per_value)
    return int(min(sizes))


class Hold:
    """A request's hold on a model (a held model is never evicted); released exactly once, however the request
    ends."""

    def __init__(self, registry: Registry, handle: ModelHandle) -> None:
        self._registry = registry
        self.handle = handle
        self._released = False
        self._also: list[Callable[[], None]] = []

    def also_release(self, release: Callable[[], None]) -> None:
        """Run ``release`` too when the hold goes back (the request's admission ticket rides along)."""
        self._also.append(release)

    def release(self) -> None:
        if not self._released:
            self._released = True
            try:
                self._registry._release(self.handle)
            finally:
                for release in self._also:
                    release()


class _WaitSink:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.events: list[Any] = []

    def put(self, event: TextChunk | Finished | Failed) -> None:
        self.events.append(event)
        if not isinstance(event, TextChunk):
            self.done.set()


def smoke_test(handle_engine: Engine, model: LoadedModel, timeout: float = SMOKE_TIMEOUT_SECONDS) -> None:
    """A short greedy answer through the real engine thread; raises ModelLoadError unless it comes back (the
    engine fails a generation whose logits are not finite, so weights holding NaN or inf are caught here too)."""
    sink = _WaitSink()
    handle_engine.submit(GenerationRequest(model.encode_chat(SMOKE_MESSAGES), SamplingParams(max_new_tokens=2), sink))
    if not sink.done.wait(timeout):
        raise ModelLoadError(f"smoke generation gave no answer within {timeout:.0f}s")
    last = sink.events[-1]
    if isinstance(last, Failed):
        raise ModelLoadError(f"smoke generation failed: {last.message}")
    if not isinstance(last, Finished) or last.completion_tokens < 1:
        raise ModelLoadError("smoke generation produced no token")


def _close(model: LoadedModel) -> None:
    """Free a model that will not be served (llama.cpp's native memory is not the garbage collector's)."""
    close = getattr(model.decoder, "close", None)
    if close is not None:
        close()


class Registry:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._lock = threading.Lock()
        self._handles: dict[str, ModelHandle] = {}
        self._loading: dict[str, Future[ModelHandle]] = {}
        self._defaults: dict[str, str] = {}
        self.problems: dict[str, str] = {}  # model -> why it is not loaded (shown by /readyz)
        self._failed_at: dict[str, float] = {}
        self._sizes: dict[Path, int] = {}  # model folder -> bytes it took when last loaded (the budget's estimate)
        self.synced = False  # set once the deployments table has been read
        # Deployments this replica failed to load while another serves (or still loads) them: this replica keeps
        # the tenant's previous model and says so in /readyz. Set by the deployer: deployment_id, tenant, model,
        # reason (server paths already reduced).
        self.failed_deployments: list[dict[str, str]] = []
        self.threads = configure_threads(
            generation_threads(settings.inference_threads, training_on_this_host(settings))
        )
        self.routes = plan_routes(
            backend=settings.inference_backend,
            quant=settings.inference_quant,
            dtype=settings.inference_dtype,
            device=choose_device(settings.inference_device),
            llamacpp_available=native.available(),
        )
        # INFERENCE_BACKEND=vllm: models run in supervised vLLM servers (inference/vllm), not in this process.
        self.vllm = (
            VllmPool(settings, self.threads.decode, self.metrics) if settings.inference_backend == "vllm" else None
        )

    # ------------------------------------------------------------------------------- defaults

    def default_for(self, tenant: str) -> str:
        return self._defaults.get(tenant, self.settings.default_base_model)

    def defaults(self) -> dict[str, str]:
        return dict(self._defaults)

    def set_default(self, tenant: str, name: str) -> None:
        """The swap itself: one dict assignment, so a request sees the old model or the new, never neither."""
        self._defaults = {**self._defaults, tenant: name}

    def replace_defaults(self, mapping: dict[str, str]) -> None:
        self._defaults = dict(mapping)

    def _protected(self) -> set[str]:
        return {*self._defaults.values(), self.default_for(DEFAULT_TENANT)}

    # ------------------------------------------------------------------------------- holds

    def hold(self, name: str, tenant: str) -> Hold | None:
        """A hold on an already loaded model this tenant may use, or None (then resolve and ``ensure`` it)."""
        with self._lock:
            handle = self._handles.get(name)
            if handle is None or not handle.engine.alive or not handle.source.visible_to(tenant):
                return None
            handle.in_use += 1
            handle.last_used = time.monotonic()
            return Hold(self, handle)

    def _release(self, handle: ModelHandle) -> None:
        with self._lock:
            handle.in_use -= 1
            stop = handle.retired and handle.in_use == 0
        if stop:  # dropped (its model was deleted) while this request ran on it
            self._unload(handle)

    def loaded(self, name: str) -> ModelHandle | None:
        return self._handles.get(name)

    def handles(self) -> list[ModelHandle]:
        return list(self._handles.values())

    # ------------------------------------------------------------------------------- loading

    def ensure(self, source: ModelSource, *, deploying: bool = False, on_demand: bool = False) -> ModelHandle:
        """Load (once, however many callers ask at the same time), probe, smoke-test and install ``source``.

        ``deploying``: smoke-test again a model already in memory (it must answer now), and ignore the back-off
        after a failed load. ``on_demand``: a request's load, held to the memory budget: idle models are evicted
        to make room, and if it still does not fit it is refused (``ModelDoesNotFit``) rather than loaded. A
        deployment is the operator's choice and is installed regardless (then the budget only evicts)."""
        with self._lock:
            handle = self._handles.get(source.name)
            if handle is not None and handle.engine.alive and handle.source.folder == source.folder:
                handle.last_used = time.monotonic()
                if not deploying:
                    return handle
            failed_at = self._failed_at.get(source.name)
            if not deploying and failed_at is not None and time.monotonic() - failed_at < RETRY_FAILED_LOAD_SECONDS:
                raise ModelLoadError(self.problems.get(source.name, "the model failed to load"))
            future = self._loading.get(source.name)
            owner = future is None
            if future is None:
                future = Future()
                self._loading[source.name] = future
        if not owner:
            return future.result()
        try:
            same = handle is not None and handle.source.serve_as == source.serve_as  # adapter or merged (vLLM)
            if handle is not None and same and handle.engine.alive and handle.source.folder == source.folder:
                smoke_test(handle.engine, handle.model)
                result = handle
            else:
                if on_demand:
                    self._make_room(source)
                result = self._load(source, hard=on_demand)
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._loading.pop(source.name, None)

    def _load(self, source: ModelSource, *, hard: bool = False) -> ModelHandle:
        settings = self.settings
        engine: Engine | None = None
        try:
            gate: GateResult | None
            if self.vllm is not None:  # gated too: vLLM's answers against the fp32 reference
                model, engine, gate = self.vllm.load(source)
            else:
                model, gate = self._load_gated(source)
                engine = Engine(
                    model,
                    max_batch_size=settings.max_batch_size,
                    prefill_chunk=settings.prefill_chunk_tokens,
                    observer=self.metrics,
                ).start()
            smoke_test(engine, model)
        except BaseException as exc:
            if engine is not None:
                engine.stop()
            self.metrics.loads.labels("failed").inc()
            self.problems[source.name] = str(exc)
            self._failed_at[source.name] = time.monotonic()
            raise
        handle = ModelHandle(source=source, model=model, engine=engine, gate=gate)
        with self._lock:
            self._sizes[source.folder] = model.size_bytes
            # The estimate before the load is a lower bound: the real size decides, before anyone can use it.
            fits = not hard or self._room_for(source.name, model.size_bytes)[1]
            if fits:
                replaced = self._handles.get(source.name)
                self._handles[source.name] = handle
                evicted = self._over_budget(keep=source.name)
        if not fits:
            engine.stop()
            self.metrics.loads.labels("refused").inc()
            raise self._does_not_fit(source.name, model.size_bytes)
        if gate is not None:
            self.metrics.fidelity(source.name, gate)
        self.problems.pop(source.name, None)
        self._failed_at.pop(source.name, None)
        self.metrics.loads.labels("ok").inc()
        if replaced is not None:  # the same model loaded another way: requests on the old one finish there
            self._retire(replaced)
        for old in evicted:
            self._unload(old)
        self._report()
        return handle

    def _load_gated(self, source: ModelSource) -> tuple[LoadedModel, GateResult]:
        """Load ``source`` on the first route (``self.routes``) that can run it and passes the fidelity gate.

        A route that cannot load the model, or whose answers drift from the reference below the threshold, is
        skipped for the next (the last is the faithful one), and the result says which were skipped and why. A
        model whose reference itself is broken is refused whatever the route."""
        threshold = self.settings.fidelity_min_agreement
        rejected: list[dict[str, Any]] = []
        reference: Reference | None = None
        for index, route in enumerate(self.routes):
            last = index == len(self.routes) - 1
            try:
                model = self._load_route(source, route)
            except ModelLoadError as exc:
                if last:
                    raise
                rejected.append({"route": route.name, "reason": str(exc)})
                log.warning("route.unavailable", extra={"model": source.name, "route": route.name, "error": str(exc)})
                continue
            try:
                if reference is None:
                    reference = reference_for(
                        source.folder, source.template, self.settings.gguf_cache_dir, sorted(model.stop_token_ids)
                    )
                gate = run_gate(model, reference, route.name, threshold)
            except ReferenceError as exc:
                _close(model)
                raise ModelLoadError(f"the model's reference answers are unusable: {exc}") from exc
            except BaseException:
                _close(model)
                raise
            if gate.passed:
                gate.rejected = rejected
                return model, gate
            _close(model)
            rejected.append(
                {
                    "route": route.name,
                    "agreement": round(gate.fidelity.agreement, 5),
                    "max_kl": round(gate.fidelity.max_kl, 5),
                    "reason": f"next-token agreement {gate.fidelity.agreement:.4f} < {threshold}",
                }
            )
            log.warning("route.below_fidelity", extra={"model": source.name, **rejected[-1]})
        raise ModelLoadError(
            "no route keeps the model's answers: " + "; ".join(f"{r['route']}: {r['reason']}" for r in rejected)
        )

    def _load_route(self, source: ModelSource, route: Route) -> LoadedModel:
        settings = self.settings
        model = load_model(
            source.name,
            source.folder,
            template=source.template,
            device_setting=settings.inference_device,
            dtype_setting=route.dtype,
            backend_setting=route.backend,
            quant_setting=route.quant,
            llamacpp=self._llamacpp_options() if route.backend == "llamacpp" else None,
            cache_rows=settings.max_batch_size,
        )
        model.route = route.name
        return model

    def _cache_shape(self) -> CacheShape:
        return CacheShape(self.settings.max_batch_size, self.settings.llamacpp_context_tokens)

    def _llamacpp_options(self) -> LlamaCppOptions:
        settings = self.settings
        chunk = settings.prefill_chunk_tokens or 512
        return LlamaCppOptions(
            cache_dir=settings.gguf_cache_dir,
            max_sequences=settings.max_batch_size,
            context_per_sequence=settings.llamacpp_context_tokens,
            threads=self.threads.decode,
            batch_threads=self.threads.prefill,
            batch_tokens=max(512, chunk * settings.max_batch_size),
        )

    # ------------------------------------------------------------------------------- memory

    def retune_threads(self) -> None:
        """Follow training starting or ending on this host (every core for generation only while none runs)."""
        wanted = generation_threads(self.settings.inference_threads, training_on_this_host(self.settings))
        if wanted == self.threads:
            return
        log.info("threads.retuned", extra={"from": self.threads.to_json(), "to": wanted.to_json()})
        self.threads = configure_threads(wanted)
        for handle in self.handles():
            handle.engine.set_threads(self.threads)

    def enforce_budget(self) -> None:
        with self._lock:
            evicted = self._over_budget(keep=None)
        for handle in evicted:
            self._unload(handle)
        self._report()

    def _lru_victims(self, total: int, keep: set[str]) -> tuple[list[ModelHandle], int]:
        """Idle models to evict, least recently used first, until ``total`` bytes fit the budget, and the total
        after evicting them (caller holds the lock; nothing is evicted yet). A model in use, a tenant's default
        and the models in ``keep`` are never victims."""
        budget = self.settings.model_memory_budget_bytes
        protected = self._protected() | keep
        candidates = sorted(
            (h for h in self._handles.values() if h.in_use == 0 and h.name not in protected),
            key=lambda h: h.last_used,
        )
        victims: list[ModelHandle] = []
        while total > budget and candidates:
            victim = candidates.pop(0)
            total -= victim.model.size_bytes
            victims.append(victim)
        return victims, total

    def _room_for(self, name: str, size: int) -> tuple[list[ModelHandle], bool]:
        """The idle models to evict for ``name`` to take ``size`` bytes, and whether it then fits the budget."""
        total = size + sum(h.model.size_bytes for h in self._handles.values() if h.name != name)
        victims, total = self._lru_victims(total, {name})
        return victims, total <= self.settings.model_memory_budget_bytes

    def _does_not_fit(self, name: str, size: int) -> ModelDoesNotFit:
        budget = self.settings.model_memory_budget_bytes
        return ModelDoesNotFit(
            f"model {name!r} needs about {_mib(size)} MiB and the memory budget ({_mib(budget)} MiB) cannot make "
            "room for it while the models in memory are in use or deployed; retry later",
            retry_after=RETRY_NO_ROOM_SECONDS,
        )

    def _make_room(self, source: ModelSource) -> None:
        """Before an on-demand load: evict idle models so that the model's estimated size fits, or refuse it."""
        if self.vllm is not None:  # the placement decides: an adapter costs its own size, not a model's
            estimate = self.vllm.estimate_bytes(source)
        else:
            estimate = self._sizes.get(source.folder) or estimate_bytes(source.folder, self.routes, self._cache_shape())
        if not estimate:
            return  # unknown: the check after the load decides
        with self._lock:
            victims, fits = self._room_for(source.name, estimate)
            if fits:
                for victim in victims:
                    del self._handles[victim.name]
                    self.metrics.evictions.inc()
        if not fits:
            self.metrics.loads.labels("refused").inc()
            raise self._does_not_fit(source.name, estimate)
        for victim in victims:
            self._unload(victim)
        if victims:
            self._report()

    def _over_budget(self, keep: str | None) -> list[ModelHandle]:
        """Pick least recently used models to unload until the budget holds (caller holds the lock)."""
        budget = self.settings.model_memory_budget_bytes
        total = sum(h.model.size_bytes for h in self._handles.values())
        evicted, total = self._lru_victims(total, {keep} if keep else set())
        for victim in evicted:
            del self._handles[victim.name]
            self.metrics.evictions.inc()
        if total > budget:
            log.warning("registry.over_budget", extra={"bytes": total, "budget": budget})
        return evicted

    def _retire(self, handle: ModelHandle) -> None:
        """``handle`` left the registry: stopped now if no request holds it, else when the last one lets go."""
        with self._lock:
            handle.retired = True
            idle = handle.in_use == 0
        if idle:
            self._unload(handle)

    def _unload(self, handle: ModelHandle) -> None:
        log.info("model.unloaded", extra={"model": handle.name})
        handle.engine.stop()
        if handle.name not in self._handles:  # not replaced by another load of the same model
            self.metrics.forget_model(handle.name)

    def maintain(self) -> None:
        """Drop models whose generation thread died (the next request or reconcile loads them again), and probe
        engines whose last step failed: an idle engine has no next step to clear its error. Fine-tuned models
        deleted from the database are dropped too, so they answer 404 from the next poll on."""
        self.drop_deleted()
        with self._lock:
            dead = [h for h in self._handles.values() if not h.engine.alive]
            for handle in dead:
                del self._handles[handle.name]
                self.problems[handle.name] = handle.engine.death or "engine stopped"
            failing = [h for h in self._handles.values() if h.engine.error is not None]
        for handle in dead:
            log.error("model.engine_dead", extra={"model": handle.name, "error": handle.engine.death})
            self._unload(handle)
        if dead:
            self._report()
        for handle in failing:
            try:
                smoke_test(handle.engine, handle.model)  # a good step clears the error
            except (ModelLoadError, EngineUnavailable) as exc:
                log.error("model.engine_failing", extra={"model": handle.name, "error": str(exc)})

    def drop_deleted(self) -> None:
        """Forget loaded fine-tuned models whose row is gone (or is no longer ready): new requests then resolve
        them from the database and get 404. A model still held by a running request stops when released."""
        # A checkpoint (``<model id>:ckpt-step-N``, served on vLLM) lives as long as the model its job published.
        tuned = {
            h.name: (parse_checkpoint_model_id(h.name) or (h.name, 0))[0]
            for h in self._handles.values()
            if h.source.owner is not None
        }
        if not tuned:
            return  # base models only: no query
        with session_scope() as session:
            ready = set(
                session.scalars(
                    select(ModelRecord.id).where(
                        ModelRecord.id.in_(set(tuned.values())), ModelRecord.status == ModelStatus.READY
                    )
                )
            )
        gone = {name for name, record in tuned.items() if record not in ready}
        if not gone:
            return
        idle: list[ModelHandle] = []
        with self._lock:
            for name in gone:
                handle = self._handles.pop(name, None)
                if handle is None:
                    continue
                self.problems.pop(name, None)
                self._failed_at.pop(name, None)
                handle.retired = True
                if handle.in_use == 0:
                    idle.append(handle)
        for handle in idle:
            log.info("model.deleted_unloaded", extra={"model": handle.name})
            self._unload(handle)
        self._report()

    def _report(self) -> None:
        handles = list(self._handles.values())
        self.metrics.loaded_models.set(len(handles))
        self.metrics.loaded_bytes.set(sum(h.model.size_bytes for h in handles))

    # ------------------------------------------------------------------------------- readiness

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        name = self.default_for(DEFAULT_TENANT)
        handle = self._handles.get(name)
        detail: dict[str, Any] = {"model": name, "synced": self.synced, "threads": self.threads.to_json()}
        if handle is None:
            detail["reason"] = self.problems.get(name) or ("loading" if name in self._loading else "not loaded")
            ready = False
        elif not handle.engine.alive:
            detail["reason"] = handle.engine.death or "engine stopped"
            ready = False
        elif handle.engine.error is not None:
            detail["reason"] = f"engine error: {handle.engine.error}"
            ready = False
        elif not handle.engine.healthy:  # a vLLM server restarting: requests wait for it, balancers go elsewhere
            detail["reason"] = "engine restarting"
            ready = False
        else:
            ready = self.synced
            if not ready:
                detail["reason"] = "deployments not read yet"
        detail["models"] = [
            {
                "id": h.name,
                "route": h.model.route,
                "fidelity": h.gate.to_json() if h.gate else None,
                "backend": h.model.backend,
                "dtype": h.model.dtype,
                "quant": h.model.quant,
                "bytes": h.model.size_bytes,
                "cache_bytes": h.model.cache_bytes,
                "healthy": h.engine.healthy,
                "in_use": h.in_use,
                "queue_depth": h.engine.queue_depth,
                "running": h.engine.running,
            }
            for h in list(self._handles.values())
        ]
        if self.vllm is not None:
            detail["vllm"] = self.vllm.readiness()
        failed = list(self.failed_deployments)
        if failed:
            # Still ready (every tenant is answered, the failed ones by their previous model), but degraded.
            detail["degraded"] = True
            detail["failed_deployments"] = failed
        self.metrics.ready.set(1 if ready else 0)
        return ready, detail

    def close(self) -> None:
        with self._lock:
            handles = list(self._handles.values())
            self._handles.clear()
        for handle in handles:
            handle.engine.stop()
        if self.vllm is not None:
            self.vllm.close()
