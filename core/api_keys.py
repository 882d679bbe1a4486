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
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.orm import DEFAULT_TENANT, ApiKey, utcnow

KEY_PREFIX = "conch-"
# Issued keys are 49 characters; anything far longer is refused before it is hashed or looked up.
MAX_KEY_LENGTH = 256
# Enough of the key to recognise it in a listing without being able to use it.
VISIBLE_PREFIX_LENGTH = 12
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant every query is scoped to, and the key used (None when auth is off)."""

    tenant_id: str
    key_id: str | None = None
    key_prefix: str | None = None

    @property
    def actor(self) -> str:
        return self.key_prefix or "api"


ANONYMOUS = Principal(tenant_id=DEFAULT_TENANT)


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def could_be_key(plaintext: str) -> bool:
    """Whether ``plaintext`` has the shape of an issued key; anything else is refused without a database query."""
    return plaintext.startswith(KEY_PREFIX) and len(plaintext) <= MAX_KEY_LENGTH


def create_api_key(session: Session, tenant_id: str, name: str = "default") -> str:
    """Store a new key for ``tenant_id`` and return its plaintext (the only time it exists outside the caller)."""
    if not _TENANT_RE.match(tenant_id):
        raise ValueError("tenant id: 1-64 characters of letters, digits, '_', '-' or '.'")
    if not name or len(name) > 128:
        raise ValueError("key name: 1-128 characters")
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiKey(
            tenant_id=tenant_id,
            name=name,
            prefix=plaintext[:VISIBLE_PREFIX_LENGTH],
            key_hash=hash_key(plaintext),
        )
    )
    session.flush()
    return plaintext


def revoke_api_key(session: Session, prefix: str) -> int:
    """Revoke every live key whose visible prefix is ``prefix``; returns how many were revoked."""
    keys = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))).all()
    for key in keys:
        key.revoked_at = utcnow()
    session.flush()
    return len(keys)


def principal_for_hash(session: Session, key_hash: str) -> Principal | None:
    """The principal of the live key with this hash, or None if it is unknown or revoked."""
    key = session.scalars(select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))).first()
    if key is None:
        return None
    return Principal(tenant_id=key.tenant_id, key_id=str(key.id), key_prefix=key.prefix)


def authenticate(session: Session, plaintext: str) -> Principal | None:
    """The principal a bearer token stands for, or None if it is malformed, unknown or revoked."""
    if not could_be_key(plaintext):
        return None
    return principal_for_hash(session, hash_key(plaintext))
