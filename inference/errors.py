"""The inference service's own errors. The envelope and every shared handler (routes, validation, database,
500s) are ``core.http.handlers``; this service adds only the client that went away (499)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from core.errors import ConchError, ServiceUnavailable, error_body
from core.http.errors import error_response
from core.http.handlers import conch_error_handler
from core.http.handlers import install_error_handlers as install_shared_error_handlers


class GenerationFailed(ConchError):
    status_code = 500
    error_type = "server_error"
    default_code = "generation_failed"


class EngineBusy(ServiceUnavailable):
    default_code = "engine_unavailable"


class RetryLater(ServiceUnavailable):
    """A 503 that tells the client when to try again (``Retry-After``): the service is full, not broken."""

    def __init__(self, message: str, *, retry_after: int, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class ServiceSaturated(RetryLater):
    default_code = "service_saturated"


class ModelDoesNotFit(RetryLater):
    default_code = "model_does_not_fit"


class ClientGone(Exception):
    """The client disconnected; its generation was cancelled and nobody reads the answer."""


async def _client_gone(_request: Request, _exc: Exception) -> JSONResponse:
    # nginx's "client closed request": only the access log and the metrics ever see it.
    body = error_body("client closed the request", type_="invalid_request_error", code="client_gone")["error"]
    return error_response(499, body)


async def _retry_later(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RetryLater)
    response = await conch_error_handler(request, exc)
    response.headers["Retry-After"] = str(exc.retry_after)
    return response


def install_error_handlers(app: FastAPI) -> None:
    install_shared_error_handlers(app)
    app.add_exception_handler(RetryLater, _retry_later)
    app.add_exception_handler(ClientGone, _client_gone)
