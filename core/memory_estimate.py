"""How much device memory a LoRA fine-tune needs, from the base model's config.json and the job's knobs.

Pure arithmetic (no torch), so the api checks a job against a device class's memory before queueing it and the
worker reports the same figures in its pre-flight plan. The components:

- weights: every base parameter in the frozen dtype (bf16: 2 bytes; fp16 and fp32 runs keep fp32 masters: 4),
  or, with 4-bit quantization, the decoder layers' linear weights in NF4 (half a byte, plus double-quantized
  block constants) and the rest (embeddings, norms, an untied output head) in the frozen dtype;
- lora: the adapter's A and B matrices, always fp32; gradients: one fp32 value per LoRA weight; optimizer:
  AdamW's two fp32 moments per LoRA weight;
- activations: what the backward pass keeps per token of batch x cutoff_len: each decoder layer's projection
  inputs and outputs (or, with gradient checkpointing, one hidden state per layer plus one layer recomputed),
  and the fp32 logits over the vocabulary with their softmax for the loss.

It counts what a step keeps resident, not allocator slack, transient gradients of activations or the CUDA
context (bench/memory_bench.py: the activations came within 8% of what autograd kept on the default model), so a
job whose estimate exceeds a device's memory will not fit it, while one just below may still need headroom.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# A decoder layer's linear modules (LLaMA layout): what ``all`` adapts.
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FOUR_BIT_BYTES_PER_WEIGHT = 0.5 + 0.127 / 8  # NF4 plus double-quantized block constants (QLoRA paper, ~0.127 bit)
FP32 = 4
ADAMW_STATES = 2


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a LLaMA-style decoder that decide its parameter count and activations."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape | None:
        """From a config.json; None when a dimension is missing (an architecture this estimate does not know)."""
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            shape = cls(
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_hidden_layers=int(config["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(config.get("num_key_value_heads") or heads),
                vocab_size=int(config["vocab_size"]),
                head_dim=int(config.get("head_dim") or hidden // heads),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            )
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            return None
        dims = (shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers, shape.vocab_size, shape.head_dim)
        return shape if all(d > 0 for d in dims) else None

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each decoder-layer linear module."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def layer_linear_parameters(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    @property
    def other_parameters(self) -> int:
        """Embeddings, an untied output head and the RMSNorm weights (two per layer and a final one)."""
        embeddings = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embeddings
        norms = (2 * self.num_hidden_layers + 1) * self.hidden_size
        return embeddings + head + norms

    @property
    def total_parameters(self) -> int:
        return self.num_hidden_layers * self.layer_linear_parameters + self.other_parameters


# SmolLM2-135M (the builtin default model): known here because its config.json exists only once the worker has
# converted the shipped GGUF.
SMOLLM2_135M = ModelShape(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    head_dim=64,
    tie_word_embeddings=True,
)


def lora_modules(target: str | list[str], shape: ModelShape) -> list[str]:
    """The adapted modules, one entry per layer they sit in (``q_proj`` on every layer counts once per layer;
    a path naming one layer, ``model.layers.3.mlp.down_proj``, once)."""
    raw = target.split(",") if isinstance(target, str) else target
    names = [t.strip() for t in raw if t.strip()]
    if names == ["all"]:
        return [m for m in LINEAR_MODULES for _ in range(shape.num_hidden_layers)]
    modules: list[str] = []
    for name in names:
        parts = name.split(".")
        if parts[-1] not in LINEAR_MODULES:
            continue  # a module this layout lacks; the lora_target check names it
        one_layer = any(p.isdigit() for p in parts[:-1])
        modules += [parts[-1]] * (1 if one_layer else shape.num_hidden_layers)
    return modules


def lora_parameters(shape: ModelShape, target: str | list[str], rank: int) -> int:
    shapes = shape.linear_shapes()
    return sum(rank * (shapes[m][0] + shapes[m][1]) for m in lora_modules(target, shape))


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    lora: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.gradients + self.optimizer + self.activations

    def to_json(self) -> dict[str, int]:
        return {**{f"{k}_bytes": v for k, v in asdict(self).items()}, "total_bytes": self.total}

    def describe(self) -> str:
        parts = ", ".join(f"{k} {gib(v)}" for k, v in asdict(self).items())
        return f"{gib(self.total)} ({parts})"


def gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


def weight_bytes(precision: str) -> int:
    """Bytes per frozen base weight: bf16 stores them in bf16; fp16 runs keep fp32 masters (see worker compute)."""
    return 2 if precision == "bf16" else FP32


def activation_bytes(precision: str) -> int:
    return 2 if precision in ("bf16", "fp16") else FP32


def estimate_memory(
    shape: ModelShape,
    *,
    lora_rank: int,
    lora_target: str | list[str],
    batch_size: int,
    cutoff_len: int,
    precision: str,
    quantization: str = "none",
    gradient_checkpointing: bool = False,
) -> MemoryEstimate:
    """Bytes resident at the peak of a training step (see the module's docstring for what each part counts)."""
    frozen = weight_bytes(precision)
    linear = shape.num_hidden_layers * shape.layer_linear_parameters
    if quantization == "4bit":
        weights = int(linear * FOUR_BIT_BYTES_PER_WEIGHT) + shape.other_parameters * frozen
    else:
        weights = shape.total_parameters * frozen
    lora = lora_parameters(shape, lora_target, lora_rank)

    tokens = batch_size * cutoff_len
    act = activation_bytes(precision)
    h, kv = shape.hidden_size, shape.num_key_value_heads * shape.head_dim
    q, i = shape.num_attention_heads * shape.head_dim, shape.intermediate_size
    # Kept for backward in one layer, per token: the two norms' outputs (h each), q, k, v, the attention output
    # (q), the residual after attention (h), gate, up, the activation and its product with up (i each), plus the
    # LoRA rank-sized intermediates of every adapted module.
    adapted_per_layer = len(lora_modules(lora_target, shape)) / max(shape.num_hidden_layers, 1)
    per_layer_token = 3 * h + 2 * q + 2 * kv + 4 * i + int(adapted_per_layer * lora_rank)
    if gradient_checkpointing:
        layers = shape.num_hidden_layers * h + per_layer_token  # each layer's input, one layer recomputed
    else:
        layers = shape.num_hidden_layers * per_layer_token
    # Logits are upcast to fp32 for the loss; the softmax keeps a second vocabulary-sized tensor for backward.
    logits = 2 * shape.vocab_size * FP32
    activations = tokens * (layers * act + logits)
    return MemoryEstimate(
        weights=weights,
        lora=lora * FP32,
        gradients=lora * FP32,
        optimizer=lora * FP32 * ADAMW_STATES,
        activations=activations,
    )
