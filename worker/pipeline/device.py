"""Where training runs and in which precision.

CUDA when present, else CPU. ``compute_type: auto`` picks bf16 where the hardware computes it natively (a GPU of
compute capability 8.0 or newer, or a CPU with AVX512-BF16 or AMX); older GPUs get fp16 (the training loop scales
the loss), CPUs without bf16 fp32. fp16 needs CUDA, and so does 4-bit quantization (bitsandbytes).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch

from core.contracts import Hyperparameters
from core.device_classes import DeviceCapabilities, UnsupportedPrecision, choose_precision
from core.memory_estimate import MemoryEstimate, ModelShape, estimate_memory, gib
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


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return int(major), int(minor)


def resolve_compute(requested: str, device: torch.device | None = None) -> Compute:
    """The run's device and precision; the choice itself is ``core.device_classes.choose_precision``, which the
    api also applies to a device class's reported capabilities."""
    device = device or pick_device()
    try:
        precision = choose_precision(
            requested,
            device=device.type,
            compute_capability=cuda_capability(device),
            cpu_native_bf16=cpu_has_native_bf16(),
        )
    except UnsupportedPrecision as exc:
        raise PipelineError(exc.code, exc.message, "compute_type") from exc
    return Compute(device, precision)


def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def check_quantization(quantization: str, compute: Compute) -> None:
    """4-bit QLoRA runs on bitsandbytes' CUDA kernels: refuse it up front anywhere else."""
    if quantization != "4bit":
        return
    if compute.device.type != "cuda":
        raise PipelineError(
            "unsupported_quantization",
            "quantization 4bit (QLoRA) needs a CUDA GPU with bitsandbytes and this worker has only a CPU; train "
            "without quantization, or send the job to a GPU device class.",
            "quantization",
        )
    if not bitsandbytes_installed():
        raise PipelineError(
            "unsupported_quantization",
            "quantization 4bit (QLoRA) needs the bitsandbytes package, which this worker lacks.",
            "quantization",
        )


def total_memory_bytes(device: torch.device) -> int | None:
    """The device's memory: the GPU's, or the host's physical memory for a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def device_capabilities() -> DeviceCapabilities:
    """What this host offers for training, as a worker reports it for its device class."""
    device = pick_device()
    capability = cuda_capability(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return DeviceCapabilities(
        device="cuda" if device.type == "cuda" else "cpu",
        device_name=name,
        compute_capability=capability,
        cpu_native_bf16=cpu_has_native_bf16(),
        total_memory_bytes=total_memory_bytes(device),
        bitsandbytes=bitsandbytes_installed(),
    )


def preflight_memory(base_path: Path, hp: Hyperparameters, compute: Compute) -> MemoryEstimate | None:
    """The run's memory estimate (None for an architecture the estimate does not know); raises PipelineError
    when it exceeds the device's memory, so the job fails with the figures before the model is loaded."""
    try:
        config = json.loads((base_path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    shape = ModelShape.from_config(config) if isinstance(config, dict) else None
    if shape is None:
        return None
    estimate = estimate_memory(
        shape,
        lora_rank=hp.lora_rank,
        lora_target=hp.lora_target,
        batch_size=hp.per_device_train_batch_size,
        cutoff_len=hp.cutoff_len,
        precision=compute.precision,
        quantization=hp.quantization,
        gradient_checkpointing=hp.gradient_checkpointing,
    )
    available = total_memory_bytes(compute.device)
    if available is not None and estimate.total > available:
        raise PipelineError(
            "insufficient_device_memory",
            f"The run needs at least {estimate.describe()} but this {compute.device.type} has {gib(available)}; "
            "lower per_device_train_batch_size or cutoff_len, or turn on gradient_checkpointing or quantization.",
            "per_device_train_batch_size",
        )
    return estimate
