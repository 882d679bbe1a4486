"""The model's own transformers forward behind the engine's cache interface.

Used for architectures the lean decoder does not cover (or when ``INFERENCE_BACKEND=reference``): slower, since
its cache grows by concatenation and every step pays the library's per-call overhead, but it runs any causal LM.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from inference.engine.cache import KVCache


class ReferenceDecoder:
    def __init__(self, model: Any) -> None:
        config = model.config
        self.model = model
        self.dtype: torch.dtype = next(model.parameters()).dtype
        self.device: torch.device = next(model.parameters()).device
        self.vocab_size = int(config.vocab_size)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.layers_count = int(text_config.num_hidden_layers)
        heads = int(text_config.num_attention_heads)
        self.kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
        self.head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // heads)

    @property
    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def cache_bytes(self, rows: int, tokens_per_row: int) -> int:
        # The engine's cache grows with the batch's longest row; at most every row holds a full context.
        per_token = 2 * self.layers_count * self.kv_heads * self.head_dim
        return rows * tokens_per_row * per_token * torch.finfo(self.dtype).bits // 8

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache.empty(
            self.layers_count, batch, self.kv_heads, self.head_dim, capacity, dtype=self.dtype, device=self.device
        )

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, new_mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
        steps = input_ids.shape[1]
        cache.reserve(steps)
        start = cache.length
        end = start + steps
        cache.mask[:, start:end] = new_mask
        positions = (cache.positions[:, None] + new_mask.long().cumsum(1) - 1).clamp_min(0)
        cache.positions += new_mask.long().sum(1)

        library_cache = DynamicCache(config=self.model.config)
        if start:
            for index in range(self.layers_count):
                library_cache.update(cache.keys[index][:, :, :start], cache.values[index][:, :, :start], index)
        output = self.model(
            input_ids=input_ids,
            attention_mask=cache.mask[:, :end].long(),
            position_ids=positions,
            cache=library_cache,
            use_cache=True,
            logits_to_keep=1,
        )
        for index, layer in enumerate(library_cache.layers):
            keys: torch.Tensor = getattr(layer, "keys")  # noqa: B009 - attention layers of a DynamicCache
            values: torch.Tensor = getattr(layer, "values")  # noqa: B009
            cache.keys[index][:, :, start:end] = keys[:, :, start:end]
            cache.values[index][:, :, start:end] = values[:, :, start:end]
        cache.length = end
        return output.logits[:, -1].float()
