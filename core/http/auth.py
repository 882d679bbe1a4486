"""The HTTP side of API keys: reading ``Authorization: Bearer <key>`` and the two 401s both services answer.

Which key is valid, and for which tenant, is domain code in ``core.api_keys``; how long a key may be is its rule
too (``could_be_key``), so both services refuse the same tokens with the same answer.
"""

from __future__ import annotations

from core.errors import ConchError, Unauthorized
from core.http.errors import TooManyRequests

MISSING_KEY_MESSAGE = "Send an API key as 'Authorization: Bearer <key>'."
INVALID_KEY_MESSAGE = "The API key is not valid."


class Forbidden(ConchError):
    """A valid key that may not do this (a tenant key on an admin route)."""

    status_code = 403
    error_type = "permission_error"
    default_code = "forbidden"


def admin_required() -> Forbidden:
    return Forbidden("This needs an admin API key (`conch keys create TENANT --admin`).")


def too_many_failures(retry_after: int) -> TooManyRequests:
    """The 429 for an address that has sent too many bad keys; sent before its key is looked up."""
    return TooManyRequests(
        f"Too many requests with invalid API keys from this address; retry in {retry_after}s.",
        retry_after=retry_after,
    )


def bearer_token(authorization: str | None) -> str | None:
    """The token of a ``Bearer`` authorization header (scheme in any case), or None for anything else."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def required_bearer_token(authorization: str | None) -> str:
    """The bearer token, or the 401 that asks for one."""
    token = bearer_token(authorization)
    if token is None:
        raise Unauthorized(MISSING_KEY_MESSAGE)
    return token


def invalid_key() -> Unauthorized:
    """The 401 for a token that names no live key (unknown, revoked, or not shaped like a key)."""
    return Unauthorized(INVALID_KEY_MESSAGE)
