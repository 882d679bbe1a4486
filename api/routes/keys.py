"""Key management for an admin key: list keys, create one (its plaintext is in that answer only) and revoke one.

The same operations without the api are ``conch keys list|create|revoke``. A listing never shows a key's hash or
plaintext, only its visible prefix, so it can be read out loud.
"""

from __future__ import annotations

import uuid
from typing import Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from api.deps import AdminDep, SessionDep
from api.schemas import ERROR_RESPONSES
from api.services.common import unix, unix_required
from core.api_keys import TENANT_PATTERN, issue_api_key, list_api_keys, revoke_key
from core.errors import NotFound
from core.orm import ApiKey

router = APIRouter(tags=["keys"], responses={**ERROR_RESPONSES, 403: {"description": "Not an admin key"}})


class KeyOut(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    tenant: str
    name: str
    prefix: str = Field(description="the key's first characters, enough to recognise it and never to use it")
    admin: bool
    created_at: int
    last_used_at: int | None = Field(description="last request with the key, to about a minute")
    revoked_at: int | None


class KeyCreated(KeyOut):
    key: str = Field(description="the key itself: shown in this answer only, stored only as a hash")


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyOut]


class KeyCreate(BaseModel):
    tenant: str = Field(pattern=TENANT_PATTERN, description="1-64 letters, digits, '_', '-' or '.'")
    name: str = Field(default="default", min_length=1, max_length=128)
    admin: bool = Field(default=False, description="may manage keys and read /metrics and the probes' details")


def _out(key: ApiKey) -> KeyOut:
    return KeyOut(
        id=str(key.id),
        tenant=key.tenant_id,
        name=key.name,
        prefix=key.prefix,
        admin=key.is_admin,
        created_at=unix_required(key.created_at),
        last_used_at=unix(key.last_used_at),
        revoked_at=unix(key.revoked_at),
    )


@router.get("/v1/keys", response_model=KeyList, summary="List API keys (admin)")
def list_keys(
    session: SessionDep,
    _admin: AdminDep,
    tenant: str | None = Query(None, max_length=64, description="only this tenant's keys"),
    include_revoked: bool = Query(False, description="also list revoked keys"),
) -> KeyList:
    keys = list_api_keys(session, tenant_id=tenant, include_revoked=include_revoked)
    return KeyList(data=[_out(key) for key in keys])


@router.post("/v1/keys", response_model=KeyCreated, status_code=201, summary="Create an API key (admin)")
def create_key(body: KeyCreate, session: SessionDep, _admin: AdminDep) -> KeyCreated:
    key, plaintext = issue_api_key(session, body.tenant, body.name, admin=body.admin)
    return KeyCreated(**_out(key).model_dump(), key=plaintext)


@router.delete("/v1/keys/{key_id}", response_model=KeyOut, summary="Revoke an API key (admin)")
def revoke(key_id: str, session: SessionDep, _admin: AdminDep) -> KeyOut:
    """Revoking is final and repeatable: a revoked key answers with its first revocation time. The inference
    service caches keys for a few seconds, so a revoked key stops working there within that time."""
    try:
        key = session.get(ApiKey, uuid.UUID(key_id))
    except ValueError:
        key = None
    if key is None:
        raise NotFound(f"No API key {key_id!r}.", param="key_id")
    return _out(revoke_key(session, key))
