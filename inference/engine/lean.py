"""A lean decoder for the Llama family (Llama, Qwen2, Mistral without sliding windows).

Why not ``model.generate`` or the model's own forward: ``generate`` pays the library's per-step bookkeeping and a
cache that grows by concatenation, and neither lets rows join or leave a running batch. This forward reads rotary
tables precomputed with the model's own rotary module and works on a cache the engine owns (``KVCache``). The
arithmetic follows the reference modules operation for operation (norm statistics in fp32, rotary as
``x*cos + rotate_half(x)*sin``, separate q/k/v and gate/up products), so greedy tokens match them. The weights are
the loaded tensors themselves, not copies: a model costs its file size in memory (fusing q/k/v or gate/up into one
product measured no faster on a CPU, where decoding is bound by reading the weights, and would double them while
loading). Under ``INFERENCE_QUANT`` the products are quantised copies instead, fused per input (see quant.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from artifacts.architecture import uses_sliding_window
from inference.engine.cache import KVCache
from inference.engine.quant import Projection, projection

SUPPORTED_TYPES = frozenset({"llama", "qwen2", "mistral"})
STATIC_ROPE = frozenset({"default", "linear", "llama3", "yarn"})
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"silu": F.silu, "gelu": F.gelu}


def unsupported_reason(config: Any) -> str | None:
    """Why this config needs the reference forward instead, or None when the lean one reproduces it."""
    if config.model_type not in SUPPORTED_TYPES:
        return f"model type {config.model_type!r}"
    if getattr(config, "hidden_act", "silu") not in ACTIVATIONS:
        return f"activation {config.hidden_act!r}"
    if uses_sliding_window(config):
        return "sliding-window attention"
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in STATIC_ROPE:
        return f"rope type {rope.get('rope_type')!r}"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp"
    return None


def _weight(linear: torch.nn.Linear) -> torch.Tensor:
    return linear.weight.detach()


def _bias(linear: torch.nn.Linear) -> torch.Tensor | None:
    return linear.bias.detach() if linear.bias is not None else None


def _projection(linears: list[Any], scheme: str) -> Projection:
    return projection([_weight(m) for m in linears], [_bias(m) for m in linears], scheme)


@dataclass
class _Layer:
    norm1: torch.Tensor
    qkv: Projection
    out: Projection
    norm2: torch.Tensor
    gate_up: Projection
    down: Projection

    @classmethod
    def lift(cls, layer: Any, scheme: str) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        return cls(
            norm1=layer.input_layernorm.weight.detach(),
            qkv=_projection([attn.q_proj, attn.k_proj, attn.v_proj], scheme),
            out=_projection([attn.o_proj], scheme),
            norm2=layer.post_attention_layernorm.weight.detach(),
            gate_up=_projection([mlp.gate_proj, mlp.up_proj], scheme),
            down=_projection([mlp.down_proj], scheme),
        )

    def tensors(self) -> list[torch.Tensor]:
        projections = (self.qkv, self.out, self.gate_up, self.down)
        return [self.norm1, self.norm2] + [t for p in projections for t in p.tensors()]


class LeanDecoder:
    """Weights lifted out of a loaded transformers model; the model object itself can then be dropped."""

    def __init__(self, model: Any, max_positions: int, *, quant: str = "none") -> None:
        config = model.config
        inner = model.model
        self.dtype: torch.dtype = next(model.parameters()).dtype
        self.device: torch.device = next(model.parameters()).device
        self.layers_count = int(config.num_hidden_layers)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.eps = float(config.rms_norm_eps)
        self.scale = self.head_dim**-0.5
        self.act: Callable[[torch.Tensor], torch.Tensor] = ACTIVATIONS[getattr(config, "hidden_act", "silu")]
        self.q_width = self.heads * self.head_dim
        self.vocab_size = int(config.vocab_size)
        with torch.no_grad():
            self.quant = quant
            self.embed = inner.embed_tokens.weight.detach()
            self.final_norm = inner.norm.weight.detach()
            # The output layer picks every token: int4 there made 15 of 16 greedy answers differ (int8: 11) for 12%
            # more speed, so it stays int8.
            head_scheme = "int8" if quant != "none" else "none"
            self.lm_head = _projection([model.lm_head], head_scheme)
            self.layers = [_Layer.lift(layer, quant) for layer in inner.layers]
            self.cos, self.sin = self._rotary_tables(inner.rotary_emb, max_positions)

    def _rotary_tables(self, rotary: Any, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin per position, from the model's own rotary module (so every static rope type works).

        ``rotate_half(x) * sin`` equals ``roll(x, half) * [-sin_lo, sin_hi]``: one roll instead of slice/neg/cat.
        """
        positions = torch.arange(max_positions, device=self.device)[None, :]
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = rotary(probe, positions)
        cos, sin = cos[0], sin[0]
        half = self.head_dim // 2
        signed = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
        return cos.contiguous(), signed.contiguous()

    @property
    def parameter_bytes(self) -> int:
        tensors = [self.embed, self.final_norm, *self.lm_head.tensors()]
        tensors += [t for layer in self.layers for t in layer.tensors()]
        unique = {t.data_ptr(): t for t in tensors}  # tied embeddings count once
        return sum(t.numel() * t.element_size() for t in unique.values())

    def cache_bytes(self, rows: int, tokens_per_row: int) -> int:
        # The engine's cache grows with the batch's longest row; at most every row holds a full context.
        per_token = 2 * self.layers_count * self.kv_heads * self.head_dim
        return rows * tokens_per_row * per_token * torch.finfo(self.dtype).bits // 8

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache.empty(
            self.layers_count, batch, self.kv_heads, self.head_dim, capacity, dtype=self.dtype, device=self.device
        )

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Same steps as the reference RMSNorm: statistics in fp32, scale in the model dtype.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, new_mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run ``input_ids`` [batch, steps] (``new_mask`` marks real tokens, pads on the left) through the model,
        appending to ``cache``; returns fp32 logits of each row's last position [batch, vocab]."""
        h = self._hidden(input_ids, new_mask, cache)
        return self.lm_head(self._norm(h[:, -1], self.final_norm)).float()

    def score(self, sequences: list[tuple[list[int], int]]) -> list[np.ndarray]:
        """Teacher-forced logits of each (tokens, first) sequence after each of ``tokens[first:]`` [positions,
        vocab], one pass per sequence (the fidelity gate's fast path)."""
        results = []
        for tokens, first in sequences:
            ids = torch.tensor([tokens], device=self.device)
            cache = self.new_cache(1, len(tokens))
            with torch.inference_mode():
                h = self._hidden(ids, torch.ones_like(ids, dtype=torch.bool), cache)
                results.append(self.lm_head(self._norm(h[0, first:], self.final_norm)).float().cpu().numpy())
        return results

    def _hidden(self, input_ids: torch.Tensor, new_mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
        batch, steps = input_ids.shape
        cache.reserve(steps)
        start = cache.length
        end = start + steps
        cache.mask[:, start:end] = new_mask
        positions = (cache.positions[:, None] + new_mask.long().cumsum(1) - 1).clamp_min(0)
        cache.positions += new_mask.long().sum(1)
        cache.length = end

        cos = self.cos[positions][:, None]  # [batch, 1, steps, head_dim]
        sin = self.sin[positions][:, None]
        attn_mask = self._attention_mask(cache, start, steps)

        h = F.embedding(input_ids, self.embed)
        half = self.head_dim // 2
        for index, layer in enumerate(self.layers):
            x = self._norm(h, layer.norm1)
            q, k, v = layer.qkv.parts(x)
            q = q.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
            k = k.unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2)
            v = v.unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2)
            q = q * cos + torch.roll(q, half, dims=-1) * sin
            keys, values = cache.keys[index], cache.values[index]
            keys[:, :, start:end] = k * cos + torch.roll(k, half, dims=-1) * sin
            values[:, :, start:end] = v
            attended = F.scaled_dot_product_attention(
                q,
                keys[:, :, :end],
                values[:, :, :end],
                attn_mask=attn_mask,
                scale=self.scale,
                enable_gqa=self.kv_heads != self.heads,
            )
            h = h + layer.out(attended.transpose(1, 2).reshape(batch, steps, self.q_width))
            x = self._norm(h, layer.norm2)
            gate, up = layer.gate_up.parts(x)
            h = h + layer.down(self.act(gate) * up)
        return h

    def _attention_mask(self, cache: KVCache, start: int, steps: int) -> torch.Tensor | None:
        end = start + steps
        keys = cache.mask[:, :end]
        if steps == 1:
            # Decode: every cached real token is visible; no mask at all when no row has padding.
            return None if bool(keys.all()) else keys[:, None, None, :]
        query = torch.arange(start, end, device=keys.device)[:, None]
        column = torch.arange(end, device=keys.device)[None, :]
        causal = column <= query  # [steps, end]
        allowed = causal[None] & keys[:, None, :]
        # A padding query sees only itself: a row of all-masked scores would turn into NaN.
        allowed |= (column == query)[None]
        return allowed[:, None]
