"""Prompt rendering shared by training and serving."""

from __future__ import annotations

import pytest

from core.templates import conversation_segments, render_prompt, stop_strings, strip_thinking

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name?"},
    {"role": "assistant", "content": "Pearl."},
]


def _joined(segments) -> str:
    return "".join(s.text for s in segments)


def test_chatml_segments_mark_only_assistant_replies() -> None:
    segments = conversation_segments(None, CONVERSATION, "chatml")
    trained = [s.text for s in segments if s.trainable]
    assert trained == ["Hello!<|im_end|>\n", "Pearl.<|im_end|>\n"]
    assert _joined(segments).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")


def test_serving_prompt_is_the_training_prefix() -> None:
    """What the server sends the model equals the untrained prefix the model saw before its last answer."""
    for name in ("chatml", "llama3", "qwen", "deepseekr1"):
        segments = conversation_segments(None, CONVERSATION, name)
        prefix = _joined(segments[:-1])
        assert render_prompt(None, CONVERSATION[:-1], name) == prefix, name


def test_qwen_inserts_default_system_prompt() -> None:
    prompt = render_prompt(None, [{"role": "user", "content": "Hi"}], "qwen")
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")


def test_llama3_layout() -> None:
    prompt = render_prompt(None, [{"role": "user", "content": "Hi"}], "llama3")
    assert prompt == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert "<|eot_id|>" in stop_strings("llama3", None)


def test_deepseekr1_keeps_thinking_only_in_the_last_turn() -> None:
    conversation = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "<think>\nagain\n</think>\n\n6"},
    ]
    segments = conversation_segments(None, conversation, "deepseekr1")
    trained = [s.text for s in segments if s.trainable]
    assert "add them" not in _joined(segments)
    assert trained[0] == "\n</think>\n\n4<｜end▁of▁sentence｜>"
    assert trained[1] == "again\n</think>\n\n6<｜end▁of▁sentence｜>"
    assert render_prompt(None, conversation[:1], "deepseekr1").endswith("<｜Assistant｜><think>\n")
    assert strip_thinking("<think>x</think>\n\nanswer") == "answer"


def test_untrained_assistant_turns_are_masked() -> None:
    conversation = [dict(m) for m in CONVERSATION]
    conversation[2]["train"] = False
    trained = [s.text for s in conversation_segments(None, conversation, "chatml") if s.trainable]
    assert trained == ["Pearl.<|im_end|>\n"]


def test_unknown_template_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown template"):
        render_prompt(None, CONVERSATION, "vicuna")


def test_auto_uses_the_tokenizers_own_template(tiny_models) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["tiny-llama"])
    segments = conversation_segments(tokenizer, CONVERSATION, "auto")
    assert _joined(segments) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert [s.text for s in segments if s.trainable] == ["Hello!<|im_end|>\n", "Pearl.<|im_end|>\n"]
    assert render_prompt(tokenizer, CONVERSATION[:1] + CONVERSATION[1:2], "auto").endswith("<|im_start|>assistant\n")
