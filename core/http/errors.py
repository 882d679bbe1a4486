"""OpenAI's error envelope as an HTTP answer: ``{"error": {"message", "type", "param", "code"}}``.

The pydantic models document it in both services' OpenAPI schemas; ``error_response`` builds it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from starlette.responses import JSONResponse

from core.errors import RateLimited


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorObject


class TooManyRequests(RateLimited):
    """A rate limit hit, carrying how long the client should wait (sent as ``Retry-After``)."""

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def error_response(status_code: int, error: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error}, status_code=status_code, headers=headers)
