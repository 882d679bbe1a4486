"""Who is calling: a Bearer API key, looked up by its SHA-256 hash, names the tenant.

Keys are issued by the control plane; this service only reads them. Lookups are cached for a few seconds so a
stream of requests costs one database query, while a revoked key stops working soon after.
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from core.db import session_scope
from core.errors import Unauthorized
from core.models import DEFAULT_TENANT, ApiKey
from core.settings import Settings

CACHE_SECONDS = 5.0
MAX_KEY_LENGTH = 256


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_KEY_LENGTH:
        return None
    return token


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._cache: dict[str, tuple[str | None, float]] = {}
        self._lock = threading.Lock()

    def _lookup(self, digest: str) -> str | None:
        with session_scope() as session:
            return session.scalars(
                select(ApiKey.tenant_id).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
            ).first()

    async def tenant_for(self, token: str) -> str | None:
        digest = hash_key(token)
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        tenant = await run_in_threadpool(self._lookup, digest)
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (tenant, now + CACHE_SECONDS)
        return tenant

    async def tenant(self, request: Request) -> str:
        token = bearer_token(request.headers.get("authorization"))
        if not self.settings.auth_required:
            return DEFAULT_TENANT
        if token is None:
            raise Unauthorized("Send an API key as 'Authorization: Bearer <key>'.")
        tenant = await self.tenant_for(token)
        if tenant is None:
            raise Unauthorized("The API key is not valid.")
        return tenant


async def current_tenant(request: Request) -> str:
    authenticator: Authenticator = request.app.state.authenticator
    tenant = await authenticator.tenant(request)
    request.state.tenant = tenant
    return tenant


TenantDep = Annotated[str, Depends(current_tenant)]
