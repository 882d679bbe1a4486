"""Where and in which precision a model runs.

On CUDA, bf16 (fp16 where bf16 is missing). On a CPU, fp32 unless ``INFERENCE_DTYPE`` asks otherwise: bf16 decodes
faster on CPUs with AVX-512 BF16, but rounding the weights changes some greedy answers (the benchmark reports how
often), and a route that changes answers has to be chosen, not inherited.
"""

from __future__ import annotations

import os

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


def auto_threads(training_here: bool = True) -> int:
    """Generation threads when ``INFERENCE_THREADS`` is 0: every core while no training runs on this host, half
    of them while one does (see ``generation_threads``)."""
    cores = os.cpu_count() or 2
    return max(1, cores // 2) if training_here else cores


def generation_threads(setting: int, training_here: bool) -> int:
    """Decoding reads every weight once per step, so it is bound by memory bandwidth, which one thread does not
    use up: on 2 cores, llama.cpp decoded the default model about 1.5x faster on 2 threads than on 1 (README,
    benchmarks). But an operation split across all cores waits for the slowest one, so when another process
    computes on them a busy core stalls every product: measured on 2 cores while another process trained, a
    batch-of-8 decode step took 3.6 s on 2 threads and 0.09 s on 1. Hence every core while no training runs on
    this host, half while one does; ``INFERENCE_THREADS`` > 0 fixes the count."""
    return setting if setting > 0 else auto_threads(training_here)


def configure_threads(threads: int) -> int:
    """Intra-op CPU threads of torch's products (the lean and reference decoders); process-wide."""
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()
