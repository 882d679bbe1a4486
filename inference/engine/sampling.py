"""Choosing the next token of each row: greedy, or sampled with temperature/top-k/top-p, and a repetition penalty.

A batch mixes requests with different settings; greedy rows without a penalty (the common case) are handled with
one argmax for the whole batch, the rest row by row. Each sampled row draws from its own generator, so a request
with a ``seed`` gets the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Below this a temperature only overflows the logits; it is greedy in all but name.
MIN_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no limit
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def plain_greedy(self) -> bool:
        return self.greedy and not self.penalised


@dataclass
class RowSampler:
    """Per-sequence sampling state: its parameters, its generator, the ids it has seen and generated."""

    params: SamplingParams
    seen: list[int]
    generator: torch.Generator | None = field(default=None)
    counts: dict[int, int] = field(default_factory=dict)  # generated ids (presence/frequency penalties)

    @classmethod
    def create(cls, params: SamplingParams, prompt_ids: list[int]) -> RowSampler:
        generator = None
        if not params.greedy:
            generator = torch.Generator()
            if params.seed is not None:
                generator.manual_seed(params.seed)
            else:
                generator.seed()
        seen = list(prompt_ids) if params.repetition_penalty != 1.0 else []
        return cls(params=params, seen=seen, generator=generator)

    def observe(self, token: int) -> None:
        if self.params.repetition_penalty != 1.0:
            self.seen.append(token)
        if self.params.presence_penalty or self.params.frequency_penalty:
            self.counts[token] = self.counts.get(token, 0) + 1

    def choose(self, logits: torch.Tensor) -> int:
        """One row of fp32 logits -> the next token id. Never raises: extreme settings (a penalty or temperature
        near zero) overflow to inf/NaN, which are cleaned up here so one request cannot fail a shared batch."""
        params = self.params
        if params.repetition_penalty != 1.0 and self.seen:
            index = torch.tensor(sorted(set(self.seen)), dtype=torch.long, device=logits.device)
            picked = logits.index_select(0, index)
            # The usual CTRL-style penalty: shrink positive scores, push negative ones further down.
            picked = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
            logits = logits.index_copy(0, index, picked)
        if self.counts:
            # OpenAI's definition: subtract frequency * count, and presence once, for each token generated so far.
            index = torch.tensor(list(self.counts), dtype=torch.long, device=logits.device)
            counts = torch.tensor(list(self.counts.values()), dtype=logits.dtype, device=logits.device)
            penalty = counts * params.frequency_penalty + params.presence_penalty
            logits = logits.index_add(0, index, -penalty)
        logits = _finite(logits)
        if params.greedy:
            return int(torch.argmax(logits).item())
        scaled = _finite(logits / max(params.temperature, MIN_TEMPERATURE))
        if params.top_k > 0 and params.top_k < scaled.shape[-1]:
            threshold = torch.topk(scaled, params.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
        if params.top_p < 1.0:
            ordered, order = torch.sort(scaled, descending=True)
            probs = torch.softmax(ordered, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (always at least the most likely token).
            drop = probs.cumsum(-1) - probs >= params.top_p
            ordered = ordered.masked_fill(drop, float("-inf"))
            scaled = torch.full_like(scaled, float("-inf")).scatter(0, order, ordered)
        probs = torch.softmax(scaled, dim=-1)
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0.0:
            return int(torch.argmax(scaled).item())
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator).item())


def _finite(logits: torch.Tensor) -> torch.Tensor:
    top = torch.finfo(logits.dtype).max
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=top, neginf=float("-inf"))


def choose_tokens(logits: torch.Tensor, samplers: list[RowSampler]) -> list[int]:
    """Next token for every row of ``logits`` [batch, vocab]."""
    if all(s.params.plain_greedy for s in samplers):
        return [int(t) for t in torch.argmax(logits, dim=-1).tolist()]
    greedy = torch.argmax(logits, dim=-1).tolist()
    return [
        int(greedy[row]) if sampler.params.plain_greedy else sampler.choose(logits[row])
        for row, sampler in enumerate(samplers)
    ]
