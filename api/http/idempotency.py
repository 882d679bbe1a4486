"""``Idempotency-Key``: a retried POST gets the first answer back instead of creating a second object.

The record is written in the same transaction as the object it describes, so either both exist or neither. A key
reused with a different body is refused (422); a key whose first request is still in flight meets the unique
constraint and gets 409, and the client's retry then replays the committed answer.

A key is remembered for IDEMPOTENCY_TTL_SECONDS (as long as clients are expected to retry): an older record is
treated as absent (and dropped, so the key can be used again); the janitor (``core.janitor``) sweeps the rest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, timedelta
from typing import Any, TypeVar

from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.errors import Conflict, ValidationFailed
from core.jobs import db_now
from core.orm import IdempotencyRecord
from core.settings import get_settings

ModelT = TypeVar("ModelT", bound=BaseModel)


@dataclass(frozen=True)
class Replay:
    status_code: int
    body: dict[str, Any]

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status_code, headers={"Idempotent-Replayed": "true"})


def request_hash(payload: Any) -> str:
    """Hash of the request as parsed (key order and whitespace do not matter)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def expired(session: Session, record: IdempotencyRecord) -> bool:
    ttl = timedelta(seconds=get_settings().idempotency_ttl_seconds)
    created = record.created_at
    if created.tzinfo is None:  # SQLite hands timestamps back without their zone; they are stored in UTC
        created = created.replace(tzinfo=UTC)
    return created < db_now(session) - ttl


def find_replay(session: Session, *, tenant_id: str, key: str, route: str, req_hash: str) -> Replay | None:
    record = session.scalars(
        select(IdempotencyRecord).where(
            IdempotencyRecord.tenant_id == tenant_id,
            IdempotencyRecord.key == key,
            IdempotencyRecord.route == route,
        )
    ).first()
    if record is None:
        return None
    if expired(session, record):
        session.delete(record)
        session.flush()
        return None
    if record.request_hash != req_hash:
        raise ValidationFailed(
            "This Idempotency-Key was already used with a different request body.",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    return Replay(status_code=record.status_code, body=record.response)


def remember(
    session: Session,
    *,
    tenant_id: str,
    key: str,
    route: str,
    req_hash: str,
    body: dict[str, Any],
    status_code: int = 200,
) -> None:
    record = IdempotencyRecord(
        tenant_id=tenant_id, key=key, route=route, request_hash=req_hash, status_code=status_code, response=body
    )
    try:
        with session.begin_nested():
            session.add(record)
    except IntegrityError as exc:
        raise Conflict(
            "A request with this Idempotency-Key is already being processed; retry it shortly.",
            param="Idempotency-Key",
            code="idempotency_key_in_use",
        ) from exc


def respond_once(
    session: Session, *, tenant_id: str, key: str | None, route: str, req_hash: str, create: Callable[[], ModelT]
) -> ModelT | JSONResponse:
    """Run ``create`` and remember its answer under ``key``; a retry with the same key gets that answer back."""
    if key:
        replay = find_replay(session, tenant_id=tenant_id, key=key, route=route, req_hash=req_hash)
        if replay is not None:
            return replay.response()
    out = create()
    if key:
        remember(
            session, tenant_id=tenant_id, key=key, route=route, req_hash=req_hash, body=out.model_dump(mode="json")
        )
    return out
