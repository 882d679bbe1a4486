"""The vLLM servers of one inference replica: one per base model, and what each model of the registry runs on.

A base model runs on its own server. A fine-tune whose PEFT adapter (``<folder>/adapter``, published with every
merged model) was trained on a configured base model is served as that adapter on the base's server: a load costs
the adapter's size, not a model's. A fine-tune deployed ``serve_as: merged``, and any fine-tune whose adapter does
not fit a configured base (one trained on top of another fine-tune, whose adapter applies to that fine-tune's
weights), runs its merged folder on a server of its own: started for that load (the engine it serves is gated
before anyone is switched to it) and stopped with that engine, which the registry unloads only once no request
holds it, so a switch between the two ways is blue/green.

The memory budget counts what each model adds: a server's owner (a base model, a merged fine-tune) its weights and
the KV cache its server allocates (``VLLM_CPU_KVCACHE_GIB`` on a CPU); an adapter its own size.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from artifacts.golden import ReferenceError
from core.base_models import base_model_path, is_prepared
from core.deployments import MERGED
from core.settings import Settings
from inference.catalog import ModelSource
from inference.engine.engine import EngineObserver
from inference.engine.loader import LoadedModel, ModelLoadError, load_model
from inference.gate import GateResult, reference_for
from inference.vllm.engine import VllmEngine
from inference.vllm.fidelity import vllm_gate
from inference.vllm.server import VllmOptions, VllmServer, VllmUnavailable

log = logging.getLogger("conch.inference.vllm")

ADAPTER_SUBDIR = "adapter"  # where the worker publishes a fine-tune's PEFT adapter inside its merged folder
ADAPTER_CONFIG = "adapter_config.json"
FAITHFUL_DTYPE = "float32"  # the gate's reference type: the fall-back when VLLM_DTYPE drifts from it


def options_from(settings: Settings, threads: int) -> VllmOptions:
    return VllmOptions(
        python=settings.vllm_python,
        max_lora_rank=settings.vllm_max_lora_rank,
        max_loras=settings.vllm_max_loras,
        max_model_len=settings.vllm_max_model_len,
        dtype=settings.vllm_dtype,
        cpu_kvcache_gib=settings.vllm_cpu_kvcache_gib,
        threads=threads,
        start_timeout=settings.vllm_start_timeout_seconds,
        extra_args=tuple(settings.vllm_extra_args.split()),
        log_dir=settings.data_dir / "logs",
    )


@dataclass(frozen=True)
class Placement:
    """Where a model runs: the server's model id and folder, and the adapter to load on it (None: the server's
    own weights)."""

    server_name: str
    server_folder: Path
    adapter: Path | None


def adapter_base(adapter: Path) -> Path | None:
    """The folder the adapter was trained on, as PEFT recorded it."""
    try:
        named = json.loads((adapter / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(named).expanduser().resolve() if named else None


def _same_folder(named: Path | None, base: Path) -> bool:
    """Whether the adapter was trained on ``base``: the same path, or (the worker's volume mounted elsewhere, so its
    path does not exist here) the same folder name."""
    if named is None:
        return False
    return named == base or (not named.exists() and named.name == base.name)


def placement_for(source: ModelSource, settings: Settings) -> Placement:
    if source.owner is None:
        return Placement(source.name, source.folder, None)
    if source.serve_as == MERGED and source.adapter is None:  # as deployed: its merged weights, a server of its own
        return Placement(source.name, source.folder, None)
    # A checkpoint names its adapter; a published fine-tune carries its own next to the merged weights.
    adapter = source.adapter or source.folder / ADAPTER_SUBDIR
    base = source.base_model
    if (adapter / ADAPTER_CONFIG).is_file() and base in settings.base_models and is_prepared(base, settings):
        base_folder = base_model_path(base, settings)
        if _same_folder(adapter_base(adapter), base_folder.resolve()):
            return Placement(base, base_folder, adapter)
        log.info("vllm.merged_placement", extra={"model": source.name, "reason": "adapter trained on another model"})
    if source.adapter is not None:  # the published folder holds the final weights, not this checkpoint's
        raise ModelLoadError(
            f"{source.name} cannot be served: its adapter was not trained on a configured base model (the job "
            "continued another fine-tune)"
        )
    return Placement(source.name, source.folder, None)


def _adapter_bytes(adapter: Path) -> int:
    return sum(path.stat().st_size for path in adapter.glob("*.safetensors"))


def server_kv_cache_bytes(options: VllmOptions) -> int:
    """The KV cache a vLLM server allocates at start (on a CPU: ``VLLM_CPU_KVCACHE_SPACE``, VLLM_CPU_KVCACHE_GIB)."""
    return options.cpu_kvcache_gib * 1024**3


def estimate_bytes(source: ModelSource, settings: Settings, options: VllmOptions) -> int:
    """What ``account`` will count for ``source`` once loaded, told before the load (the registry makes room with
    it): an adapter's own size where it runs on its base's server, else the weights and the server's KV cache.
    0 when it cannot be told (its load fails with the reason)."""
    try:
        place = placement_for(source, settings)
    except ModelLoadError:
        return 0
    if place.adapter is not None:
        return _adapter_bytes(place.adapter)
    weights = sum(path.stat().st_size for path in place.server_folder.glob("*.safetensors"))
    return weights + server_kv_cache_bytes(options) if weights else 0


def account(model: LoadedModel, place: Placement, options: VllmOptions) -> None:
    """What the memory budget counts for ``model`` served at ``place``: the owner of a server its weights and the
    server's KV cache; an adapter its own size (the base's server, weights and cache, is counted by the base)."""
    decoder = model.decoder
    if place.adapter is None:
        decoder.kv_cache_bytes_value = server_kv_cache_bytes(options)  # type: ignore[attr-defined]
    else:
        decoder.parameter_bytes_value = _adapter_bytes(place.adapter)  # type: ignore[attr-defined]
        decoder.kv_cache_bytes_value = 0  # type: ignore[attr-defined]


class VllmPool:
    def __init__(self, settings: Settings, threads: int, observer: EngineObserver | None = None) -> None:
        self.settings = settings
        self.options = options_from(settings, threads)
        self.observer = observer
        self._servers: dict[str, VllmServer] = {}
        self._lock = threading.Lock()
        self._starting: dict[str, threading.Lock] = {}
        self._names = itertools.count(1)

    def servers(self) -> list[VllmServer]:
        return list(self._servers.values())

    def server(self, name: str, folder: Path, *, faithful: bool = False) -> VllmServer:
        """The running server of ``name`` (started once, whoever asks first; the others wait for it).
        ``faithful``: in fp32 (replacing one in another type), the fall-back when the gate refuses VLLM_DTYPE."""
        with self._lock:
            starting = self._starting.setdefault(name, threading.Lock())
        with starting:
            server = self._servers.get(name)
            fits = server is not None and (not faithful or server.options.dtype == FAITHFUL_DTYPE)
            if server is not None and fits and not server.stopped and server.folder == folder:
                return server
            if server is not None:
                server.stop()
            options = replace(self.options, dtype=FAITHFUL_DTYPE) if faithful else self.options
            try:
                server = VllmServer(name, folder, options).start()
            except VllmUnavailable as exc:
                raise ModelLoadError(f"vLLM could not serve {name!r}: {exc}") from exc
            with self._lock:
                self._servers[name] = server
            return server

    def load(self, source: ModelSource) -> tuple[LoadedModel, VllmEngine, GateResult | None]:
        """The model's tokenizer and stops, an engine that runs it on vLLM, and the fidelity gate it passed (none
        for a checkpoint: no merged weights of it exist to take a reference from)."""
        model, engine = self._load(source)
        if source.adapter is not None:
            return model, engine, None
        can_fall_back = model.route != "vllm:lora" and engine.server.options.dtype != FAITHFUL_DTYPE
        rejected: dict[str, object] | None = None
        try:
            gate = self._gated(source, model, engine)
            if not gate.passed and can_fall_back:
                rejected = {
                    "route": model.route,
                    "agreement": round(gate.fidelity.agreement, 5),
                    "reason": f"next-token agreement {gate.fidelity.agreement:.4f} < {gate.threshold}",
                }
        except ModelLoadError as exc:  # e.g. the server's kernels in this type crash on this model
            if not can_fall_back:
                raise
            rejected = {"route": model.route, "reason": str(exc)}
        if rejected is not None:
            # As the registry's routes fall back to the faithful one: this model's own server again, in fp32.
            log.warning("route.below_fidelity", extra={"model": source.name, **rejected})
            engine.stop()
            model, engine = self._load(source, faithful=True)
            gate = self._gated(source, model, engine)
            gate.rejected = [rejected]
        if not gate.passed:
            engine.stop()
            raise ModelLoadError(
                f"vLLM's answers drift from the model's fp32 reference: next-token agreement "
                f"{gate.fidelity.agreement:.4f} < {gate.threshold} (FIDELITY_MIN_AGREEMENT)"
            )
        return model, engine, gate

    def _gated(self, source: ModelSource, model: LoadedModel, engine: VllmEngine) -> GateResult:
        try:
            return self._gate(source, model, engine)
        except BaseException:
            engine.stop()
            raise

    def _gate(self, source: ModelSource, model: LoadedModel, engine: VllmEngine) -> GateResult:
        try:
            reference = reference_for(
                source.folder, source.template, self.settings.gguf_cache_dir, sorted(model.stop_token_ids)
            )
            return vllm_gate(
                engine.server.url,
                engine.served_name,
                reference,
                int(model.decoder.vocab_size),
                model.route,
                self.settings.fidelity_min_agreement,
            )
        except ReferenceError as exc:
            raise ModelLoadError(f"the model's reference answers are unusable: {exc}") from exc
        except httpx.HTTPError as exc:
            raise ModelLoadError(f"vLLM could not score the golden prompts: {exc}") from exc

    def _load(self, source: ModelSource, *, faithful: bool = False) -> tuple[LoadedModel, VllmEngine]:
        """The model's tokenizer and stops (Conch renders and tokenizes) and an engine that runs it on vLLM."""
        settings = self.settings
        model = load_model(
            source.name,
            source.folder,
            template=source.template,
            device_setting="cpu",
            backend_setting="vllm",
            cache_rows=settings.max_batch_size,
        )
        model.max_positions = min(model.max_positions, self.options.max_model_len)
        place = placement_for(source, settings)
        account(model, place, self.options)
        if source.owner is not None and place.adapter is None:
            return self._merged(model, place, faithful=faithful)
        server = self.server(place.server_name, place.server_folder, faithful=faithful)
        model.route = f"vllm:{server.options.dtype}"
        if place.adapter is None:
            return model, self._engine(model, server, place.server_name, None)
        served = f"{source.name}@{next(self._names)}"  # one name per load: unloading an old one spares the new
        try:
            server.load_adapter(served, place.adapter)
        except VllmUnavailable as exc:
            raise ModelLoadError(f"vLLM could not load the adapter of {source.name!r}: {exc}") from exc
        model.route = "vllm:lora"
        return model, self._engine(model, server, served, lambda: server.unload_adapter(served))

    def _merged(self, model: LoadedModel, place: Placement, *, faithful: bool) -> tuple[LoadedModel, VllmEngine]:
        """A fine-tune's merged folder on a server of its own, started for this load and stopped with its engine:
        the engine it replaces keeps its own server (and its requests) until the registry unloads it."""
        key = f"{place.server_name}@{next(self._names)}"
        options = replace(self.options, dtype=FAITHFUL_DTYPE) if faithful else self.options
        try:
            server = VllmServer(place.server_name, place.server_folder, options).start()
        except VllmUnavailable as exc:
            raise ModelLoadError(f"vLLM could not serve {place.server_name!r}: {exc}") from exc
        with self._lock:
            self._servers[key] = server

        def stop_server() -> None:
            with self._lock:
                self._servers.pop(key, None)
            server.stop()

        model.route = f"vllm:{options.dtype}"
        try:
            return model, self._engine(model, server, place.server_name, stop_server)
        except BaseException:
            stop_server()
            raise

    def _engine(self, model: LoadedModel, server: VllmServer, served: str, on_stop: object) -> VllmEngine:
        return VllmEngine(
            model,
            server,
            served,
            observer=self.observer,
            wait_seconds=self.options.start_timeout,
            on_stop=on_stop,
        ).start()

    def estimate_bytes(self, source: ModelSource) -> int:
        return estimate_bytes(source, self.settings, self.options)

    def readiness(self) -> list[dict[str, object]]:
        return [
            {
                "model": s.name,
                "url": s.url,
                "pid": s.pid,
                "healthy": s.healthy,
                "restarts": s.restarts,
                "adapters": len(s.adapters),
                "problem": s.problem,
            }
            for s in self.servers()
        ]

    def close(self) -> None:
        with self._lock:
            servers = list(self._servers.values())
            self._servers.clear()
        for server in servers:
            server.stop()
