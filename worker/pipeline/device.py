"""Where training runs and in which precision.

CUDA when present, else CPU. ``compute_type: auto`` picks bf16 where the hardware computes it natively (a CUDA
device with bf16, or a CPU with AVX512-BF16 or AMX) and fp32 elsewhere; fp16 needs CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch

from worker.pipeline.errors import PipelineError

Precision = Literal["fp32", "fp16", "bf16"]
_CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@lru_cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    return bool(_CPU_BF16_FLAGS & cpu_flags())


@dataclass(frozen=True)
class Compute:
    device: torch.device
    precision: Precision

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    @property
    def frozen_dtype(self) -> torch.dtype:
        """dtype of the frozen base weights during training; LoRA weights always stay fp32.

        In bf16 the frozen weights are stored in bf16 too: autocast would otherwise cast every weight matrix
        again on every forward pass, and the base never changes during LoRA training. fp16 keeps fp32 masters
        because fp16 activations overflow where bf16 ones do not.
        """
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def describe(self) -> str:
        return f"{self.device.type} {self.precision}"


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_compute(requested: str, device: torch.device | None = None) -> Compute:
    device = device or pick_device()
    cuda = device.type == "cuda"
    cuda_bf16 = cuda and torch.cuda.is_bf16_supported()
    if requested == "auto":
        if cuda:
            return Compute(device, "bf16" if cuda_bf16 else "fp16")
        return Compute(device, "bf16" if cpu_has_native_bf16() else "fp32")
    if requested == "fp16" and not cuda:
        raise PipelineError(
            "unsupported_compute_type",
            "compute_type fp16 needs a CUDA device and this worker has only a CPU; use bf16, fp32 or auto.",
            "compute_type",
        )
    if requested == "bf16" and cuda and not cuda_bf16:
        raise PipelineError(
            "unsupported_compute_type",
            "compute_type bf16 is not supported by this GPU; use fp16, fp32 or auto.",
            "compute_type",
        )
    if requested not in ("fp32", "fp16", "bf16"):
        raise PipelineError("invalid_compute_type", f"unknown compute_type {requested!r}", "compute_type")
    return Compute(device, requested)  # type: ignore[arg-type]
