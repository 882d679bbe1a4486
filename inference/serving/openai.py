"""What the OpenAI features (chat, completions) share: the stamp every response and chunk repeats, and the refusal
of what this server does not do for either."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from core.errors import InvalidRequest
from inference.schemas import OpenAIFields


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
