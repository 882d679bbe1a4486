"""Who is calling: a Bearer API key names the tenant (``core.api_keys``, the same rule as the control plane).

Keys are issued by the control plane; this service only reads them. Lookups are cached for a few seconds so a
stream of requests costs one database query, while a revoked key stops working soon after.
"""

from __future__ import annotations

import threading
import time
from typing import Annotated

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from core.api_keys import ANONYMOUS, Principal, could_be_key, hash_key, principal_for_hash
from core.db import session_scope
from core.http.auth import invalid_key, required_bearer_token
from core.settings import Settings

CACHE_SECONDS = 5.0
MAX_CACHED_KEYS = 10_000


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._cache: dict[str, tuple[Principal | None, float]] = {}
        self._lock = threading.Lock()

    def _lookup(self, digest: str) -> Principal | None:
        with session_scope() as session:
            return principal_for_hash(session, digest)

    async def principal_for(self, token: str) -> Principal | None:
        if not could_be_key(token):
            return None
        digest = hash_key(token)
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        principal = await run_in_threadpool(self._lookup, digest)
        with self._lock:
            if len(self._cache) > MAX_CACHED_KEYS:
                self._cache.clear()
            self._cache[digest] = (principal, now + CACHE_SECONDS)
        return principal

    async def principal(self, request: Request) -> Principal:
        if not self.settings.auth_required:
            return ANONYMOUS
        principal = await self.principal_for(required_bearer_token(request.headers.get("authorization")))
        if principal is None:
            raise invalid_key()
        return principal


async def current_tenant(request: Request) -> str:
    authenticator: Authenticator = request.app.state.authenticator
    principal = await authenticator.principal(request)
    # Where the access log reads the tenant from, in both services.
    request.state.principal = principal
    return principal.tenant_id


TenantDep = Annotated[str, Depends(current_tenant)]
