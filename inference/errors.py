"""OpenAI's error envelope for everything this service answers with an error, tracebacks never included."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import ConchError, ServiceUnavailable, Unauthorized, error_body
from core.http import allowed_methods

log = logging.getLogger("conch.inference")


class GenerationFailed(ConchError):
    status_code = 500
    error_type = "server_error"
    default_code = "generation_failed"


class EngineBusy(ServiceUnavailable):
    default_code = "engine_unavailable"


class ClientGone(Exception):
    """The client disconnected; its generation was cancelled and nobody reads the answer."""


def _json(status: int, body: dict[str, object], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


async def _conch(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ConchError)
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    return _json(exc.status_code, {"error": exc.to_dict()}, headers)


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "Request failed"
    if exc.status_code == 404 and message == "Not Found":
        message = "No such route"
    headers = dict(exc.headers) if exc.headers else {}
    if exc.status_code == 405:
        headers["Allow"] = allowed_methods(request)
    kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
    body = error_body(message, type_=kind, code=f"http_{exc.status_code}")
    return _json(exc.status_code, body, headers or None)


def _param(loc: tuple[object, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


async def _validation(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return _json(
            400, error_body("The request body is not valid JSON", type_="invalid_request_error", code="invalid_json")
        )
    param = _param(tuple(first.get("loc", ())))
    message = str(first.get("msg", "Invalid request"))
    if param:
        message = f"{param}: {message}"
    return _json(422, error_body(message, type_="invalid_request_error", param=param, code="validation_error"))


async def _client_gone(_request: Request, _exc: Exception) -> JSONResponse:
    return _json(499, error_body("client closed the request", type_="invalid_request_error", code="client_gone"))


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.error("request.failed", exc_info=exc)
    return _json(
        500, error_body("The server had an error processing the request", type_="server_error", code="internal_error")
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ConchError, _conch)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_exception_handler(Exception, _unexpected)
