"""Request bodies larger than the limit are refused with 413 before anything reads, parses or authenticates them.

FastAPI reads and JSON-parses a body before it runs the route's dependencies (the API key check among them), so
without this an unauthenticated client could make either service hold and parse a gigabyte. A declared
``Content-Length`` above the limit is answered at once, unread; a body sent without one (chunked) is counted as
it arrives and cut off at the limit. A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` would buffer.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import error_body
from core.http.errors import error_response

TOO_LARGE_CODE = "request_too_large"


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server (h11, httptools) refuses a malformed one before the app sees it
    return None


class BodyLimitMiddleware:
    """``max_bytes`` for every request, except the paths in ``limits``, which have their own; ``None`` there means
    the route streams its body and enforces its own limit (the api's file upload, whose 413 names the file)."""

    def __init__(self, app: ASGIApp, max_bytes: int, limits: Mapping[str, int | None] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.limits = dict(limits or {})

    def limit_for(self, scope: Scope) -> int | None:
        return self.limits.get(str(scope.get("path", "")), self.max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limit_for(scope) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await _refuse(limit, scope, receive, send)
            return

        received = 0
        refused = False
        answered = False

        async def counted_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not answered:
                        await _refuse(limit, scope, receive, send)
                    # The app stops reading as if the client had left; whatever it answers is dropped below.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal answered
            if refused:
                return
            if message["type"] == "http.response.start":
                answered = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not refused:
                raise
            # The app failed on the body it was denied (a "disconnect" mid-read); the client has its 413 already.


async def _refuse(limit: int, scope: Scope, receive: Receive, send: Send) -> None:
    body = error_body(
        f"The request body is larger than the limit of {limit} bytes.",
        type_="invalid_request_error",
        code=TOO_LARGE_CODE,
    )["error"]
    # Close the connection: the rest of the body is never read, so it could not carry another request.
    await error_response(413, body, {"Connection": "close"})(scope, receive, send)
