"""Request dependencies: settings, the unit-of-work session, the calling principal (auth + rate limit),
the ``Idempotency-Key`` header and page parameters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Header, Query, Request
from sqlalchemy.orm import Session

from api.db import request_session
from core.api_keys import ANONYMOUS, Principal, authenticate
from core.db import session_scope
from core.http.auth import admin_required, bearer_token, invalid_key, required_bearer_token, too_many_failures
from core.http.errors import TooManyRequests
from core.http.ratelimit import AuthThrottle, RateLimiter, client_address
from core.settings import Settings

# OpenAI's files list takes 1-10,000 (its one documented ceiling; the fine-tuning lists document none), and
# clients ask for that much: every list accepts it, and a page is still bounded.
MAX_PAGE_LIMIT = 10_000


def app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(app_settings)]
# scope="function": the commit (and what runs after it) happens before the response goes out, so a client never
# sees a 200 for rows that then failed to commit.
SessionDep = Annotated[Session, Depends(request_session, scope="function")]


def _key_principal(request: Request, token: str) -> Principal | None:
    """The key's principal, or None (the failure counted against the caller's address). An address over
    AUTH_FAILURES_PER_MINUTE gets 429 before its key is hashed or looked up. The lookup has a short transaction of
    its own: it may record the key's last use, and that row must not stay locked for the whole request."""
    throttle: AuthThrottle = request.app.state.auth_throttle
    address = client_address(request.client)
    retry_after = throttle.check(address)
    if retry_after is not None:
        raise too_many_failures(retry_after)
    with session_scope() as session:
        found = authenticate(session, token)
    if found is None:
        throttle.failed(address)
    return found


def current_principal(request: Request, settings: SettingsDep) -> Principal:
    """The tenant this request acts for, rate-limited per key. Without AUTH_REQUIRED (loopback only, see
    ``core.exposure``) everything belongs to the default tenant, a presented key is ignored, and the limit is per
    client address."""
    if not settings.auth_required:
        principal = ANONYMOUS
        identity = f"addr:{client_address(request.client)}"
    else:
        found = _key_principal(request, required_bearer_token(request.headers.get("authorization")))
        if found is None:
            raise invalid_key()
        principal = found
        identity = f"key:{principal.key_id}"
    limiter: RateLimiter = request.app.state.rate_limiter
    retry_after = limiter.hit(identity)
    if retry_after is not None:
        raise TooManyRequests(
            f"Rate limit of {limiter.limit} requests per minute exceeded; retry in {retry_after}s.",
            retry_after=retry_after,
        )
    request.state.principal = principal
    return principal


def admin_principal(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
    """An admin key's principal (key management); 403 for any other key, and without AUTH_REQUIRED."""
    if not principal.is_admin:
        raise admin_required()
    return principal


def probe_details_allowed(request: Request, settings: SettingsDep) -> bool:
    """Whether a probe (``/readyz``) may show its details: to an admin key, or to anyone without AUTH_REQUIRED
    (loopback only). A missing or bad key gets the status alone, not a 401: load balancers send none."""
    if not settings.auth_required:
        return True
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        return False
    found = _key_principal(request, token)
    return found is not None and found.is_admin


def metrics_reader(request: Request, settings: SettingsDep) -> None:
    """``/metrics`` with AUTH_REQUIRED: an admin key (Prometheus sends it as a bearer token); 401 or 403 else."""
    if not settings.auth_required:
        return
    found = _key_principal(request, required_bearer_token(request.headers.get("authorization")))
    if found is None:
        raise invalid_key()
    if not found.is_admin:
        raise admin_required()


PrincipalDep = Annotated[Principal, Depends(current_principal)]
AdminDep = Annotated[Principal, Depends(admin_principal)]
ProbeDetailsDep = Annotated[bool, Depends(probe_details_allowed)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="Retrying a POST with the same key returns the first answer instead of creating again.",
    ),
]


def _page_limit(default: int | None) -> Callable[..., int]:
    """A ``limit`` query parameter, 1 to MAX_PAGE_LIMIT; ``default`` None: DEFAULT_PAGE_LIMIT."""
    shown = f"default {default}" if default is not None else "default DEFAULT_PAGE_LIMIT"

    # The Query is a default, not in the annotation: annotations are strings here, and FastAPI resolves them in
    # the module's globals, where this closure's ``shown`` does not exist.
    def page_limit(
        settings: SettingsDep,
        limit: int | None = Query(
            None, ge=1, le=MAX_PAGE_LIMIT, description=f"page size, 1-{MAX_PAGE_LIMIT:,} ({shown})"
        ),
    ) -> int:
        if limit is not None:
            return limit
        return default if default is not None else min(settings.default_page_limit, MAX_PAGE_LIMIT)

    return page_limit


# OpenAI's defaults per list, so a client written against OpenAI gets the page it expects.
FilesLimit = Annotated[int, Depends(_page_limit(10_000))]
JobsLimit = Annotated[int, Depends(_page_limit(20))]
EventsLimit = Annotated[int, Depends(_page_limit(20))]
CheckpointsLimit = Annotated[int, Depends(_page_limit(10))]
# Conch's own lists (deployments).
LimitDep = Annotated[int, Depends(_page_limit(None))]
After = Annotated[str | None, Query(max_length=128, description="id of the last object of the previous page")]
