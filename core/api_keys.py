"""API keys: created once and shown once, stored only as a SHA-256 hash, each belonging to a tenant.

Domain code shared by the control plane (which creates, revokes and checks keys), the inference service (which
only checks them) and ``conch keys create``. No web framework here: the HTTP side (reading the ``Authorization``
header) is ``core.http.auth``.

A key is long and random, so a plain hash (no salt, no stretching) is enough to make a leaked table useless and
lets a request find its key with one indexed lookup.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from core.orm import DEFAULT_TENANT, ApiKey, utcnow

KEY_PREFIX = "conch-"
# Issued keys are 49 characters; anything far longer is refused before it is hashed or looked up.
MAX_KEY_LENGTH = 256
# Enough of the key to recognise it in a listing without being able to use it.
VISIBLE_PREFIX_LENGTH = 12
# ``last_used_at`` is written at most this often per key: one short UPDATE a minute, not one per request.
LAST_USED_RESOLUTION = timedelta(seconds=60)
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_TENANT_RE = re.compile(TENANT_PATTERN)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant every query is scoped to, and the key used (None when auth is off)."""

    tenant_id: str
    key_id: str | None = None
    key_prefix: str | None = None
    is_admin: bool = False

    @property
    def actor(self) -> str:
        return self.key_prefix or "api"


ANONYMOUS = Principal(tenant_id=DEFAULT_TENANT)


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def could_be_key(plaintext: str) -> bool:
    """Whether ``plaintext`` has the shape of an issued key; anything else is refused without a database query."""
    return plaintext.startswith(KEY_PREFIX) and len(plaintext) <= MAX_KEY_LENGTH


def create_api_key(session: Session, tenant_id: str, name: str = "default", *, admin: bool = False) -> str:
    """Store a new key for ``tenant_id`` and return its plaintext (the only time it exists outside the caller).
    ``admin``: the key may also manage keys and read the probes' details and ``/metrics``."""
    return issue_api_key(session, tenant_id, name, admin=admin)[1]


def issue_api_key(
    session: Session, tenant_id: str, name: str = "default", *, admin: bool = False
) -> tuple[ApiKey, str]:
    """``create_api_key``, also returning the stored row."""
    if not _TENANT_RE.match(tenant_id):
        raise ValueError("tenant id: 1-64 characters of letters, digits, '_', '-' or '.'")
    if not name or len(name) > 128:
        raise ValueError("key name: 1-128 characters")
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        tenant_id=tenant_id,
        name=name,
        prefix=plaintext[:VISIBLE_PREFIX_LENGTH],
        key_hash=hash_key(plaintext),
        is_admin=admin,
    )
    session.add(key)
    session.flush()
    return key, plaintext


def list_api_keys(session: Session, *, tenant_id: str | None = None, include_revoked: bool = False) -> Sequence[ApiKey]:
    """Keys, oldest first (what a listing may show: never a hash, never a plaintext)."""
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if tenant_id is not None:
        query = query.where(ApiKey.tenant_id == tenant_id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return session.scalars(query).all()


def find_api_key(session: Session, key_id_or_prefix: str) -> list[ApiKey]:
    """The keys an operator means by ``key_id_or_prefix``: the key with that id, else those with that prefix."""
    try:
        key_id = uuid.UUID(key_id_or_prefix)
    except ValueError:
        return list(session.scalars(select(ApiKey).where(ApiKey.prefix == key_id_or_prefix)).all())
    key = session.get(ApiKey, key_id)
    return [key] if key is not None else []


def revoke_key(session: Session, key: ApiKey) -> ApiKey:
    """Revoke ``key`` (a no-op for one already revoked: its first revocation time stays)."""
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


def revoke_api_key(session: Session, prefix: str) -> int:
    """Revoke every live key whose visible prefix is ``prefix``; returns how many were revoked."""
    keys = [revoke_key(session, key) for key in find_api_key(session, prefix) if key.revoked_at is None]
    return len(keys)


def record_use(session: Session, key_id: uuid.UUID) -> None:
    """Set the key's ``last_used_at`` to now unless it was set within ``LAST_USED_RESOLUTION``. The condition is in
    the UPDATE, so concurrent requests write it once; call it in a short transaction of its own, not a request's
    (the row stays locked until the transaction ends)."""
    now = utcnow()
    session.execute(
        update(ApiKey)
        .where(
            ApiKey.id == key_id,
            or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < now - LAST_USED_RESOLUTION),
        )
        .values(last_used_at=now)
        .execution_options(synchronize_session=False)
    )


def principal_for_hash(session: Session, key_hash: str) -> Principal | None:
    """The principal of the live key with this hash, or None if it is unknown or revoked. Records the use when
    ``last_used_at`` is stale, so pass a short-lived session (one of its own, not a whole request's)."""
    key = session.scalars(select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))).first()
    if key is None:
        return None
    last_used = key.last_used_at
    if last_used is not None and last_used.tzinfo is None:  # SQLite hands back naive datetimes (UTC)
        last_used = last_used.replace(tzinfo=UTC)
    if last_used is None or last_used < utcnow() - LAST_USED_RESOLUTION:
        record_use(session, key.id)
    return principal_of(key)


def principal_of(key: ApiKey) -> Principal:
    return Principal(tenant_id=key.tenant_id, key_id=str(key.id), key_prefix=key.prefix, is_admin=key.is_admin)


def authenticate(session: Session, plaintext: str) -> Principal | None:
    """The principal a bearer token stands for, or None if it is malformed, unknown or revoked."""
    if not could_be_key(plaintext):
        return None
    return principal_for_hash(session, hash_key(plaintext))
