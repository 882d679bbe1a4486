"""The key/value cache of a running batch, owned by the engine so rows can join and leave between steps.

Every row shares one time axis. Rows are left-aligned to a common end: a row that joins with a shorter history
gets masked padding on the left, a row that joins with a longer one pushes everyone else right. Storage is
preallocated and grows by doubling, so a decode step writes one column instead of copying the whole cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Self

import torch

KV_CACHE_BYTES_LLAMACPP = 2  # llama.cpp keeps keys and values in f16 on every route (see llamacpp.py)


def kv_values_per_token(config: Any) -> int:
    """Keys plus values one token adds to the cache over every layer: what a model's KV cache costs per token, in
    values (times the element size for bytes). ``config`` is a transformers config or any object with its fields."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    return 2 * int(text.num_hidden_layers) * kv_heads * head_dim


class RowCache(Protocol):
    """What the engine needs of a batch's cache, whoever keeps the keys and values (this module or llama.cpp)."""

    length: int  # columns read so far: a pending prefill's progress

    def select(self, rows: list[int]) -> None: ...

    def extend(self, other: Self) -> None: ...

    def release(self) -> None: ...


@dataclass
class KVCache:
    keys: list[torch.Tensor]  # per layer: [batch, kv_heads, capacity, head_dim]
    values: list[torch.Tensor]
    mask: torch.Tensor  # [batch, capacity] bool: which columns hold real tokens
    positions: torch.Tensor  # [batch] long: real tokens per row, i.e. the position of the next token
    length: int  # columns in use

    @classmethod
    def empty(
        cls,
        layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVCache:
        shape = (batch, kv_heads, capacity, head_dim)
        return cls(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
            mask=torch.zeros((batch, capacity), dtype=torch.bool, device=device),
            positions=torch.zeros(batch, dtype=torch.long, device=device),
            length=0,
        )

    @property
    def batch(self) -> int:
        return int(self.mask.shape[0])

    @property
    def capacity(self) -> int:
        return int(self.mask.shape[1])

    def reserve(self, columns: int) -> None:
        """Make room for ``columns`` more tokens, doubling so growth costs amortised O(1) per token."""
        needed = self.length + columns
        if needed <= self.capacity:
            return
        new_capacity = max(needed, 2 * self.capacity, 16)
        self._resize(new_capacity, shift=0)

    def _resize(self, capacity: int, *, shift: int) -> None:
        """Copy into ``capacity`` columns, moving the used ones ``shift`` columns right (left padding)."""
        used = self.length

        def moved(old: torch.Tensor) -> torch.Tensor:
            new = old.new_zeros((*old.shape[:2], capacity, old.shape[3]))
            new[:, :, shift : shift + used] = old[:, :, :used]
            return new

        self.keys = [moved(k) for k in self.keys]
        self.values = [moved(v) for v in self.values]
        mask = self.mask.new_zeros((self.batch, capacity))
        mask[:, shift : shift + used] = self.mask[:, :used]
        self.mask = mask
        self.length = used + shift

    def select(self, rows: list[int]) -> None:
        """Keep only ``rows`` (finished or cancelled sequences leave), then drop columns no row uses any more."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.mask = self.mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        self._trim_left()

    def _trim_left(self) -> None:
        if self.batch == 0 or self.length == 0:
            return
        used = self.mask[:, : self.length].any(dim=0)
        first = int(torch.argmax(used.to(torch.int8)).item()) if bool(used.any()) else self.length
        if first == 0:
            return
        remaining = self.length - first
        self.keys = [k[:, :, first:].clone() for k in self.keys]
        self.values = [v[:, :, first:].clone() for v in self.values]
        self.mask = self.mask[:, first:].clone()
        self.length = remaining

    def release(self) -> None:
        """Nothing to hand back: the tensors go with the object."""

    def extend(self, other: KVCache) -> None:
        """Append the rows of ``other`` (freshly prefilled requests), aligning both to a common right edge."""
        if other.length > self.length:
            shift = other.length - self.length
            self._resize(max(self.capacity + shift, other.length), shift=shift)
        pad = self.length - other.length
        capacity = self.capacity

        def placed(src: torch.Tensor) -> torch.Tensor:
            out = src.new_zeros((src.shape[0], src.shape[1], capacity, src.shape[3]))
            out[:, :, pad : pad + other.length] = src[:, :, : other.length]
            return out

        self.keys = [torch.cat([k, placed(o)]) for k, o in zip(self.keys, other.keys, strict=True)]
        self.values = [torch.cat([v, placed(o)]) for v, o in zip(self.values, other.values, strict=True)]
        mask = other.mask.new_zeros((other.batch, capacity))
        mask[:, pad : pad + other.length] = other.mask[:, : other.length]
        self.mask = torch.cat([self.mask, mask])
        self.positions = torch.cat([self.positions, other.positions])
