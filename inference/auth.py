"""Who is calling: a Bearer API key names the tenant (``core.api_keys``, the same rule as the control plane).

Keys are issued by the control plane; this service only reads them. Lookups are cached for a few seconds so a
stream of requests costs one database query, while a revoked key stops working soon after. Known and unknown keys
are cached apart, each bounded, so a flood of made-up keys can neither grow memory nor push the valid keys out;
and an address that keeps sending bad keys is refused before they are looked up (``core.http.ratelimit``).
"""

from __future__ import annotations

import threading
from typing import Annotated

from cachetools import TTLCache
from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from core.api_keys import ANONYMOUS, Principal, could_be_key, hash_key, principal_for_hash
from core.db import session_scope
from core.http.auth import admin_required, bearer_token, invalid_key, required_bearer_token, too_many_failures
from core.http.ratelimit import AuthThrottle, RateLimiter, client_address
from core.pubsub import redis_client
from core.settings import Settings

CACHE_SECONDS = 5.0
MAX_CACHED_KEYS = 10_000


class Authenticator:
    def __init__(self, settings: Settings, *, max_cached_keys: int = MAX_CACHED_KEYS) -> None:
        self.settings = settings
        # TTLCache drops expired entries first and then the least recently used, never everything at once.
        self._known: TTLCache[str, Principal] = TTLCache(maxsize=max_cached_keys, ttl=CACHE_SECONDS)
        self._unknown: TTLCache[str, bool] = TTLCache(maxsize=max_cached_keys, ttl=CACHE_SECONDS)
        self._lock = threading.Lock()
        self._redis = redis_client(settings)
        self.throttle = AuthThrottle(
            RateLimiter(
                settings.auth_failures_per_minute, client=self._redis, namespace=f"{settings.namespace}:inference"
            )
        )

    def _lookup(self, digest: str) -> Principal | None:
        with session_scope() as session:
            return principal_for_hash(session, digest)

    async def principal_for(self, token: str, address: str | None = None) -> Principal | None:
        """The token's principal, or None. With ``address``: a key not in the cache is looked up only if that
        address is under AUTH_FAILURES_PER_MINUTE (else 429), and a bad key counts against it."""
        if not could_be_key(token):
            if address is not None:
                await self._check_and_count(address, failed=True)
            return None
        digest = hash_key(token)
        with self._lock:
            known = self._known.get(digest)
            if known is not None:
                return known
            cached_unknown = digest in self._unknown
        if address is not None:
            await self._check_and_count(address, failed=False)
        principal = None if cached_unknown else await run_in_threadpool(self._lookup, digest)
        with self._lock:
            if principal is None:
                self._unknown[digest] = True
            else:
                self._known[digest] = principal
        if principal is None and address is not None:
            await run_in_threadpool(self.throttle.failed, address)
        return principal

    async def _check_and_count(self, address: str, *, failed: bool) -> None:
        retry_after = await run_in_threadpool(self.throttle.check, address)
        if retry_after is not None:
            raise too_many_failures(retry_after)
        if failed:
            await run_in_threadpool(self.throttle.failed, address)

    async def checked(self, request: Request, token: str) -> Principal | None:
        return await self.principal_for(token, client_address(request.client))

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()

    async def principal(self, request: Request) -> Principal:
        if not self.settings.auth_required:
            return ANONYMOUS
        principal = await self.checked(request, required_bearer_token(request.headers.get("authorization")))
        if principal is None:
            raise invalid_key()
        return principal

    async def probe_details_allowed(self, request: Request) -> bool:
        """Whether ``/readyz`` may show models, routes and reasons: to an admin key, or to anyone without
        AUTH_REQUIRED (loopback only). No key or a bad one gets the status alone, not a 401."""
        if not self.settings.auth_required:
            return True
        token = bearer_token(request.headers.get("authorization"))
        if token is None:
            return False
        principal = await self.checked(request, token)
        return principal is not None and principal.is_admin

    async def require_metrics_reader(self, request: Request) -> None:
        """``/metrics`` with AUTH_REQUIRED: an admin key as bearer token (401 or 403 else)."""
        if not self.settings.auth_required:
            return
        principal = await self.principal(request)
        if not principal.is_admin:
            raise admin_required()


async def current_tenant(request: Request) -> str:
    authenticator: Authenticator = request.app.state.authenticator
    principal = await authenticator.principal(request)
    # Where the access log reads the tenant from, in both services.
    request.state.principal = principal
    return principal.tenant_id


async def probe_details_allowed(request: Request) -> bool:
    authenticator: Authenticator = request.app.state.authenticator
    return await authenticator.probe_details_allowed(request)


async def metrics_reader(request: Request) -> None:
    authenticator: Authenticator = request.app.state.authenticator
    await authenticator.require_metrics_reader(request)


TenantDep = Annotated[str, Depends(current_tenant)]
ProbeDetailsDep = Annotated[bool, Depends(probe_details_allowed)]
