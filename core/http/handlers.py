"""One error envelope for every failure, in both services.

Handlers cover Conch's own errors, Starlette's HTTP errors (unknown route, wrong method), FastAPI's request
validation (bad JSON, wrong types, unknown fields: up to 20 listed, each with its dotted field), the database being
unreachable (503, retry) or refusing a value (400), and anything unexpected (500, never a traceback). A service
adds handlers only for errors of its own (inference: the client that went away).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import DataError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from core.errors import ConchError, Unauthorized, error_body
from core.http.errors import TooManyRequests, error_response
from core.http.observability import REQUEST_ID_HEADER
from core.http.routing import allowed_methods
from core.redact import hide_paths

log = logging.getLogger("conch.http")

MAX_LISTED_ERRORS = 20
# The OpenAI error ``type`` and a stable ``code`` for plain HTTP statuses raised outside Conch's code.
_HTTP_STATUS_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    422: ("invalid_request_error", "validation_error"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}
# Pydantic adds the union member that failed to an error's location (``n_epochs.int``); clients want the field.
_TYPE_TAGS = frozenset({"int", "float", "str", "bool", "bytes", "none", "list", "dict", "tuple", "set"})


def _is_type_tag(part: str) -> bool:
    return part in _TYPE_TAGS or any(c in part for c in "[('")


def dotted(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """``("body", "method", "supervised", "hyperparameters", "n_epochs")`` -> ``method.supervised...n_epochs``;
    list positions as ``messages[0].content``."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    parts = [p for p in parts if not _is_type_tag(p)]
    out = ""
    for part in parts:
        out += f"[{part}]" if part.isdigit() and out else (f".{part}" if out else part)
    return out or None


async def conch_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ConchError)
    headers: dict[str, str] = {}
    if isinstance(exc, TooManyRequests):
        headers["Retry-After"] = str(exc.retry_after)
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    body = exc.to_dict()
    if exc.status_code >= 500:  # a server-side failure's message may quote an exception naming a folder
        body["message"] = hide_paths(body["message"])
    return error_response(exc.status_code, body, headers or None)


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405:
        exc.headers = {**(exc.headers or {}), "Allow": allowed_methods(request)}
    type_, code = _HTTP_STATUS_ERRORS.get(
        exc.status_code,
        ("server_error" if exc.status_code >= 500 else "invalid_request_error", f"http_{exc.status_code}"),
    )
    message = exc.detail if isinstance(exc.detail, str) else "Request failed"
    if exc.status_code == 404 and message == "Not Found":
        message = "No such route"
    body = error_body(message, type_=type_, code=code)["error"]
    return error_response(exc.status_code, body, dict(exc.headers) if exc.headers else None)


async def validation_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if not errors:
        return error_response(422, error_body("Invalid request", type_="invalid_request_error")["error"])
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "invalid JSON")
        body = error_body(
            f"The request body is not valid JSON: {detail}", type_="invalid_request_error", code="invalid_json"
        )["error"]
        return error_response(400, body)
    if tuple(first.get("loc", ())) == ("body",) and first.get("type") in ("model_attributes_type", "dict_type"):
        body = error_body(
            "The request body must be a JSON object, sent with Content-Type: application/json.",
            type_="invalid_request_error",
            code="invalid_body",
        )["error"]
        return error_response(400, body)
    listed = [
        {"param": dotted(e.get("loc", ())), "message": str(e.get("msg")), "code": e.get("type")}
        for e in errors[:MAX_LISTED_ERRORS]
    ]
    param = listed[0]["param"]
    message = f"{param}: {listed[0]['message']}" if param else str(listed[0]["message"])
    if first.get("type") == "extra_forbidden":
        message = f"{param}: this field is not accepted here"
    body = error_body(message, type_="invalid_request_error", param=param, code=str(first.get("type")))["error"]
    # Never echo the offending input back: it may be huge or hold a secret.
    body["errors"] = listed
    return error_response(422, body)


async def database_unavailable_handler(request: Request, exc: Exception) -> JSONResponse:
    # Connection refused, server restarting, lost connection: the client may retry, unlike a 500.
    log.error("http.database_unavailable", extra={"path": request.url.path, "error_class": type(exc).__name__})
    body = error_body("The database is unavailable; retry shortly.", type_="server_error", code="service_unavailable")[
        "error"
    ]
    return error_response(503, body, {"Retry-After": "5"})


async def data_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # The database refused a value that came from the request (a NUL byte in an id, say): the client's mistake.
    log.warning("http.value_refused_by_database", extra={"path": request.url.path, "error_class": type(exc).__name__})
    body = error_body(
        "A value in the request cannot be stored or searched (for example it contains a NUL character).",
        type_="invalid_request_error",
        code="invalid_value",
    )["error"]
    return error_response(400, body)


async def unhandled_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # Starlette runs this outside every middleware, so the request id is read from the request's state (where the
    # observability middleware left it) rather than from the log context, and echoed here.
    request_id = getattr(request.state, "request_id", None)
    log.error(
        "http.unhandled_error",
        exc_info=exc,
        extra={
            "path": request.url.path,
            "method": request.method,
            "error_class": type(exc).__name__,
            "request_id": request_id,
        },
    )
    body = error_body(
        "The server failed to answer this request; it has been logged.", type_="server_error", code="internal_error"
    )["error"]
    return error_response(500, body, {REQUEST_ID_HEADER: request_id} if request_id else None)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ConchError, conch_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(OperationalError, database_unavailable_handler)
    app.add_exception_handler(DataError, data_error_handler)
    app.add_exception_handler(Exception, unhandled_error_handler)
