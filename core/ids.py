"""Public ids, OpenAI-shaped (``file-<hex>``, ``ftjob-<hex>``, ...), over the UUID keys underneath: one place that
spells each prefix, makes an id and reads one back."""

from __future__ import annotations

import uuid
from enum import StrEnum


class Prefix(StrEnum):
    FILE = "file-"
    JOB = "ftjob-"
    CHECKPOINT = "ftckpt-"
    EVENT = "ftevent-"  # over the event's sequence number, not a UUID
    DEPLOYMENT = "deploy-"


def public_id(prefix: Prefix, key: uuid.UUID) -> str:
    return f"{prefix}{key.hex}"


def parse_public_id(text: object, prefix: Prefix) -> uuid.UUID | None:
    """``<prefix><32 hex>`` -> the UUID; None for anything else (callers answer as for an unknown id, and a
    worker drops a malformed message instead of retrying it)."""
    if not isinstance(text, str) or not text.startswith(prefix):
        return None
    try:
        return uuid.UUID(hex=text[len(prefix) :])
    except ValueError:
        return None


def event_id(seq: int) -> str:
    return f"{Prefix.EVENT}{seq}"


MAX_EVENT_DIGITS = 18  # fits a BIGINT: a longer number can name no event


def parse_event_id(text: object) -> int | None:
    """``ftevent-<seq>`` -> the sequence number, ASCII digits only (``str.isdigit`` also accepts ``²``)."""
    if not isinstance(text, str) or not text.startswith(Prefix.EVENT):
        return None
    digits = text[len(Prefix.EVENT) :]
    if not digits or len(digits) > MAX_EVENT_DIGITS or not (digits.isascii() and digits.isdigit()):
        return None
    return int(digits)
