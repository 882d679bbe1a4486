"""Where and in which precision a model runs.

On CUDA, bf16 (fp16 where bf16 is missing). On a CPU, fp32 unless ``INFERENCE_DTYPE`` asks otherwise: bf16 decodes
faster on CPUs with AVX-512 BF16, but rounding the weights changes some greedy answers (the benchmark reports how
often), and a route that changes answers has to be chosen, not inherited.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def choose_device(setting: str) -> torch.device:
    if setting in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def choose_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting not in ("", "auto"):
        try:
            return _NAMES[setting.lower()]
        except KeyError:
            raise ValueError(f"INFERENCE_DTYPE must be auto, fp32, bf16 or fp16, not {setting!r}") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


@dataclass(frozen=True)
class Threads:
    """CPU threads of generation: ``decode`` for steps of one token per row, ``prefill`` for reading prompts
    (llama.cpp takes both; torch's products use ``decode``)."""

    decode: int
    prefill: int

    def to_json(self) -> dict[str, int]:
        return {"decode": self.decode, "prefill": self.prefill}


def auto_threads(training_here: bool = True) -> Threads:
    """Generation threads when ``INFERENCE_THREADS`` is 0 (see ``generation_threads``)."""
    cores = os.cpu_count() or 2
    if training_here:
        half = max(1, cores // 2)
        return Threads(decode=half, prefill=half)
    return Threads(decode=max(1, cores - 1), prefill=cores)


def generation_threads(setting: int, training_here: bool) -> Threads:
    """Measured on 2 cores, default model, llama.cpp f16, through the service: reading a prompt is compute-bound
    and batched, and took 0.125 s on 2 threads against 0.17 s on 1; but one stream decoded 59 tokens/s on 1
    thread against 45 on 2, because the service's own Python (its event loop, the engine's sampling and
    detokenising between steps) then competes with every thread of the product for the cores. So while no
    training runs on this host: prompts on every core, decoding on every core but one. While one does, half of
    each: an operation split across all cores waits for the slowest one, and with another process computing on
    them a batch-of-8 decode step took 3.6 s on 2 threads and 0.09 s on 1. ``INFERENCE_THREADS`` > 0 fixes
    both counts."""
    if setting > 0:
        return Threads(decode=setting, prefill=setting)
    return auto_threads(training_here)


def configure_threads(threads: Threads) -> Threads:
    """Intra-op CPU threads of torch's products (the lean and reference decoders); process-wide."""
    torch.set_num_threads(max(1, threads.decode))
    return threads
