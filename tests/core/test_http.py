"""The HTTP stack both services share, on a bare app of its own: the request id (generated, or the caller's, echoed
and in every log line of the request), the error envelope for validation and crashes, request metrics by route
template, bearer parsing and the readiness body."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import BaseModel

from core.http.auth import bearer_token
from core.http.handlers import MAX_LISTED_ERRORS, dotted, install_error_handlers
from core.http.observability import HttpMetrics, ObservabilityMiddleware
from core.http.probes import readiness_response
from core.logging import JsonFormatter

route_log = logging.getLogger("tests.core.http.route")


class Item(BaseModel):
    name: str
    tags: list[int]


class Batch(BaseModel):
    items: list[Item]


def _app() -> tuple[FastAPI, CollectorRegistry]:
    app = FastAPI()
    registry = CollectorRegistry()
    install_error_handlers(app)
    app.add_middleware(
        ObservabilityMiddleware, metrics=HttpMetrics(registry, "test"), access_log=logging.getLogger("tests.access")
    )

    @app.get("/items/{item_id}")
    def read(item_id: int) -> dict[str, int]:
        route_log.info("item.read")  # on Starlette's threadpool: the log context must follow it there
        return {"id": item_id}

    @app.post("/items")
    async def create(batch: Batch) -> int:
        return len(batch.items)

    @app.get("/explode")
    async def explode() -> None:
        raise RuntimeError("secret detail")

    return app, registry


@pytest.fixture
def client() -> Iterator[TestClient]:
    app, _ = _app()
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """What the JSON formatter writes for this test's loggers."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    loggers = [logging.getLogger(name) for name in ("tests.core.http.route", "tests.access")]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    yield stream
    for logger in loggers:
        logger.removeHandler(handler)


def test_a_request_id_is_generated_or_taken_from_the_caller(client: TestClient) -> None:
    assert re.fullmatch(r"[0-9a-f]{16}", client.get("/items/1").headers["x-request-id"])
    assert client.get("/items/1", headers={"X-Request-ID": "trace-42.a:b"}).headers["x-request-id"] == "trace-42.a:b"
    for unacceptable in ("has space", "x" * 129, "new\\nline"):
        echoed = client.get("/items/1", headers={"X-Request-ID": unacceptable}).headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{16}", echoed), unacceptable


def test_every_log_line_of_a_request_carries_its_id(client: TestClient, json_lines: io.StringIO) -> None:
    client.get("/items/7", headers={"X-Request-ID": "abc123"})
    records = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    assert [r["event"] for r in records] == ["item.read", "http.request"]
    assert all(r["request_id"] == "abc123" for r in records)
    access = records[1]
    assert access["route"] == "/items/{item_id}" and access["status"] == 200 and access["method"] == "GET"


def test_a_crash_is_a_500_without_details_that_still_names_the_request(client: TestClient) -> None:
    response = client.get("/explode", headers={"X-Request-ID": "crash-1"})
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert "secret" not in response.text and "RuntimeError" not in response.text
    assert response.headers["x-request-id"] == "crash-1"


def test_validation_lists_errors_by_dotted_field_up_to_a_limit(client: TestClient) -> None:
    bad = {"items": [{"name": 1, "tags": ["x"]} for _ in range(15)]}
    error = client.post("/items", json=bad).json()["error"]
    assert error["code"] == "string_type" and error["param"] == "items[0].name"
    assert error["message"].startswith("items[0].name: ")
    assert len(error["errors"]) == MAX_LISTED_ERRORS
    second = error["errors"][1]
    assert second["param"] == "items[0].tags[0]" and second["code"] == "int_parsing"
    assert dotted(("body", "method", "supervised", "hyperparameters", "n_epochs", "int")) == (
        "method.supervised.hyperparameters.n_epochs"
    )
    assert dotted(("body", "messages", 0, "content")) == "messages[0].content"


def test_unknown_routes_and_methods_have_stable_codes(client: TestClient) -> None:
    assert client.get("/nothing").json()["error"]["code"] == "not_found"
    wrong = client.delete("/items/1")
    assert wrong.json()["error"]["code"] == "method_not_allowed" and wrong.headers["allow"] == "GET"
    invalid = client.post("/items", content=b"{", headers={"content-type": "application/json"})
    assert invalid.status_code == 400 and invalid.json()["error"]["code"] == "invalid_json"


def test_requests_are_counted_by_route_template() -> None:
    app, registry = _app()
    with TestClient(app, raise_server_exceptions=False) as client:
        for item_id in (1, 2, 3):
            client.get(f"/items/{item_id}")
        client.get("/nothing")
    text = generate_latest(registry).decode()
    assert 'conch_test_requests_total{method="GET",route="/items/{item_id}",status="200"} 3.0' in text
    assert 'conch_test_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    assert 'conch_test_request_duration_seconds_count{method="GET",route="/items/{item_id}"} 3.0' in text


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer conch-abc", "conch-abc"),
        ("bearer   conch-abc  ", "conch-abc"),
        ("Basic conch-abc", None),
        ("Bearer ", None),
        ("conch-abc", None),
        (None, None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_readiness_body() -> None:
    ready = readiness_response({"checks": {"database": "ok"}}, unready_reason=None)
    assert ready.status_code == 200 and json.loads(ready.body) == {"status": "ready", "checks": {"database": "ok"}}
    down = readiness_response({"checks": {"database": "timeout"}}, unready_reason="Not ready: database unavailable")
    assert down.status_code == 503
    assert json.loads(down.body) == {
        "status": "unavailable",
        "reason": "Not ready: database unavailable",
        "checks": {"database": "timeout"},
        "error": {
            "message": "Not ready: database unavailable",
            "type": "server_error",
            "param": None,
            "code": "service_unavailable",
        },
    }
