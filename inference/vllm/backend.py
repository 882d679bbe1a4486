"""``INFERENCE_BACKEND=vllm`` as a backend of the loader: Conch reads the folder's tokenizer, template and stops
(it renders and tokenizes every request itself), and the weights are left to the vLLM server, which reads the
files in its own process. The decoder here only stands for the model in the registry's memory accounting."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # the loader's backends module lists this backend: imported at run time inside the calls
    from inference.engine.backends import BuiltDecoder, DecoderInputs, LlamaCppOptions


class NoLocalForward(RuntimeError):
    """A vLLM model was asked for a forward pass in this process."""


class VllmDecoder:
    """No forward pass in this process: generation goes through ``inference.vllm.engine.VllmEngine``."""

    quant = "none"

    def __init__(self, folder: Path, vocab_size: int, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.device = torch.device("cpu")
        self.vocab_size = vocab_size
        # What the memory budget counts, set by the pool once it knows where the model runs
        # (``inference.vllm.pool.account``): the weights vLLM reads and the KV cache its server allocates for a
        # model that owns a server (a base model, a merged fine-tune); an adapter's own size for an adapter.
        self.parameter_bytes_value = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
        self.kv_cache_bytes_value = 0

    @property
    def parameter_bytes(self) -> int:
        return self.parameter_bytes_value

    def cache_bytes(self, rows: int, tokens_per_row: int) -> int:
        return self.kv_cache_bytes_value

    def new_cache(self, batch: int, capacity: int) -> Any:
        raise NoLocalForward("a vLLM model has no cache in this process")

    def forward(self, input_ids: torch.Tensor, new_mask: torch.Tensor, cache: Any) -> torch.Tensor:
        raise NoLocalForward("a vLLM model runs in the vLLM server, not in this process")


@dataclass(frozen=True)
class VllmBackend:
    @property
    def loads_torch_model(self) -> bool:
        return False

    def check(self, quant: str, device: torch.device, llamacpp: LlamaCppOptions | None) -> str:
        if quant not in ("", "none"):
            raise ValueError("INFERENCE_BACKEND=vllm serves the folder's weights; INFERENCE_QUANT must be none")
        return "none"

    def build(self, inputs: DecoderInputs) -> BuiltDecoder:
        from inference.engine.backends import BuiltDecoder

        decoder = VllmDecoder(inputs.folder, int(inputs.config.vocab_size), inputs.dtype)
        return BuiltDecoder(decoder, "vllm", inputs.max_positions)
