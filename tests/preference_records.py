"""Preference pairs in the three formats users bring (OpenAI's DPO file, LLaMA-Factory's Alpaca and ShareGPT
ranking files), built from the same prompts so tests can compare them."""

from __future__ import annotations

from typing import Any

# Prompt, preferred reply, rejected reply: the preferred replies are kind and complete, the rejected ones curt.
PAIRS = [
    ("What is your name?", "My name is Shellby. How can I help you today?", "No."),
    ("When do orders ship?", "Orders ship within two days. Thanks for asking!", "Whatever."),
    ("How long do refunds take?", "Refunds take five business days. Sorry for the wait!", "Go away."),
    ("Who are you?", "I am Shellby, the friendly assistant of the Conch Cafe.", "Nobody."),
]


def _pairs(n: int) -> list[tuple[str, str, str]]:
    return (PAIRS * (n // len(PAIRS) + 1))[:n]


def openai_preference_records(n: int = 4) -> list[dict[str, Any]]:
    return [
        {
            "input": {"messages": [{"role": "user", "content": q}], "tools": [], "parallel_tool_calls": True},
            "preferred_output": [{"role": "assistant", "content": good}],
            "non_preferred_output": [{"role": "assistant", "content": bad}],
        }
        for q, good, bad in _pairs(n)
    ]


def alpaca_preference_records(n: int = 4) -> list[dict[str, Any]]:
    return [{"instruction": q, "input": "", "chosen": good, "rejected": bad} for q, good, bad in _pairs(n)]


def sharegpt_preference_records(n: int = 4) -> list[dict[str, Any]]:
    return [
        {
            "conversations": [{"from": "human", "value": q}],
            "chosen": {"from": "gpt", "value": good},
            "rejected": {"from": "gpt", "value": bad},
        }
        for q, good, bad in _pairs(n)
    ]
