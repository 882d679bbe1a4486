"""What the generation features share: the stamp every OpenAI response and chunk repeats, and the one rule for
fields this server does not honour (``inference.schemas``: hints accepted, anything else that asks for something
refused with 400 ``unsupported`` naming the field)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import InvalidRequest
from inference.schemas import ACCEPTED_HINTS, NEUTRAL_VALUES, ChatMessage, OpenAIFields, SamplingFields


@dataclass(frozen=True)
class Stamp:
    """The response's id, when it was created and the model that answers, the same on each of its chunks."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, model: str) -> Stamp:
        return cls(id=f"{prefix}-{uuid.uuid4().hex}", created=int(time.time()), model=model)


def refuse_several_choices(body: OpenAIFields) -> None:
    if body.n != 1:
        raise InvalidRequest("only n=1 is supported", param="n", code="unsupported")


def _asks_for_something(name: str, value: Any) -> bool:
    return value is not None and not any(value == neutral for neutral in NEUTRAL_VALUES.get(name, ()))


def _refuse_extra(extra: Mapping[str, Any] | None, where: str, hints: frozenset[str] = frozenset()) -> None:
    for name, value in (extra or {}).items():
        if name not in hints and _asks_for_something(name, value):
            param = f"{where}.{name}" if where else name
            raise InvalidRequest(f"{param} is not supported by this server", param=param, code="unsupported")


def refuse_unsupported(body: SamplingFields, messages: Sequence[ChatMessage] = ()) -> None:
    """400 ``unsupported`` for the first field, on the body or in a message, that asks for what is not done here."""
    _refuse_extra(body.model_extra, "", ACCEPTED_HINTS)
    for i, message in enumerate(messages):
        _refuse_extra(message.model_extra, f"messages[{i}]")
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                _refuse_extra(part.model_extra, f"messages[{i}].content[{j}]")
