"""Small shared pieces: OpenAI-style public ids, unix timestamps and cursor pages."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Select, tuple_
from sqlalchemy.orm import InstrumentedAttribute, Session

from core.errors import InvalidRequest
from core.jobs import as_utc

T = TypeVar("T")


def unix(moment: datetime | None) -> int | None:
    return int(as_utc(moment).timestamp()) if moment is not None else None


def unix_required(moment: datetime) -> int:
    return int(as_utc(moment).timestamp())


def cursor_page(
    session: Session,
    stmt: Select[T],
    *,
    keys: Sequence[InstrumentedAttribute[Any]],
    after: tuple[Any, ...] | None,
    limit: int,
    descending: bool = True,
) -> tuple[list[T], bool]:
    """One page ordered by ``keys`` (unique together), starting after the row whose key values are ``after``.

    Fetches one extra row to know whether another page follows, so ``has_more`` costs no count query.
    """
    if after is not None:
        position = tuple_(*keys)
        stmt = stmt.where(position < tuple_(*after) if descending else position > tuple_(*after))
    stmt = stmt.order_by(*[k.desc() if descending else k.asc() for k in keys]).limit(limit + 1)
    rows = list(session.scalars(stmt))
    return rows[:limit], len(rows) > limit


def unknown_cursor(after: str) -> InvalidRequest:
    return InvalidRequest(f"'after' names no object of this list: {after}", param="after", code="invalid_cursor")
