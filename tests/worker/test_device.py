"""The worker's device decisions on this CPU: precision, 4-bit refusal, the capabilities it reports, the memory
estimate against a real model's parameters, and gradient checkpointing giving the same gradients."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from core.contracts import Hyperparameters
from core.memory_estimate import ModelShape, lora_parameters
from tests.factories import alpaca_records
from worker.pipeline.data import pad_batch, prepare_data
from worker.pipeline.device import (
    Compute,
    check_quantization,
    cpu_has_native_bf16,
    device_capabilities,
    preflight_memory,
    resolve_compute,
)
from worker.pipeline.errors import PipelineError
from worker.pipeline.train import LossFunction, attach_lora, load_base_model, trainable_parameters

FP32 = Compute(torch.device("cpu"), "fp32")


def test_auto_on_this_cpu_and_fp16_refused() -> None:
    assert resolve_compute("auto").precision == ("bf16" if cpu_has_native_bf16() else "fp32")
    with pytest.raises(PipelineError) as caught:
        resolve_compute("fp16")
    assert caught.value.param == "compute_type" and caught.value.code == "unsupported_compute_type"


def test_4bit_is_refused_on_a_cpu_before_anything_loads() -> None:
    check_quantization("none", FP32)
    with pytest.raises(PipelineError) as caught:
        check_quantization("4bit", FP32)
    assert caught.value.code == "unsupported_quantization" and caught.value.param == "quantization"
    assert "CUDA" in caught.value.message


def test_this_host_reports_a_cpu_that_cannot_do_4bit() -> None:
    capabilities = device_capabilities()
    assert capabilities.device == "cpu" and capabilities.compute_capability is None
    assert not capabilities.quantization_4bit
    assert capabilities.total_memory_bytes and capabilities.total_memory_bytes > 1024**3
    assert capabilities.cpu_native_bf16 == cpu_has_native_bf16()


@pytest.mark.parametrize("target", ["all", ["q_proj", "v_proj"]])
def test_the_estimate_counts_the_parameters_the_model_has(tiny_models: dict[str, Path], target: Any) -> None:
    base = tiny_models["tiny-llama"]
    shape = ModelShape.from_config(json.loads((base / "config.json").read_text()))
    assert shape is not None
    hp = Hyperparameters(lora_rank=4, lora_target=target)
    model = attach_lora(load_base_model(base, FP32), hp, 0)
    trainable, total = trainable_parameters(model)
    assert lora_parameters(shape, target, 4) == trainable
    assert shape.total_parameters == total - trainable

    estimate = preflight_memory(base, hp, FP32)
    assert estimate is not None and estimate.lora == trainable * 4 and estimate.weights == (total - trainable) * 4


def test_gradient_checkpointing_gives_the_same_gradients(tiny_models: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    base = tiny_models["tiny-llama"]
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    hp = Hyperparameters(lora_rank=4, lora_dropout=0.0)
    conversations = [
        [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
        for r in alpaca_records(4)
    ]
    data = prepare_data(tokenizer, conversations, None, hp, 0)
    batch = pad_batch(data.train[:4], tokenizer.pad_token_id)

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = attach_lora(load_base_model(base, FP32, gradient_checkpointing=checkpointing), hp, 0)
        inner = model.get_base_model()
        flag = (
            "is_activation_checkpointing"
            if hasattr(inner, "is_activation_checkpointing")
            else "is_gradient_checkpointing"
        )
        assert getattr(inner, flag) == checkpointing
        model.train()
        LossFunction(model, FP32)(batch).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain and plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6, msg=name)
