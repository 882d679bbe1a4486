"""The inference service's own errors. The envelope and every shared handler (routes, validation, database,
500s) are ``core.http.handlers``; this service adds only the client that went away (499)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from core.errors import ConchError, ServiceUnavailable, error_body
from core.http.errors import error_response
from core.http.handlers import install_error_handlers as install_shared_error_handlers


class GenerationFailed(ConchError):
    status_code = 500
    error_type = "server_error"
    default_code = "generation_failed"


class EngineBusy(ServiceUnavailable):
    default_code = "engine_unavailable"


class ClientGone(Exception):
    """The client disconnected; its generation was cancelled and nobody reads the answer."""


async def _client_gone(_request: Request, _exc: Exception) -> JSONResponse:
    # nginx's "client closed request": only the access log and the metrics ever see it.
    body = error_body("client closed the request", type_="invalid_request_error", code="client_gone")["error"]
    return error_response(499, body)


def install_error_handlers(app: FastAPI) -> None:
    install_shared_error_handlers(app)
    app.add_exception_handler(ClientGone, _client_gone)
