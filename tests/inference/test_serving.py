"""The stream chunks the serving layer sends carry only what they say, as OpenAI's do: a delta only what changed,
the usage only on the chunk that reports it (clients such as the openai SDK read the absent keys as None)."""

from __future__ import annotations

import json
from typing import Any

from inference.schemas import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    CompletionChunk,
    CompletionChunkChoice,
    FinishReason,
    GenerateChunk,
    Usage,
)

USAGE = Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)


def _chat(delta: ChatDelta, finish_reason: FinishReason | None = None, usage: Usage | None = None) -> dict[str, Any]:
    choices = [] if usage else [ChatChunkChoice(delta=delta, finish_reason=finish_reason)]
    chunk = ChatCompletionChunk(id="chatcmpl-1", created=1, model="m", choices=choices, usage=usage)
    loaded: dict[str, Any] = json.loads(chunk.model_dump_json())
    return loaded


def test_chat_chunks_carry_only_the_delta_and_the_usage_where_it_is_reported() -> None:
    first = _chat(ChatDelta(role="assistant", content=""))
    assert first["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    assert "usage" not in first and first["system_fingerprint"] is None
    assert _chat(ChatDelta(content="Hi"))["choices"][0]["delta"] == {"content": "Hi"}
    last = _chat(ChatDelta(), "stop")["choices"][0]
    assert last["delta"] == {} and last["finish_reason"] == "stop"
    usage = _chat(ChatDelta(), usage=USAGE)
    assert usage["choices"] == [] and usage["usage"] == USAGE.model_dump()


def test_completion_and_generate_chunks_leave_out_what_they_do_not_report() -> None:
    text = CompletionChunk(id="cmpl-1", created=1, model="m", choices=[CompletionChunkChoice(text="a")])
    assert json.loads(text.model_dump_json()) == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"text": "a", "index": 0, "logprobs": None, "finish_reason": None}],
        "system_fingerprint": None,
    }
    assert json.loads(GenerateChunk(text="a", model="m").model_dump_json()) == {"text": "a", "model": "m"}
    final = GenerateChunk(text="", model="m", finish_reason="length", usage=USAGE)
    assert json.loads(final.model_dump_json()) == {
        "text": "",
        "model": "m",
        "finish_reason": "length",
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
