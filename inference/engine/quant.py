"""The lean decoder's matrix products: dense weights, or weight-only int8 / int4 on a CPU (``INFERENCE_QUANT``).

Decoding one token reads every weight once, so on a CPU its speed is the speed of reading weights: measured with
the default model's shapes (2 threads), the products of one token took 47 ms in fp32, 21 ms in bf16, 10 ms with
int8 weights and 5.4 ms with int4 weights (groups of 32, as llama.cpp's Q4_1 keeps them). The quantised kernels
are PyTorch's own (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``); they are fast with bf16 inputs only
(fp32 inputs took 6-30x longer), so each product rounds its input to bf16 and returns to the model's dtype.
Everything else (norms, rotary, attention, the residual stream) stays in the model's dtype, fp32 on a CPU:
attention over a bf16 cache measured 7x slower than over an fp32 one, and fp32 keeps answers closer to the dense
model's. Rounding weights still changes some greedy answers (the benchmark counts how many), so these routes are
opt-in.

Quantised routes fuse the products that read the same input (q/k/v, gate/up) into one call: the weights are new
tensors anyway, and on a CPU each call costs microseconds of dispatch. Dense weights stay the loaded tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SCHEMES = ("none", "int8", "int4")
INT4_GROUP = 32
KERNEL_DTYPE = torch.bfloat16  # the quantised kernels' input, scale and output dtype


def check_scheme(scheme: str, device: torch.device) -> str:
    scheme = (scheme or "none").lower()
    if scheme not in SCHEMES:
        raise ValueError(f"INFERENCE_QUANT must be one of {', '.join(SCHEMES)}, not {scheme!r}")
    if scheme != "none" and device.type != "cpu":
        raise ValueError(f"INFERENCE_QUANT={scheme} is a CPU route; on {device.type} leave it at none")
    if scheme == "int4" and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise ValueError(f"INFERENCE_QUANT=int4 needs a newer torch than {torch.__version__} (2.6 or later)")
    return scheme


class Projection:
    """One input, one or more outputs: ``parts(x)`` gives each output in the order the weights were given."""

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        (out,) = self.parts(x)
        return out

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError


@dataclass
class Dense(Projection):
    weights: list[torch.Tensor]
    biases: list[torch.Tensor | None]

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(F.linear(x, w, b) for w, b in zip(self.weights, self.biases, strict=True))

    def tensors(self) -> list[torch.Tensor]:
        return [*self.weights, *(b for b in self.biases if b is not None)]


@dataclass
class _Fused(Projection):
    widths: list[int]
    bias: torch.Tensor | None  # fp32, added after the product

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self._product(x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE)).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        out = out.view(*x.shape[:-1], out.shape[-1])
        return tuple(out.split(self.widths, dim=-1)) if len(self.widths) > 1 else (out,)


@dataclass
class Int8(_Fused):
    """Per-output-channel symmetric int8: w = q * scale."""

    weight: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor  # [out], KERNEL_DTYPE

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.weight, self.scales)

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight, self.scales, *([self.bias] if self.bias is not None else [])]


@dataclass
class Int4(_Fused):
    """Asymmetric int4 in groups of ``INT4_GROUP`` along the input: w = q * scale + min (llama.cpp's Q4_1 form)."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor  # [groups, out, 2], KERNEL_DTYPE

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, INT4_GROUP, self.scales_and_zeros)

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.scales_and_zeros, *([self.bias] if self.bias is not None else [])]


def _joined(
    weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fp32 weights stacked along their outputs, and their biases likewise (zeros where one has none)."""
    weight = torch.cat([w.float() for w in weights])
    if all(b is None for b in biases):
        return weight, None
    parts = [b.float() if b is not None else torch.zeros(w.shape[0]) for w, b in zip(weights, biases, strict=True)]
    return weight, torch.cat(parts)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scales = weight.abs().amax(dim=1).clamp_min(1e-12) / 127
    q = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales.to(KERNEL_DTYPE)


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out_features, in_features = weight.shape
    groups = weight.view(out_features, in_features // INT4_GROUP, INT4_GROUP)
    low = groups.amin(dim=-1, keepdim=True)
    scale = (groups.amax(dim=-1, keepdim=True) - low).clamp_min(1e-12) / 15
    q = torch.round((groups - low) / scale).clamp(0, 15).to(torch.int32).view(out_features, in_features)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    # The kernel computes (q - 8) * scale + zero, so zero is the group's minimum plus eight steps.
    zeros = low + 8 * scale
    scales_and_zeros = torch.cat([scale, zeros], dim=-1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)
    return packed, scales_and_zeros


def projection(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None], scheme: str) -> Projection:
    """The products of one input with ``weights``; under a quantised scheme, fused into one quantised matrix."""
    if scheme == "none":
        return Dense(list(weights), list(biases))
    widths = [int(w.shape[0]) for w in weights]
    weight, bias = _joined(weights, biases)
    if scheme == "int4" and weight.shape[1] % INT4_GROUP == 0:
        packed, scales_and_zeros = quantize_int4(weight)
        return Int4(widths, bias, packed, scales_and_zeros)
    # int8, and int4's fallback for widths its groups do not divide.
    q, scales = quantize_int8(weight)
    return Int8(widths, bias, q, scales)
