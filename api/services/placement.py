"""Where a new job will train, and whether it can: checked at creation against what the workers of its device
class reported (core.device_classes), so a job its device cannot run is a 422 now, not a failed job later.

A job routed to a class is checked against that class; one without a class goes to the shared queue, which any
worker takes from, so it must suit every class that has reported. A class no worker has reported yet constrains
nothing: the job is accepted and waits for one (an event on the job says so).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from api.services.hyperparameters import Resolved
from core.base_models import base_model_config
from core.device_classes import DeviceCapabilities, UnsupportedPrecision, choose_precision, class_queue, reported
from core.errors import ValidationFailed
from core.memory_estimate import SMOLLM2_135M, MemoryEstimate, ModelShape, estimate_memory, gib
from core.settings import BUILTIN_SMOLLM2, Settings


@dataclass(frozen=True)
class Placement:
    device_class: str | None
    queue: str
    notes: list[str] = field(default_factory=list)  # recorded as warning events on the new job


def model_shape(model: str, settings: Settings) -> ModelShape | None:
    """The base model's dimensions from its config.json (the builtin default's are known before conversion)."""
    spec = settings.base_models.get(model)
    if spec is None:
        return None
    config = base_model_config(model, settings)
    if config is None:
        return SMOLLM2_135M if spec == BUILTIN_SMOLLM2 else None
    return ModelShape.from_config(config)


def place_job(
    session: Session, resolved: Resolved, base_model: str, device_class: str | None, settings: Settings
) -> Placement:
    device_class = device_class or settings.default_device_class or None
    queue = class_queue(device_class, settings)
    known = reported(
        session, [device_class] if device_class else None, max_age_seconds=settings.device_class_ttl_seconds
    )
    notes: list[str] = []
    if device_class and device_class not in known:
        notes.append(
            f"No worker of device class {device_class} has reported yet; the job waits in queue {queue} until one "
            "joins (its device is checked when the job starts)."
        )
    shape = model_shape(base_model, settings)
    for name, capabilities in sorted(known.items()):
        _check_class(resolved, name, capabilities, shape, routed=device_class is not None)
    return Placement(device_class, queue, notes)


def _where(name: str, capabilities: DeviceCapabilities, routed: bool) -> str:
    shared = "" if routed else " (the job names no device_class, so any worker may take it)"
    return f"device class {name} ({capabilities.describe()}){shared}"


def _check_class(
    resolved: Resolved, name: str, capabilities: DeviceCapabilities, shape: ModelShape | None, *, routed: bool
) -> None:
    hp = resolved.hp
    where = _where(name, capabilities, routed)
    if hp.quantization == "4bit" and not capabilities.quantization_4bit:
        param = resolved.param("quantization")
        why = "has no CUDA GPU" if capabilities.device != "cuda" else "lacks bitsandbytes"
        raise ValidationFailed(
            f"{param}: 4bit (QLoRA through bitsandbytes) needs a CUDA GPU with bitsandbytes, and {where} {why}; "
            "train without quantization, or send device_class naming a GPU class.",
            param=param,
            code="unsupported_quantization",
        )
    try:
        precision = choose_precision(
            hp.compute_type,
            device=capabilities.device,
            compute_capability=capabilities.compute_capability,
            cpu_native_bf16=capabilities.cpu_native_bf16,
        )
    except UnsupportedPrecision as exc:
        param = resolved.param("compute_type")
        raise ValidationFailed(f"{param}: on {where}: {exc.message}", param=param, code=exc.code) from exc
    if shape is None or not capabilities.total_memory_bytes:
        return
    estimate = job_estimate(resolved, shape, precision)
    if estimate.total > capabilities.total_memory_bytes:
        param = resolved.param("per_device_train_batch_size")
        raise ValidationFailed(
            f"{param}: the run needs at least {estimate.describe()} at {hp.per_device_train_batch_size} x cutoff_len "
            f"{hp.cutoff_len} tokens in {precision}, more than the {gib(capabilities.total_memory_bytes)} of {where}; "
            "lower per_device_train_batch_size or cutoff_len (gradient_accumulation_steps keeps the effective "
            "batch), or turn on gradient_checkpointing or quantization.",
            param=param,
            code="insufficient_device_memory",
        )


def job_estimate(resolved: Resolved, shape: ModelShape, precision: str) -> MemoryEstimate:
    hp = resolved.hp
    return estimate_memory(
        shape,
        lora_rank=hp.lora_rank,
        lora_target=hp.lora_target,
        batch_size=hp.per_device_train_batch_size,
        cutoff_len=hp.cutoff_len,
        precision=precision,
        quantization=hp.quantization,
        gradient_checkpointing=hp.gradient_checkpointing,
    )
