"""Request metrics and the access log, one middleware for both services, with a request id.

Every request gets an id: the caller's ``X-Request-ID`` when it is a short token (so a trace spans a proxy and
both services), else a fresh 16-hex one. It is echoed in the response's ``X-Request-ID``, carried by every log line
written while the request is handled, and left in ``request.state.request_id`` for the 500 handler, which runs
outside the middleware.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.http.routing import route_template
from core.logging import log_context

REQUEST_ID_HEADER = "X-Request-ID"
# Letters, digits and a few separators only: the id goes into log lines and a response header verbatim.
_ACCEPTED_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# From a cached answer to a long generation (inference streams for up to a minute).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class HttpMetrics:
    """``conch_<service>_requests_total`` by method, route template and status, and
    ``conch_<service>_request_duration_seconds`` by method and route template, on the service's own registry."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.requests = Counter(
            f"conch_{service}_requests",
            "HTTP requests by method, route template and status",
            ["method", "route", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            f"conch_{service}_request_duration_seconds",
            "Time to answer (a stream: to its last byte), by route template",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.duration.labels(method, route).observe(seconds)


def request_id_from(scope: Scope) -> str:
    """The caller's ``X-Request-ID`` when it is acceptable, else a new one."""
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _ACCEPTED_REQUEST_ID.fullmatch(candidate):
                return candidate
            break
    return uuid.uuid4().hex[:16]


class ObservabilityMiddleware:
    """Counts and times every request and writes one access log line (no headers, so no keys, ever).

    A plain ASGI middleware rather than Starlette's ``BaseHTTPMiddleware``, which would buffer streamed answers
    and run the app in another task (so the log context would not reach it)."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics, access_log: logging.Logger) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering
        request_id = request_id_from(scope)
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_request_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        with log_context(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_request_id)
            finally:
                elapsed = time.perf_counter() - started
                route = route_template(scope)
                method = scope.get("method", "")
                self.metrics.observe(method, route, status, elapsed)
                principal = scope.get("state", {}).get("principal")
                self.access_log.info(
                    "http.request",
                    extra={
                        "request_id": request_id,
                        "method": method,
                        "route": route,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 1),
                        "tenant_id": getattr(principal, "tenant_id", None),
                    },
                )
