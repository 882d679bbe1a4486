"""Prometheus metrics: requests by route template and status, latency, jobs by status and the training queue's
depth. Each app gets its own registry, so several apps in one process (tests) never collide. The request
figures and the access log are the shared middleware's (``core.http.observability``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import redis
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from core.contracts import JobStatus
from core.db import session_scope
from core.http.observability import HttpMetrics
from core.orm import FineTuningJob
from core.settings import Settings

log = logging.getLogger("conch.api")


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
    """The api's registry: request metrics (``core.http.observability``) plus jobs and queue depth."""

    def __init__(self, settings: Settings, broker: redis.Redis | None) -> None:
        self.registry = CollectorRegistry()
        self.http = HttpMetrics(self.registry, "api")
        self.registry.register(StateCollector(settings, broker))
