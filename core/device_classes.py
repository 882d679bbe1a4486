"""Device classes: where a job trains, and what the workers of each class reported they can do.

Every worker belongs to one class (WORKER_DEVICE_CLASS, e.g. ``gpu-a100``, ``gpu-any``, ``cpu``) and consumes the
shared training queue plus its class's own queue (``<TRAINING_QUEUE>.<class>``). A job that names a class (or
gets DEFAULT_DEVICE_CLASS) is sent to that class's queue; one without goes to the shared queue, which every
worker takes from.

At start-up each worker probes its device (in a short child process: the worker's parent never touches an
accelerator) and writes what it found into ``device_classes``, one row per class, the latest worker's report
winning: a class is meant to group alike devices. The api, which never imports torch, checks a new job against
those rows (core.memory_estimate and ``choose_precision`` here are pure functions both sides share).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import timedelta
from typing import Literal

from pydantic import BaseModel
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.jobs import db_now
from core.orm import DeviceClass
from core.settings import Settings

Precision = Literal["fp32", "fp16", "bf16"]
DEVICE_CLASS_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_DEVICE_CLASS_RE = re.compile(DEVICE_CLASS_PATTERN)
# bf16 is native from Ampere (compute capability 8.0) on; older GPUs emulate it slowly or not at all.
BF16_MIN_CAPABILITY = (8, 0)


class DeviceCapabilities(BaseModel):
    """What one worker found on its device."""

    device: Literal["cuda", "cpu"]
    device_name: str = ""
    compute_capability: tuple[int, int] | None = None
    cpu_native_bf16: bool = False
    total_memory_bytes: int | None = None
    bitsandbytes: bool = False

    @property
    def quantization_4bit(self) -> bool:
        """QLoRA needs bitsandbytes' CUDA kernels."""
        return self.device == "cuda" and self.bitsandbytes

    def describe(self) -> str:
        if self.device == "cuda":
            cc = ".".join(map(str, self.compute_capability)) if self.compute_capability else "?"
            return f"{self.device_name or 'CUDA GPU'} (compute capability {cc})"
        return "CPU only"


class UnsupportedPrecision(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def choose_precision(
    requested: str,
    *,
    device: str,
    compute_capability: tuple[int, int] | None = None,
    cpu_native_bf16: bool = False,
) -> Precision:
    """The precision a run uses. ``auto``: on a GPU bf16 only where it is native (compute capability >= 8.0),
    else fp16 (with a loss scaler); on a CPU bf16 where AVX512-BF16 or AMX computes it, else fp32.
    Raises UnsupportedPrecision for an explicit choice the device cannot run."""
    cuda = device == "cuda"
    native_bf16 = cuda and compute_capability is not None and tuple(compute_capability) >= BF16_MIN_CAPABILITY
    if requested == "auto":
        if cuda:
            return "bf16" if native_bf16 else "fp16"
        return "bf16" if cpu_native_bf16 else "fp32"
    if requested == "fp16" and not cuda:
        raise UnsupportedPrecision(
            "unsupported_compute_type",
            "compute_type fp16 needs a CUDA device and this worker has only a CPU; use bf16, fp32 or auto.",
        )
    if requested == "bf16" and cuda and not native_bf16:
        raise UnsupportedPrecision(
            "unsupported_compute_type",
            "compute_type bf16 is not native on this GPU (it needs compute capability 8.0 or newer); use fp16, "
            "fp32 or auto.",
        )
    if requested not in ("fp32", "fp16", "bf16"):
        raise UnsupportedPrecision("invalid_compute_type", f"unknown compute_type {requested!r}")
    return requested  # type: ignore[return-value]


def is_device_class(name: str) -> bool:
    return bool(_DEVICE_CLASS_RE.match(name))


def class_queue(device_class: str | None, settings: Settings) -> str:
    """The queue a job of ``device_class`` is sent to; no class: the shared queue every worker consumes."""
    return f"{settings.training_queue}.{device_class}" if device_class else settings.training_queue


def publish(session: Session, device_class: str, capabilities: DeviceCapabilities, worker: str) -> None:
    """Record a worker's report for its class (the latest report wins)."""
    values = {
        "capabilities": capabilities.model_dump(mode="json"),
        "worker": worker[:255],
        "seen_at": db_now(session),
    }
    row = session.get(DeviceClass, device_class)
    if row is None:
        try:
            with session.begin_nested():
                session.add(DeviceClass(name=device_class, **values))
            return
        except IntegrityError:  # another worker of the class reported at the same moment
            row = session.get(DeviceClass, device_class, populate_existing=True)
            assert row is not None
    for key, value in values.items():
        setattr(row, key, value)


def renew(session: Session, device_class: str) -> None:
    """A worker of ``device_class`` is still there (its reconciler says so every sweep)."""
    session.execute(update(DeviceClass).where(DeviceClass.name == device_class).values(seen_at=db_now(session)))


def reported(
    session: Session, names: Sequence[str] | None = None, *, max_age_seconds: float | None = None
) -> dict[str, DeviceCapabilities]:
    """The classes workers reported (only ``names`` when given), by name; with ``max_age_seconds``, only those a
    worker reported or renewed that recently (database time): a class whose workers are all gone stops
    constraining jobs."""
    stmt = select(DeviceClass)
    if max_age_seconds is not None:
        stmt = stmt.where(DeviceClass.seen_at >= db_now(session) - timedelta(seconds=max_age_seconds))
    if names is not None:
        stmt = stmt.where(DeviceClass.name.in_(list(names)))
    out: dict[str, DeviceCapabilities] = {}
    for row in session.scalars(stmt):
        try:
            out[row.name] = DeviceCapabilities.model_validate(row.capabilities)
        except ValueError:
            continue  # written by a newer worker in a shape this process does not read: no constraint known
    return out
