"""Attention inside a packed row, computed per example instead of over the whole row.

A packed row (``data.pack_batch``) holds a batch's examples end to end, with position ids restarting at each one.
With transformers' ``sdpa`` the model turns those position ids into a block-diagonal causal mask over the whole
row: the kernel then computes every query against every key of the row, ``row_len ** 2``, and a masked kernel is
slower per element than a causal one. The examples need only ``sum(len_i ** 2)``.

``packed_sdpa`` is a transformers attention function that splits the row where the position ids stop counting up
by one (the same rule as transformers' own packed-sequence detection), and runs torch's causal
``scaled_dot_product_attention`` on each example; examples of equal length go through in one call. Anything else
(padded batches, generation with a cache, a single sequence, a sliding window shorter than an example, logit
softcapping, attention sinks) goes to transformers' ``sdpa`` with the mask transformers builds for it. On CPU,
bf16 or fp16 attention over more than one query is computed in fp32 either way (``_CPU_FP32``), so a packed row
and padded rows give the same figures. ``use_packed_attention`` switches a model to it only where the model runs
``sdpa``; the caller checks a packed row against padded rows (``train.packing_supported``) and switches back
otherwise.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("conch.worker.attention")

NAME = "conch_packed_sdpa"
BASE = "sdpa"
# Keyword arguments some architectures pass to their attention function that per-example causal SDPA cannot honour.
_UNSUPPORTED = ("softcap", "s_aux", "sinks", "position_bias", "output_attentions")
# torch's CPU flash-attention kernel runs bf16 slower than fp32: forward and backward of four causal examples of
# 58-75 tokens (9 query heads, 3 key/value heads, head size 64) took 5.4 ms in bf16 against 2.1-2.5 ms with the
# inputs cast to fp32 and the output cast back (2-core AMD EPYC, torch 2.13); the casts are included. The Intel Xeon
# with AMX agrees: over 24 training steps of the default model, 407.8 non-pad tokens/s with the fp32 kernel against
# 331.2 with the bf16 one (bench/train_bench.py --ab-steps 24).
_CPU_FP32 = True


def segments(position_ids: torch.Tensor | None, length: int) -> list[tuple[int, int]] | None:
    """``(start, end)`` of each example of a packed row, or None when the row is not one packed row of several.

    A new example starts wherever a position id is not its predecessor plus one, as transformers decides it when it
    builds the block-diagonal mask (``masking_utils.find_packed_sequence_indices``)."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape != (1, length) or length < 2:
        return None
    row = position_ids[0]
    starts = [0, *((torch.nonzero(row[1:] - row[:-1] != 1).flatten() + 1).tolist())]
    if len(starts) < 2:
        return None
    return list(zip(starts, [*starts[1:], length], strict=True))


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query ``(1, heads, L, d)``, key/value ``(1, kv_heads, L, d)``;
    returns ``(1, L, heads, d)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length = query.shape[2]
    device = query.device.type
    # The dtype SDPA would compute in: autocast's (rotary embeddings can leave query and key in fp32 beside a
    # bf16 value), else the inputs'. On CPU a half-precision one is computed in fp32 (the faster kernel there,
    # _CPU_FP32) for every multi-token query, packed or padded alike, so both give the same figures.
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    upcast = _CPU_FP32 and device == "cpu" and dtype in (torch.bfloat16, torch.float16) and length > 1
    compute = torch.float32 if upcast else dtype
    spans = None
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if (
        causal
        and query.shape[0] == 1
        and key.shape[2] == length
        and all(kwargs.get(name) is None or kwargs.get(name) is False for name in _UNSUPPORTED)
        and key.shape[-1] == value.shape[-1]
    ):
        spans = segments(kwargs.get("position_ids"), length)
        window = kwargs.get("sliding_window")
        if spans is not None and window is not None and max(end - start for start, end in spans) > int(window):
            spans = None
    if spans is None:
        if not upcast:
            return sdpa_attention_forward(
                module,
                query,
                key,
                value,
                attention_mask,
                dropout=dropout,
                scaling=scaling,
                is_causal=is_causal,
                **kwargs,
            )
        with torch.autocast(device, enabled=False):  # autocast would cast fp32 inputs back down
            out, _ = sdpa_attention_forward(
                module,
                query.to(compute),
                key.to(compute),
                value.to(compute),
                attention_mask,
                dropout=dropout,
                scaling=scaling,
                is_causal=is_causal,
                **kwargs,
            )
        return out.to(dtype), None
    gqa = query.shape[1] != key.shape[1]
    by_length: dict[int, list[int]] = {}
    for index, (start, end) in enumerate(spans):
        by_length.setdefault(end - start, []).append(index)
    pieces: list[torch.Tensor | None] = [None] * len(spans)
    for group in by_length.values():
        ranges = [spans[i] for i in group]
        if len(group) == 1:
            ((start, end),) = ranges
            q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        else:  # equal lengths: one call with the examples as the batch
            q = torch.cat([query[:, :, s:e] for s, e in ranges])
            k = torch.cat([key[:, :, s:e] for s, e in ranges])
            v = torch.cat([value[:, :, s:e] for s, e in ranges])
        q, k, v = q.to(compute), k.to(compute), v.to(compute)
        with torch.autocast(device, enabled=False):
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa
            ).to(dtype)  # (n, heads, len, d)
        for row, index in enumerate(group):
            pieces[index] = out[row : row + 1]
    joined = torch.cat([p for p in pieces if p is not None], dim=2)
    return joined.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``NAME`` known to transformers: the attention function, and ``sdpa``'s mask builder for its fallbacks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, packed_sdpa)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS[BASE])


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attention_implementation(model: Any) -> str | None:
    return getattr(_base(model).config, "_attn_implementation", None)


def set_attention(model: Any, name: str) -> bool:
    """Switch the model (and its sub-models) to attention ``name``; False where it refuses."""
    base = _base(model)
    try:
        base.set_attn_implementation(name)
    except Exception as exc:  # an architecture that cannot switch attention after loading
        log.info("attention.switch_refused", extra={"error": str(exc)[:200]})
        return False
    return attention_implementation(base) == name


def use_packed_attention(model: Any) -> bool:
    """Switch a model that runs ``sdpa`` to per-example attention in packed rows; False (unchanged) otherwise."""
    if attention_implementation(model) != BASE:
        return False
    register()
    if set_attention(model, NAME):
        return True
    set_attention(model, BASE)
    return False
