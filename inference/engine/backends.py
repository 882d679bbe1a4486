"""Backends: what runs a loaded model's forward pass, behind one ``Decoder`` protocol, chosen by name.

``load_model`` reads the folder (tokenizer, config, stops) and hands the rest to the backend named by
``INFERENCE_BACKEND`` (or by the route the registry tries): the lean decoder, transformers' own forward, or
llama.cpp. A new backend is one module with a class that has ``loads_torch_model``, ``check`` and ``build`` (see
``Backend``), one line in ``BACKENDS`` and its name in ``core.settings.InferenceBackend`` (a test holds the two
to the same names).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from artifacts.gguf import ExportError, exported_gguf
from artifacts.llamacpp import LlamaCppUnavailable, quantize
from artifacts.serving import read_serving_files
from inference.engine.cache import RowCache, kv_values_per_token
from inference.engine.lean import LeanDecoder, unsupported_reason
from inference.engine.llamacpp import LlamaCppDecoder, file_type_for
from inference.engine.llamacpp import check_quant as check_llamacpp_quant
from inference.engine.quant import check_scheme
from inference.engine.reference import ReferenceDecoder
from inference.vllm.backend import VllmBackend

CacheT = TypeVar("CacheT", bound=RowCache)


class Decoder(Protocol[CacheT]):
    """One forward step over a batch of rows, on a cache the decoder makes and the engine owns."""

    dtype: torch.dtype
    device: torch.device
    vocab_size: int

    @property
    def parameter_bytes(self) -> int: ...

    def cache_bytes(self, rows: int, tokens_per_row: int) -> int:
        """The most memory its KV cache takes serving ``rows`` sequences of up to ``tokens_per_row`` tokens (a
        backend that allocates its cache once at load answers that allocation, whatever is asked)."""
        ...

    def new_cache(self, batch: int, capacity: int) -> CacheT: ...

    def forward(self, input_ids: torch.Tensor, new_mask: torch.Tensor, cache: CacheT) -> torch.Tensor: ...


class ModelLoadError(Exception):
    """The folder is not a model this service will serve (missing files, pickle weights, bad config, ...)."""


@dataclass(frozen=True)
class LlamaCppOptions:
    """How the llama.cpp backend sizes its context (from the service's settings)."""

    cache_dir: Path  # exported GGUF files
    max_sequences: int  # the engine's batch size
    context_per_sequence: int
    threads: int  # decoding
    batch_tokens: int  # tokens one llama_decode call takes (a prefill chunk for every row)
    batch_threads: int = 0  # reading prompts (and decode steps of several rows); 0 = ``threads``


@dataclass(frozen=True)
class DecoderInputs:
    """What ``load_model`` has read from the folder by the time the backend builds its decoder."""

    folder: Path
    config: Any  # the transformers config
    torch_model: Any  # the transformers model on its device, or None for a backend that reads the files itself
    quant: str  # as the backend's ``check`` returned it
    dtype: torch.dtype
    device: torch.device
    max_positions: int
    llamacpp: LlamaCppOptions | None


@dataclass(frozen=True)
class BuiltDecoder:
    decoder: Decoder[Any]
    backend: str  # the one that runs (``auto`` resolves to ``lean`` or ``reference``)
    max_positions: int  # the context the decoder serves (a backend may allow less than the config)
    notes: dict[str, str] = field(default_factory=dict)  # logged with ``model.loaded``


class Backend(Protocol):
    @property
    def loads_torch_model(self) -> bool:
        """Whether ``load_model`` builds the transformers model for it (llama.cpp reads the files itself)."""
        ...

    def check(self, quant: str, device: torch.device, llamacpp: LlamaCppOptions | None) -> str:
        """Refuse settings this backend cannot honour (ValueError) before anything is loaded; the quant it runs."""
        ...

    def build(self, inputs: DecoderInputs) -> BuiltDecoder:
        """The decoder, or ModelLoadError when this backend cannot run the model."""
        ...


@dataclass(frozen=True)
class TorchBackend:
    """The transformers model in this process: the lean decoder where it reproduces the architecture
    (``lean``: only there), transformers' forward otherwise (``reference``: always)."""

    choice: str  # auto | lean | reference

    @property
    def loads_torch_model(self) -> bool:
        return True

    def check(self, quant: str, device: torch.device, llamacpp: LlamaCppOptions | None) -> str:
        quant = check_scheme(quant, device)
        if quant != "none" and self.choice == "reference":
            raise ValueError(f"INFERENCE_QUANT={quant} needs the lean decoder, not INFERENCE_BACKEND=reference")
        return quant

    def build(self, inputs: DecoderInputs) -> BuiltDecoder:
        reason = unsupported_reason(inputs.config)
        if self.choice == "lean" and reason:
            raise ModelLoadError(f"INFERENCE_BACKEND=lean cannot run this model: {reason}")
        if inputs.quant != "none" and reason:
            raise ModelLoadError(
                f"INFERENCE_QUANT={inputs.quant} needs the lean decoder, which cannot run this model: {reason}"
            )
        notes = {"lean_unsupported": reason} if reason else {}
        if self.choice != "reference" and reason is None:
            lean = LeanDecoder(inputs.torch_model, inputs.max_positions, quant=inputs.quant)
            return BuiltDecoder(lean, "lean", inputs.max_positions, notes)
        return BuiltDecoder(ReferenceDecoder(inputs.torch_model), "reference", inputs.max_positions, notes)


@dataclass(frozen=True)
class LlamaCppBackend:
    """llama.cpp's kernels on a GGUF export of the folder (the one published with it, else one made and cached)."""

    @property
    def loads_torch_model(self) -> bool:
        return False

    def check(self, quant: str, device: torch.device, llamacpp: LlamaCppOptions | None) -> str:
        # llama.cpp runs its own kernels: the torch-specific checks of check_scheme do not apply.
        quant = check_llamacpp_quant(quant)
        if llamacpp is None:
            raise ValueError("INFERENCE_BACKEND=llamacpp needs its options (cache folder, context size)")
        return quant

    def build(self, inputs: DecoderInputs) -> BuiltDecoder:
        assert inputs.llamacpp is not None  # check() refused a load without them
        decoder = _llamacpp_decoder(inputs, inputs.llamacpp)
        return BuiltDecoder(decoder, "llamacpp", min(inputs.max_positions, decoder.context_per_sequence))


BACKENDS: dict[str, Backend] = {
    "auto": TorchBackend("auto"),
    "lean": TorchBackend("lean"),
    "reference": TorchBackend("reference"),
    "llamacpp": LlamaCppBackend(),
    "vllm": VllmBackend(),  # the loader reads the tokenizer; the vLLM server runs the model
}


def backend_named(name: str) -> Backend:
    backend = BACKENDS.get(name)
    if backend is None:
        raise ValueError(f"INFERENCE_BACKEND must be one of {', '.join(BACKENDS)}, not {name!r}")
    return backend


def _llamacpp_decoder(inputs: DecoderInputs, options: LlamaCppOptions) -> LlamaCppDecoder:
    """Export (or reuse the cached export of) the folder as GGUF in the served type and load it into llama.cpp."""
    folder = inputs.folder
    file_type = file_type_for(inputs.quant, inputs.dtype)
    try:
        # The export the worker wrote at publish (or preparation), else one made now and cached.
        published = read_serving_files(folder)
        path = published.gguf.get(file_type) if published is not None else None
        if path is None:
            path = exported_gguf(
                folder,
                inputs.config,
                options.cache_dir,
                file_type,
                # Every core for the quantiser (0: llama.cpp's own count): a one-off burst that decides how soon
                # a newly published model answers, while the model it replaces keeps serving.
                quantize=lambda src, dst, kind: quantize(src, dst, kind, threads=0),
            )
        return LlamaCppDecoder(
            path,
            max_sequences=options.max_sequences,
            context_per_sequence=options.context_per_sequence,
            threads=options.threads,
            batch_threads=options.batch_threads,
            batch_tokens=options.batch_tokens,
            file_type=file_type,
            kv_values_per_token=kv_values_per_token(inputs.config),
            gpu=inputs.device.type == "cuda",
        )
    except (LlamaCppUnavailable, ExportError) as exc:
        raise ModelLoadError(str(exc)) from exc
    except (RuntimeError, OSError) as exc:
        raise ModelLoadError(f"llama.cpp backend: {exc}") from exc
