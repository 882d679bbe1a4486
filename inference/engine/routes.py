"""Which route serves a model: the backend (lean decoder, transformers' forward, llama.cpp) and its number type.

The default is chosen by measurement, per device (README, benchmarks): on a CPU, llama.cpp with f16 weights
decodes about 6x faster than the fp32 lean decoder and kept every greedy answer of the default model (100%
next-token agreement with the fp32 reference on the golden prompts; bf16, as fast, kept 99.48% and changed some
answers; Q8_0 and below fell under the gate); on CUDA, the lean decoder in bf16. Every route is then held to the
gate for each model it loads, and the routes after it are the fall-backs, in order, ending with the faithful one
(the lean decoder in fp32, whose greedy tokens are the reference's). ``INFERENCE_BACKEND`` / ``INFERENCE_QUANT`` /
``INFERENCE_DTYPE`` name one route explicitly, which is then tried first, the faithful route still behind it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from artifacts.serving import DEFAULT_CPU_TYPE


@dataclass(frozen=True)
class Route:
    backend: str  # auto (lean where the architecture allows, else reference) | lean | reference | llamacpp
    quant: str = "none"  # lean: none|int8|int4; llamacpp: f32|f16|bf16|q8_0|q4_1|q4_0|iq4_nl or int8|int4
    dtype: str = "auto"  # lean/reference: auto|fp32|bf16|fp16

    @property
    def name(self) -> str:
        if self.backend == "llamacpp":
            return f"llamacpp:{self.quant}"
        parts = [self.backend]
        if self.dtype != "auto":
            parts.append(self.dtype)
        if self.quant != "none":
            parts.append(self.quant)
        return ":".join(parts)


FAITHFUL = Route("auto", "none", "fp32")


def plan_routes(
    *,
    backend: str,
    quant: str,
    dtype: str,
    device: torch.device,
    llamacpp_available: bool,
) -> list[Route]:
    """The routes to try for each model, first choice first, the faithful route last."""
    explicit = backend != "auto" or quant not in ("", "none") or dtype not in ("", "auto")
    if explicit:
        if backend == "llamacpp" and quant in ("", "none"):
            # llama.cpp's dense types follow INFERENCE_DTYPE (fp32 unless asked otherwise on a CPU).
            quant = {"bf16": "bf16", "fp16": "f16", "float16": "f16", "bfloat16": "bf16"}.get(dtype.lower(), "f32")
        first = Route(backend, quant or "none", dtype or "auto")
        chain = [first]
    elif device.type == "cuda":
        chain = [Route("lean", "none", "auto")]  # bf16 where the GPU has it, else fp16
    elif llamacpp_available:
        chain = [Route("llamacpp", DEFAULT_CPU_TYPE), Route("llamacpp", "f32")]
    else:
        chain = []
    if FAITHFUL not in chain:
        chain.append(FAITHFUL)
    return chain
