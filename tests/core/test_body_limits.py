"""Request bodies above MAX_REQUEST_BODY_BYTES get a 413 in the error envelope before anything reads, parses or
authenticates them: declared too large (``Content-Length``) they are never read at all; sent without a length
(chunked) they are counted as they arrive. Both services, auth on; the api's upload route keeps its own limit
(``tests/api/test_files.py`` covers its 413)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from starlette.types import ASGIApp, Message

from core.http.handlers import install_error_handlers
from core.http.limits import BodyLimitMiddleware
from core.http.observability import HttpMetrics, ObservabilityMiddleware
from core.settings import Settings

LIMIT = 4096
JSON = {"content-type": "application/json"}


class Note(BaseModel):
    text: str


def _bare_app(seen: list[str]) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=LIMIT, limits={"/big": 10 * LIMIT, "/own": None})
    app.add_middleware(
        ObservabilityMiddleware, metrics=HttpMetrics(CollectorRegistry(), "t"), access_log=logging.getLogger("t")
    )

    @app.post("/notes")
    async def create(note: Note) -> int:
        seen.append(note.text)
        return len(note.text)

    @app.post("/big")
    async def big(note: Note) -> int:
        seen.append("big")
        return len(note.text)

    @app.post("/own")
    async def own(request: Request) -> int:  # a route that reads its body itself, as the api's upload does
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        seen.append("own")
        return size

    return app


def _chunks(total: int, size: int = 1024) -> Iterator[bytes]:
    """A JSON body sent without a Content-Length (chunked), ``total`` bytes in all."""
    body = json.dumps({"text": "x" * (total - 12)}).encode()
    for start in range(0, len(body), size):
        yield body[start : start + size]


def _assert_413(response: Any) -> None:
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
    assert str(LIMIT) in error["message"] or "limit" in error["message"]
    assert response.headers["x-request-id"]  # answered inside the observability middleware


def test_a_body_within_the_limit_is_served_and_one_above_is_refused_unparsed() -> None:
    seen: list[str] = []
    with TestClient(_bare_app(seen)) as client:
        assert client.post("/notes", json={"text": "hello"}).json() == 5
        _assert_413(client.post("/notes", json={"text": "x" * LIMIT}))
        _assert_413(client.post("/notes", content=_chunks(3 * LIMIT), headers=JSON))  # no Content-Length: counted
        assert client.post("/notes", content=_chunks(LIMIT // 2), headers=JSON).status_code == 200
        # A route with its own limit (the api's file upload).
        assert client.post("/big", json={"text": "x" * (2 * LIMIT)}).status_code == 200
        _assert_413(client.post("/big", json={"text": "x" * (11 * LIMIT)}))
        assert client.post("/own", content=b"x" * (20 * LIMIT)).json() == 20 * LIMIT
    assert seen == ["hello", "x" * (LIMIT // 2 - 12), "big", "own"]


def _call(app: ASGIApp, *, path: str, declared: int, body: bytes | None) -> tuple[int, dict[str, Any], int]:
    """Drive the ASGI app directly, as a server would, with a declared length; returns (status, JSON body, how many
    times the app asked for body bytes). ``body=None``: the client never sends its body."""
    reads = 0
    sent: list[Message] = []

    async def receive() -> Message:
        nonlocal reads
        reads += 1
        if body is None:
            raise AssertionError("the body of a request declared too large was read")
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(declared).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return int(start["status"]), json.loads(payload), reads


def test_the_inference_service_refuses_a_gigabyte_from_an_unauthenticated_caller_without_reading_it() -> None:
    from inference.app import create_app

    app = create_app(Settings(auth_required=True, max_request_body_bytes=LIMIT), background=False)
    status, body, reads = _call(app, path="/v1/chat/completions", declared=1024**3, body=None)
    assert (status, body["error"]["code"], reads) == (413, "request_too_large", 0)
    # Within the limit the caller is asked for a key, as before.
    small = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    status, body, _ = _call(app, path="/v1/chat/completions", declared=len(small), body=small)
    assert status == 401, body
    # A body that lies about its length is still cut off at the limit.
    status, body, _ = _call(app, path="/generate", declared=10, body=b"{" + b" " * (2 * LIMIT) + b"}")
    assert (status, body["error"]["code"]) == (413, "request_too_large")


def test_the_control_plane_refuses_oversize_bodies_before_auth_but_keeps_the_upload_limit(
    clean_db: None,
) -> None:
    from api.app import create_app

    app = create_app(Settings(auth_required=True, max_request_body_bytes=LIMIT), run_reconciler=False)
    try:
        status, body, reads = _call(app, path="/v1/fine_tuning/jobs", declared=1024**3, body=None)
        assert (status, body["error"]["code"], reads) == (413, "request_too_large", 0)
        # The upload route counts its own body (up to MAX_UPLOAD_BYTES, after the key check): a 1 MB one gets a 401.
        status, body, _ = _call(app, path="/v1/files", declared=1024**2, body=b"x" * 1024**2)
        assert status == 401, body
    finally:  # no lifespan ran, so nothing else closes the app's Redis clients
        for client in (app.state.redis, app.state.broker_redis):
            if client is not None:
                client.close()
