"""The precision ``compute_type: auto`` picks per device, and the queue per device class (pure functions)."""

from __future__ import annotations

import pytest

from core.device_classes import DeviceCapabilities, UnsupportedPrecision, choose_precision, class_queue
from core.settings import Settings


@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        ((6, 1), "fp16"),  # Pascal
        ((7, 0), "fp16"),  # V100
        ((7, 5), "fp16"),  # T4: bf16 only emulated
        ((8, 0), "bf16"),  # A100
        ((8, 6), "bf16"),
        ((8, 9), "bf16"),
        ((9, 0), "bf16"),  # H100/H200
        ((10, 0), "bf16"),
    ],
)
def test_auto_on_a_gpu_picks_bf16_only_from_compute_capability_8(capability: tuple[int, int], expected: str) -> None:
    assert choose_precision("auto", device="cuda", compute_capability=capability) == expected


def test_auto_on_a_cpu_follows_native_bf16() -> None:
    assert choose_precision("auto", device="cpu", cpu_native_bf16=True) == "bf16"
    assert choose_precision("auto", device="cpu", cpu_native_bf16=False) == "fp32"


def test_explicit_choices() -> None:
    assert choose_precision("fp16", device="cuda", compute_capability=(7, 5)) == "fp16"
    assert choose_precision("bf16", device="cuda", compute_capability=(8, 0)) == "bf16"
    assert choose_precision("fp32", device="cpu") == "fp32"
    with pytest.raises(UnsupportedPrecision, match=r"compute capability 8\.0"):
        choose_precision("bf16", device="cuda", compute_capability=(7, 5))
    with pytest.raises(UnsupportedPrecision, match="needs a CUDA device"):
        choose_precision("fp16", device="cpu")
    with pytest.raises(UnsupportedPrecision) as caught:
        choose_precision("int3", device="cpu")
    assert caught.value.code == "invalid_compute_type"


def test_4bit_needs_cuda_and_bitsandbytes() -> None:
    assert DeviceCapabilities(device="cuda", compute_capability=(8, 0), bitsandbytes=True).quantization_4bit
    assert not DeviceCapabilities(device="cuda", compute_capability=(8, 0), bitsandbytes=False).quantization_4bit
    assert not DeviceCapabilities(device="cpu", bitsandbytes=True).quantization_4bit


def test_a_class_has_its_own_queue_and_no_class_means_the_shared_one() -> None:
    settings = Settings(_env_file=None, training_queue="training")  # type: ignore[call-arg]
    assert class_queue("gpu-a100", settings) == "training.gpu-a100"
    assert class_queue(None, settings) == class_queue("", settings) == "training"
