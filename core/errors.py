"""Errors carried in OpenAI's envelope: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Any


class ConchError(Exception):
    status_code = 400
    error_type = "invalid_request_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.extra = extra or {}

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "message": self.message,
            "type": self.error_type,
            "param": self.param,
            "code": self.code,
        }
        body.update(self.extra)
        return body


class InvalidRequest(ConchError):
    status_code = 400


class ValidationFailed(ConchError):
    status_code = 422
    default_code = "validation_error"


class NotFound(ConchError):
    status_code = 404
    default_code = "not_found"


class Conflict(ConchError):
    status_code = 409
    default_code = "conflict"


class PayloadTooLarge(ConchError):
    status_code = 413
    default_code = "file_too_large"


class Unauthorized(ConchError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class RateLimited(ConchError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class ServiceUnavailable(ConchError):
    status_code = 503
    error_type = "server_error"
    default_code = "service_unavailable"


def error_body(message: str, *, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
