"""Weight-only quantised products (INFERENCE_QUANT): the kernels compute what the quantised weights say, the
decoder built on them stays close to the dense one, and settings it cannot honour are refused at load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference.engine.cache import KVCache
from inference.engine.lean import LeanDecoder
from inference.engine.loader import LoadedModel, ModelLoadError, load_model
from inference.engine.quant import INT4_GROUP, Int4, Int8, projection, quantize_int4, quantize_int8


def _dequantized_int4(weight: torch.Tensor) -> torch.Tensor:
    """The same rounding as quantize_int4, written out in plain arithmetic: q * scale + min per group."""
    out_features, in_features = weight.shape
    groups = weight.view(out_features, -1, INT4_GROUP)
    low = groups.amin(-1, keepdim=True)
    scale = (groups.amax(-1, keepdim=True) - low).clamp_min(1e-12) / 15
    q = torch.round((groups - low) / scale).clamp(0, 15)
    return (q * scale + low).view(out_features, in_features)


def test_int4_and_int8_products_equal_their_dequantized_weights() -> None:
    torch.manual_seed(0)
    weight = torch.randn(96, 128) * 0.05
    x = torch.randn(5, 128)

    packed, scales_and_zeros = quantize_int4(weight)
    got = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, INT4_GROUP, scales_and_zeros).float()
    expected = x @ _dequantized_int4(weight).T
    # bf16 activations and scales: about three significant digits.
    assert torch.allclose(got, expected, rtol=0.03, atol=0.03 * expected.abs().max().item())

    q, scales = quantize_int8(weight)
    got8 = torch._weight_int8pack_mm(x.bfloat16(), q, scales).float()
    expected8 = x @ (q.float() * scales.float()[:, None]).T
    assert torch.allclose(got8, expected8, rtol=0.03, atol=0.03 * expected8.abs().max().item())
    # And the rounding itself is small: every int8 weight within 1% of the largest weight (bf16 scales included).
    assert ((q.float() * scales.float()[:, None]) - weight).abs().max() <= 0.01 * weight.abs().max()


def test_fused_projections_split_back_into_their_parts_with_biases() -> None:
    torch.manual_seed(1)
    weights = [torch.randn(64, 64) * 0.05, torch.randn(32, 64) * 0.05, torch.randn(32, 64) * 0.05]
    biases = [torch.randn(64), None, torch.randn(32)]
    x = torch.randn(2, 3, 64)
    for scheme, kind in (("int4", Int4), ("int8", Int8)):
        fused = projection(weights, biases, scheme)
        assert isinstance(fused, kind)
        parts = fused.parts(x)
        assert [p.shape for p in parts] == [(2, 3, 64), (2, 3, 32), (2, 3, 32)]
        for part, weight, bias in zip(parts, weights, biases, strict=True):
            # Quantisation is per output row (and group), so a fused part equals that weight quantised alone.
            alone = projection([weight], [bias], scheme)(x)
            assert torch.allclose(part.float(), alone.float(), atol=0.02)
    # A width int4's groups do not divide falls back to int8 instead of failing.
    assert isinstance(projection([torch.randn(16, 48)], [None], "int4"), Int8)


def _last_logits(model: LoadedModel, prompt: str) -> torch.Tensor:
    ids = model.encode_chat([{"role": "user", "content": prompt}])
    decoder = model.decoder
    cache: KVCache = decoder.new_cache(1, len(ids) + 1)
    return decoder.forward(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool), cache)[0]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_quantized_model_stays_close_to_the_dense_one(tiny_models: dict[str, Path], scheme: str) -> None:
    dense = load_model("tiny-llama", tiny_models["tiny-llama"])
    quantized = load_model("tiny-llama", tiny_models["tiny-llama"], quant_setting=scheme)
    assert isinstance(quantized.decoder, LeanDecoder) and quantized.decoder.quant == scheme
    assert quantized.decoder.dtype == torch.float32  # only the products' inputs are rounded to bf16
    assert quantized.weight_bytes < dense.weight_bytes
    for prompt in ("Tell me about tides.", "What is the weather like?"):
        ours, reference = _last_logits(quantized, prompt), _last_logits(dense, prompt)
        similarity = torch.nn.functional.cosine_similarity(ours, reference, dim=0)
        assert similarity > 0.98, (scheme, prompt, similarity.item())


def test_settings_a_model_cannot_honour_are_refused_at_load(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match="INFERENCE_QUANT must be one of"):
        load_model("tiny-llama", tiny_models["tiny-llama"], quant_setting="int3")
    with pytest.raises(ModelLoadError, match="needs the lean decoder"):
        load_model("tiny-llama", tiny_models["tiny-llama"], quant_setting="int8", backend_setting="reference")
