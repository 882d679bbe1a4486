"""The size of a generation request, checked before a model is acquired or anything rendered: at most
MAX_CHAT_MESSAGES messages, each text (a message's content or name, a prompt) at most MAX_MESSAGE_CHARS characters.
The whole body is capped before it is parsed (``core.http.limits``); these name the field that is too large."""

from __future__ import annotations

from collections.abc import Sequence

from core.errors import InvalidRequest
from core.settings import Settings
from inference.schemas import ChatMessage


def check_text(text: str, param: str, settings: Settings) -> None:
    limit = settings.max_message_chars
    if len(text) > limit:
        raise InvalidRequest(
            f"{param} has {len(text)} characters; the limit is {limit}", param=param, code="string_too_long"
        )


def check_messages(messages: Sequence[ChatMessage], settings: Settings) -> None:
    if len(messages) > settings.max_chat_messages:
        raise InvalidRequest(
            f"messages holds {len(messages)} messages; the limit is {settings.max_chat_messages}",
            param="messages",
            code="too_many_messages",
        )
    for i, message in enumerate(messages):
        check_text(message.text, f"messages[{i}].content", settings)
        if message.name is not None:
            check_text(message.name, f"messages[{i}].name", settings)
