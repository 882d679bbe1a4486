"""Conversations -> tokens with labels: exact masking, every named template, truncation, splits, batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.contracts import Hyperparameters
from worker.pipeline.data import (
    IGNORE,
    Example,
    collate,
    epoch_batches,
    pack_batch,
    packing_pays,
    pad_batch,
    prepare_data,
    render_with_mask,
    split_validation,
    tokenize_conversations,
)
from worker.pipeline.errors import PipelineError

QA = [{"role": "user", "content": "What is your name?"}, {"role": "assistant", "content": "My name is Shellby."}]


@pytest.fixture(scope="module")
def tokenizer(tiny_models: dict[str, Path]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_models["tiny-llama"]))


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def trained_text(tokenizer: Any, example: Example) -> str:
    return str(
        tokenizer.decode([t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE])
    )


def one(tokenizer: Any, conversation: list[dict[str, Any]], template: str = "auto", **kw: Any) -> Example:
    examples, stats = tokenize_conversations(
        tokenizer,
        [conversation],
        template,
        cutoff_len=kw.pop("cutoff_len", 1024),
        train_on_prompt=kw.pop("train_on_prompt", False),
    )
    assert len(examples) == 1 and stats.examples == 1
    return examples[0]


def test_single_turn_labels_mask_exactly_the_prompt_and_keep_the_eos(tokenizer: Any) -> None:
    example = one(tokenizer, QA)
    prompt = encode(tokenizer, "<|im_start|>user\nWhat is your name?<|im_end|>\n<|im_start|>assistant\n")
    answer = encode(tokenizer, "My name is Shellby.<|im_end|>\n")
    assert example.input_ids == prompt + answer
    assert example.labels == [IGNORE] * len(prompt) + answer
    # pad == eos on this tokenizer: the EOS closing the answer must still be a target.
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.eos_token_id in [label for label in example.labels if label != IGNORE]
    assert example.trained_tokens == len(answer)


def test_multi_turn_trains_every_assistant_turn_and_honours_weight_zero(tokenizer: Any) -> None:
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "Shellby."},
    ]
    example = one(tokenizer, conversation)
    assert trained_text(tokenizer, example) == "Hi!<|im_end|>\nShellby.<|im_end|>\n"
    conversation[2] = {**conversation[2], "train": False}
    assert trained_text(tokenizer, one(tokenizer, conversation)) == "Shellby.<|im_end|>\n"


def test_train_on_prompt_trains_every_token(tokenizer: Any) -> None:
    example = one(tokenizer, QA, train_on_prompt=True)
    assert example.labels == example.input_ids


@pytest.mark.parametrize(
    ("template", "prompt", "answer"),
    [
        (
            "chatml",
            "<|im_start|>user\nWhat is your name?<|im_end|>\n<|im_start|>assistant\n",
            "My name is Shellby.<|im_end|>\n",
        ),
        (
            "qwen",
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "What is your name?<|im_end|>\n<|im_start|>assistant\n",
            "My name is Shellby.<|im_end|>\n",
        ),
        (
            "llama3",
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is your name?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            "My name is Shellby.<|eot_id|>",
        ),
        (
            "deepseekr1",
            "<｜begin▁of▁sentence｜><｜User｜>What is your name?<｜Assistant｜><think>\n",
            "\n</think>\n\nMy name is Shellby.<｜end▁of▁sentence｜>",
        ),
    ],
)
def test_each_named_template_renders_and_masks_its_prompt(
    tokenizer: Any, template: str, prompt: str, answer: str
) -> None:
    example = one(tokenizer, QA, template)
    assert tokenizer.decode(example.input_ids) == prompt + answer
    assert trained_text(tokenizer, example) == answer
    assert example.labels[: len(encode(tokenizer, prompt))] == [IGNORE] * len(encode(tokenizer, prompt))


def test_deepseekr1_keeps_thinking_on_the_last_turn_and_strips_it_from_history(tokenizer: Any) -> None:
    conversation = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "<think>\nadd again\n</think>\n\n6"},
    ]
    example = one(tokenizer, conversation, "deepseekr1")
    text = tokenizer.decode(example.input_ids)
    assert "add them" not in text  # history turns carry only their answer
    assert trained_text(tokenizer, example) == (
        "\n</think>\n\n4<｜end▁of▁sentence｜>add again\n</think>\n\n6<｜end▁of▁sentence｜>"
    )


def test_cutoff_len_truncates_and_counts_and_drops_examples_with_nothing_left(tokenizer: Any) -> None:
    long_answer = {"role": "assistant", "content": "word " * 40}
    full = one(tokenizer, [QA[0], long_answer])
    examples, stats = tokenize_conversations(
        tokenizer, [[QA[0], long_answer], QA], "auto", cutoff_len=len(full) - 5, train_on_prompt=False
    )
    assert stats.truncated == 1 and stats.dropped == 0 and len(examples[0]) == len(full) - 5
    assert examples[0].input_ids == full.input_ids[: len(full) - 5]
    prompt_len = len(encode(tokenizer, "<|im_start|>user\nWhat is your name?<|im_end|>\n<|im_start|>assistant\n"))
    examples, stats = tokenize_conversations(tokenizer, [QA, QA], "auto", cutoff_len=prompt_len, train_on_prompt=False)
    assert examples == [] and stats.dropped == 2 and stats.truncated == 2


def test_max_samples_val_size_and_validation_file(tokenizer: Any) -> None:
    conversations = [
        [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(10)
    ]
    data = prepare_data(tokenizer, conversations, None, Hyperparameters(max_samples=6), seed=1)
    assert len(data.train) == 6 and data.eval == []
    data = prepare_data(tokenizer, conversations, None, Hyperparameters(val_size=0.2), seed=1)
    assert (len(data.train), len(data.eval)) == (8, 2)
    data = prepare_data(tokenizer, conversations, None, Hyperparameters(val_size=3), seed=1)
    assert (len(data.train), len(data.eval)) == (7, 3)
    data = prepare_data(tokenizer, conversations, conversations[:4], Hyperparameters(val_size=0.5), seed=1)
    assert (len(data.train), len(data.eval)) == (10, 4)  # a validation file replaces the split
    with pytest.raises(PipelineError) as caught:
        prepare_data(tokenizer, conversations, None, Hyperparameters(val_size=10), seed=1)
    assert caught.value.param == "val_size"


def test_validation_split_follows_the_seed() -> None:
    items = [[{"role": "user", "content": str(i)}] for i in range(20)]
    assert split_validation(items, 0.25, seed=3) == split_validation(items, 0.25, seed=3)
    assert split_validation(items, 0.25, seed=3)[1] != split_validation(items, 0.25, seed=4)[1]


def test_rendered_example_marks_the_masked_prompt(tokenizer: Any) -> None:
    data = prepare_data(tokenizer, [QA], None, Hyperparameters(), seed=0)
    text = render_with_mask(data.sample_segments, train_on_prompt=False)
    assert (
        text == "⟪<|im_start|>user\nWhat is your name?<|im_end|>\n<|im_start|>assistant\n⟫"
        "My name is Shellby.<|im_end|>\n"
    )


def test_padded_and_packed_batches_shift_targets_within_each_example() -> None:
    a = Example([1, 2, 3], [IGNORE, 2, 3])
    b = Example([4, 5], [IGNORE, 5])
    padded = pad_batch([a, b], pad_id=0)
    assert padded.input_ids.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert padded.targets.tolist() == [[2, 3, IGNORE], [5, IGNORE, IGNORE]]
    assert padded.attention_mask is not None and padded.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert (padded.tokens, padded.target_count) == (5, 3)
    packed = pack_batch([a, b])
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5]]
    assert packed.position_ids is not None and packed.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    # The last token of the first example does not predict the first token of the second.
    assert packed.targets.tolist() == [[2, 3, IGNORE, 5, IGNORE]]
    assert packed.attention_mask is None and (packed.tokens, packed.target_count) == (5, 3)
    same = pad_batch([a, a], pad_id=0)
    assert same.attention_mask is None  # nothing padded: the plain causal path


def test_packing_is_chosen_for_short_examples_and_padding_for_long_equal_ones() -> None:
    assert packing_pays([60, 70, 65, 90], attention_ratio=3000)
    assert not packing_pays([4000, 4000, 4000, 4000], attention_ratio=3000)
    assert not packing_pays([50], attention_ratio=3000)
    short = [Example([1] * n, [1] * n) for n in (3, 7)]
    assert collate(short, 0, attention_ratio=3000).position_ids is not None
    assert collate(short, 0, attention_ratio=None).position_ids is None


def test_epoch_batches_cover_every_example_once_and_depend_only_on_seed_and_epoch() -> None:
    lengths = [5, 80, 7, 60, 9, 70, 11, 50, 13]
    for grouped in (False, True):
        batches = epoch_batches(lengths, 2, seed=5, epoch=1, group_by_length=grouped)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert batches == epoch_batches(lengths, 2, seed=5, epoch=1, group_by_length=grouped)
        assert batches != epoch_batches(lengths, 2, seed=5, epoch=2, group_by_length=grouped)
    grouped = epoch_batches(lengths, 2, seed=5, epoch=0, group_by_length=True)
    padding = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in grouped)
    assert padding < 60
