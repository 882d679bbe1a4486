"""Prometheus metrics: requests by route template and status, latency, jobs by status and the training queue's
depth. Each app gets its own registry, so several apps in one process (tests) never collide."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.contracts import JobStatus
from core.db import session_scope
from core.models import FineTuningJob
from core.settings import Settings

log = logging.getLogger("conch.api")
access_log = logging.getLogger("conch.api.access")


class StateCollector(Collector):
    """Figures read from Postgres and the broker at scrape time, so they are never stale or double-counted."""

    def __init__(self, settings: Settings, broker: redis.Redis | None) -> None:
        self.settings = settings
        self.broker = broker

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("conch_jobs", "Fine-tuning jobs by status", labels=["status"])
        try:
            with session_scope() as session:
                rows = session.execute(select(FineTuningJob.status, func.count()).group_by(FineTuningJob.status))
                counts = {status: int(count) for status, count in rows}
            for status in JobStatus:
                jobs.add_metric([status.value], float(counts.get(status.value, 0)))
            yield jobs
        except Exception as exc:  # a scrape must not fail because the database is down
            log.warning("metrics.jobs_unavailable", extra={"error_class": type(exc).__name__})
        if self.broker is not None:
            depth = GaugeMetricFamily("conch_queue_depth", "Messages waiting in the training queue", labels=["queue"])
            try:
                depth.add_metric([self.settings.training_queue], float(self.broker.llen(self.settings.training_queue)))
                yield depth
            except redis.RedisError as exc:
                log.warning("metrics.queue_unavailable", extra={"error_class": type(exc).__name__})


class Metrics:
    def __init__(self, settings: Settings, broker: redis.Redis | None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "conch_api_requests",
            "HTTP requests by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "conch_api_request_duration_seconds",
            "Time to answer, by route template",
            ["method", "route"],
            registry=self.registry,
        )
        self.registry.register(StateCollector(settings, broker))


def route_template(scope: Scope) -> str:
    """The matched route's path template (``/v1/files/{file_id}``), never the raw path: bounded label values."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    app = scope.get("app")
    for candidate in getattr(getattr(app, "router", None), "routes", []):
        match, _ = candidate.matches(scope)
        if match == Match.FULL:
            return str(getattr(candidate, "path", "unmatched"))
    return "unmatched"


class ObservabilityMiddleware:
    """Counts and times every request and writes one access log line (no headers, so no keys, ever)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        request_id = uuid.uuid4().hex[:16]

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - started
            route = route_template(scope)
            method = scope.get("method", "")
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(elapsed)
            principal = getattr(scope.get("state", {}).get("principal"), "tenant_id", None)
            access_log.info(
                "http.request",
                extra={
                    "request_id": request_id,
                    "method": method,
                    "route": route,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 1),
                    "tenant_id": principal,
                },
            )
