"""The memory estimate's arithmetic, on SmolLM2-135M's config numbers (its parameter counts are measured facts:
134.5M parameters, 2.44M LoRA weights on all linear layers at rank 8, 0.46M on q_proj and v_proj)."""

from __future__ import annotations

import pytest

from core.memory_estimate import FOUR_BIT_BYTES_PER_WEIGHT, SMOLLM2_135M, ModelShape, estimate_memory, lora_parameters

SMOLLM2_CONFIG = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}
# One decoder layer's linear weights: q and o 576x576, k and v 576x192, gate, up and down 576x1536.
LAYER_LINEAR = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
OTHER = 49152 * 576 + 61 * 576  # tied embeddings, two norms per layer and the final one


def test_the_shape_is_read_from_a_config_json() -> None:
    assert ModelShape.from_config(SMOLLM2_CONFIG) == SMOLLM2_135M  # head_dim defaults to hidden / heads = 64
    assert ModelShape.from_config({"hidden_size": 576}) is None
    assert ModelShape.from_config({**SMOLLM2_CONFIG, "num_attention_heads": 0}) is None


def test_parameter_counts() -> None:
    assert SMOLLM2_135M.layer_linear_parameters == LAYER_LINEAR == 3_538_944
    assert SMOLLM2_135M.total_parameters == 30 * LAYER_LINEAR + OTHER == 134_515_008
    untied = ModelShape.from_config({**SMOLLM2_CONFIG, "tie_word_embeddings": False})
    assert untied is not None and untied.total_parameters - SMOLLM2_135M.total_parameters == 49152 * 576


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("all", 2_442_240),
        (["q_proj", "v_proj"], 460_800),
        ("q_proj,v_proj", 460_800),
        (["self_attn.q_proj"], 30 * 8 * (576 + 576)),
        (["model.layers.0.mlp.down_proj"], 8 * (1536 + 576)),  # one layer only
    ],
)
def test_lora_parameters(target: str | list[str], expected: int) -> None:
    assert lora_parameters(SMOLLM2_135M, target, 8) == expected


def test_components_of_a_bf16_run() -> None:
    lora = 2_442_240
    estimate = estimate_memory(
        SMOLLM2_135M, lora_rank=8, lora_target="all", batch_size=1, cutoff_len=8, precision="bf16"
    )
    assert estimate.weights == 134_515_008 * 2
    assert (estimate.lora, estimate.gradients, estimate.optimizer) == (lora * 4, lora * 4, lora * 8)
    # Per token and layer: 3 hidden (norms, residual) + 2 q + 2 kv + 4 intermediate + 7 adapted modules x rank.
    per_layer = 3 * 576 + 2 * 576 + 2 * 192 + 4 * 1536 + 7 * 8
    assert per_layer == 9464
    assert estimate.activations == 8 * (30 * per_layer * 2 + 2 * 49152 * 4)
    assert estimate.total == sum(v for k, v in estimate.to_json().items() if k != "total_bytes")


def test_precision_quantization_and_checkpointing_change_the_right_parts() -> None:
    common = {"lora_rank": 8, "lora_target": "all", "batch_size": 4, "cutoff_len": 1024}
    fp32 = estimate_memory(SMOLLM2_135M, precision="fp32", **common)  # type: ignore[arg-type]
    fp16 = estimate_memory(SMOLLM2_135M, precision="fp16", **common)  # type: ignore[arg-type]
    bf16 = estimate_memory(SMOLLM2_135M, precision="bf16", **common)  # type: ignore[arg-type]
    # fp16 keeps fp32 masters of the frozen weights but computes activations in half precision.
    assert fp16.weights == fp32.weights == 2 * bf16.weights
    assert fp16.activations == bf16.activations < fp32.activations

    qlora = estimate_memory(SMOLLM2_135M, precision="bf16", quantization="4bit", **common)  # type: ignore[arg-type]
    assert qlora.weights == int(30 * LAYER_LINEAR * FOUR_BIT_BYTES_PER_WEIGHT) + OTHER * 2
    assert (qlora.lora, qlora.activations) == (bf16.lora, bf16.activations)

    checkpointed = estimate_memory(
        SMOLLM2_135M,
        precision="bf16",
        gradient_checkpointing=True,
        **common,  # type: ignore[arg-type]
    )
    tokens = 4 * 1024
    assert checkpointed.activations == tokens * ((30 * 576 + 9464) * 2 + 2 * 49152 * 4)
    assert checkpointed.weights == bf16.weights and checkpointed.activations < bf16.activations / 2
