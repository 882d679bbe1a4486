"""Conversations -> token ids with labels, the validation split, and length-grouped batches.

Labels come from the template's segments, never from token ids: the default model's pad token is its EOS token,
so masking "pad ids" would also hide the EOS that the model must learn to emit. Prompt segments get -100 unless
``train_on_prompt``; every assistant turn of a multi-turn conversation is trained.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from core.contracts import Hyperparameters
from core.control_tokens import ControlTokens
from core.templates import Segment, conversation_segments, resolve_template, template_text
from worker.pipeline.errors import PipelineError

IGNORE = -100
Conversation = list[dict[str, Any]]


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids; IGNORE where the token is not trained
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


@dataclass
class SplitStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0  # nothing left to train on after truncation
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0

    def add(self, example: Example) -> None:
        self.examples += 1
        self.truncated += int(example.truncated)
        self.tokens += len(example)
        self.trained_tokens += example.trained_tokens
        self.longest = max(self.longest, len(example))

    def to_json(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "longest": self.longest,
            "mean_length": round(self.tokens / self.examples, 1) if self.examples else 0,
        }


@dataclass
class PreparedData:
    template: str  # resolved name: "auto" (the model's own) or a named template
    train: list[Example]
    eval: list[Example]
    train_stats: SplitStats
    eval_stats: SplitStats
    sample_segments: list[Segment] = field(default_factory=list)
    eval_conversations: list[Conversation] = field(default_factory=list)  # the golden prompts come from these


# ------------------------------------------------------------------------------------------------ tokenizing


def _encode_many(control: ControlTokens, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    # One batched call for the texts without a control token in message text: fast tokenizers encode in parallel
    # in Rust. Special tokens come from the template text only.
    return control.encode_many(texts)


def tokenize_conversations(
    tokenizer: Any,
    conversations: Sequence[Conversation],
    template: str,
    *,
    cutoff_len: int,
    train_on_prompt: bool,
) -> tuple[list[Example], SplitStats]:
    """Tokenize every conversation segment by segment so each token knows whether it is trained.

    Dataset text is text, as at serving: a control token inside a message (``<|im_end|>`` in an answer) is
    trained as those characters, never as a turn boundary (``core.control_tokens``)."""
    stats = SplitStats()
    control = ControlTokens(tokenizer, template_text(template, tokenizer))
    all_segments = [conversation_segments(tokenizer, control.mark(conv), template) for conv in conversations]
    flat = [segment.text for segments in all_segments for segment in segments]
    ids_flat = iter(_encode_many(control, flat))
    examples: list[Example] = []
    for segments in all_segments:
        input_ids: list[int] = []
        labels: list[int] = []
        for segment in segments:
            ids = next(ids_flat)
            input_ids += ids
            labels += ids if (segment.trainable or train_on_prompt) else [IGNORE] * len(ids)
        truncated = len(input_ids) > cutoff_len
        example = Example(input_ids[:cutoff_len], labels[:cutoff_len], truncated)
        # The first label is never a target (nothing predicts the first token), so it does not count.
        if not any(label != IGNORE for label in example.labels[1:]):
            stats.dropped += 1
            stats.truncated += int(truncated)
            continue
        examples.append(example)
        stats.add(example)
    return examples, stats


def split_validation(
    conversations: list[Conversation], val_size: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """Hold out ``val_size`` (a fraction below 1, or a count) of the conversations, chosen by the seed."""
    if val_size <= 0:
        return conversations, []
    n = len(conversations)
    count = max(1, round(n * val_size)) if val_size < 1 else int(val_size)
    if count >= n:
        raise PipelineError(
            "invalid_val_size",
            f"val_size {val_size:g} leaves no training examples out of {n}",
            "val_size",
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    train = [c for i, c in enumerate(conversations) if i not in held]
    evaluation = [c for i, c in enumerate(conversations) if i in held]
    return train, evaluation


def prepare_data(
    tokenizer: Any,
    train_conversations: list[Conversation],
    validation_conversations: list[Conversation] | None,
    hp: Hyperparameters,
    seed: int,
) -> PreparedData:
    """The training and evaluation examples for a job, with the counts the pre-flight report shows."""
    template = resolve_template(hp.template, tokenizer)
    conversations = train_conversations[: hp.max_samples] if hp.max_samples else list(train_conversations)
    if validation_conversations:
        eval_conversations = list(validation_conversations)
    else:
        conversations, eval_conversations = split_validation(conversations, hp.val_size, seed)
    try:
        train, train_stats = tokenize_conversations(
            tokenizer, conversations, template, cutoff_len=hp.cutoff_len, train_on_prompt=hp.train_on_prompt
        )
        evaluation, eval_stats = tokenize_conversations(
            tokenizer, eval_conversations, template, cutoff_len=hp.cutoff_len, train_on_prompt=hp.train_on_prompt
        )
    except ValueError as exc:  # a chat template that cannot render these conversations
        raise PipelineError("invalid_template", str(exc), "template") from exc
    if not train:
        raise PipelineError(
            "no_trainable_examples",
            f"no training example keeps a trained token within cutoff_len={hp.cutoff_len}",
            "cutoff_len",
        )
    sample = conversation_segments(tokenizer, conversations[0], template) if conversations else []
    return PreparedData(template, train, evaluation, train_stats, eval_stats, sample, list(eval_conversations))


def render_with_mask(segments: Sequence[Segment], train_on_prompt: bool) -> str:
    """One example as the model sees it, masked (prompt) text inside ⟪ ⟫."""
    return "".join(s.text if (s.trainable or train_on_prompt) else f"⟪{s.text}⟫" for s in segments if s.text)


# ------------------------------------------------------------------------------------------------ batching


def epoch_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, *, group_by_length: bool = True
) -> list[list[int]]:
    """The batches of one epoch, as example indices; the same for a given seed and epoch in every process.

    Without grouping this is a plain shuffle. Grouping by length sorts windows of many batches by length before
    cutting them, then shuffles the batch order: little padding, but batches of look-alike examples, which
    measured here as a worse final loss; packing (``pack_batch``) removes the padding without that cost.
    """
    generator = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    generator.shuffle(order)
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * 64
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    generator.shuffle(batches)
    return batches


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None  # None when nothing is padded (the fast causal path)
    position_ids: torch.Tensor | None  # set for packed rows: positions restart at 0 for every example
    targets: torch.Tensor  # the label of the next token at each position, IGNORE where untrained or padded
    tokens: int  # non-pad tokens
    target_count: int

    def to(self, device: torch.device) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.to(device) if t is not None else None

        return Batch(
            self.input_ids.to(device),
            move(self.attention_mask),
            move(self.position_ids),
            self.targets.to(device),
            self.tokens,
            self.target_count,
        )


def _shifted(example: Example) -> list[int]:
    """Position t is trained to predict token t+1; the last position of an example predicts nothing."""
    return [*example.labels[1:], IGNORE]


def pad_batch(examples: Sequence[Example], pad_id: int) -> Batch:
    """One row per example, right-padded to the longest."""
    longest = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        targets[row, :n] = torch.tensor(_shifted(example))
        mask[row, :n] = 1
    tokens = int(mask.sum())
    padded = tokens != mask.numel()
    return Batch(input_ids, mask if padded else None, None, targets, tokens, int((targets != IGNORE).sum()))


def pack_batch(examples: Sequence[Example]) -> Batch:
    """All examples in one row, no padding. Position ids restart at 0 for each example, from which the model
    builds a block-diagonal causal mask: no token attends to another example, and no target crosses one."""
    input_ids = torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.long).unsqueeze(0)
    positions = torch.tensor([p for e in examples for p in range(len(e))], dtype=torch.long).unsqueeze(0)
    targets = torch.tensor([t for e in examples for t in _shifted(e)], dtype=torch.long).unsqueeze(0)
    return Batch(input_ids, None, positions, targets, int(input_ids.numel()), int((targets != IGNORE).sum()))


def packing_pays(lengths: Sequence[int], attention_ratio: float, *, per_example: bool = False) -> bool:
    """Whether one packed row costs less than padded rows.

    Cost ~ tokens x (1 + context / ratio): the linear layers scale with tokens, attention with tokens x context,
    and ``attention_ratio`` is how long a context must be before attention costs as much as the linear layers.
    With attention over the whole row (a block-diagonal mask) every token's context is the row: packing saves the
    padding but lengthens the context, so it wins for short examples and loses for long ones. With attention per
    example (``per_example``, ``worker.pipeline.attention``) each token's context is its own example, so a packed
    row costs the sum over its examples and never more than padded rows.
    """
    total, longest = sum(lengths), max(lengths)
    if per_example:
        packed = sum(n * (1 + n / attention_ratio) for n in lengths)
    else:
        packed = total * (1 + total / attention_ratio)
    padded = len(lengths) * longest * (1 + longest / attention_ratio)
    return len(lengths) > 1 and packed < padded


def collate(
    examples: Sequence[Example], pad_id: int, *, attention_ratio: float | None = None, per_example: bool = False
) -> Batch:
    """Pack when the model supports it (``attention_ratio`` given) and it is cheaper; pad otherwise.

    ``per_example``: the model attends within each example of a packed row, not over the whole row."""
    lengths = [len(e) for e in examples]
    if attention_ratio is not None and packing_pays(lengths, attention_ratio, per_example=per_example):
        return pack_batch(examples)
    return pad_batch(examples, pad_id)


def steps_per_epoch(num_examples: int, batch_size: int, accumulation: int) -> int:
    return math.ceil(math.ceil(num_examples / batch_size) / accumulation)
