"""The control plane's app factory (``uvicorn api.app:create_app --factory``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI

from api.metrics import Metrics
from api.reconciler import ReconcilerThread
from api.routes import files, health, jobs, keys, models
from core.http.handlers import install_error_handlers
from core.http.limits import BodyLimitMiddleware
from core.http.listen import refuse_unsafe_start
from core.http.observability import ObservabilityMiddleware
from core.http.ratelimit import AuthThrottle, RateLimiter
from core.logging import configure_logging
from core.pubsub import redis_client
from core.reconcile import reconcile_once
from core.settings import Settings, get_settings

log = logging.getLogger("conch.api")


def _broker_redis(settings: Settings) -> redis.Redis | None:
    """A client for the broker's Redis (queue depth), when the broker is Redis."""
    url = settings.celery_broker_url
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    return redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)


def create_app(settings: Settings | None = None, *, run_reconciler: bool | None = None) -> FastAPI:
    """Build the api. ``run_reconciler`` defaults to on when RECONCILE_INTERVAL_SECONDS is positive."""
    settings = settings or get_settings()
    configure_logging(settings.log_level, json_lines=settings.log_json)
    refuse_unsafe_start(settings, service="api")
    reconcile = settings.reconcile_interval_seconds > 0 if run_reconciler is None else run_reconciler

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        thread = ReconcilerThread(settings.reconcile_interval_seconds, lambda: reconcile_once(settings))
        if reconcile:
            thread.start()
        app.state.reconciler = thread
        log.info("api.started", extra={"auth_required": settings.auth_required, "reconciler": reconcile})
        try:
            yield
        finally:
            if reconcile:
                thread.stop()
            for client in (app.state.redis, app.state.broker_redis):
                if client is not None:
                    client.close()
            log.info("api.stopped")

    app = FastAPI(
        title="Conch control plane",
        summary="Upload datasets, fine-tune open LLMs with LoRA, and deploy the results.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.redis = redis_client(settings)
    app.state.broker_redis = _broker_redis(settings)
    app.state.rate_limiter = RateLimiter(
        settings.rate_limit_per_minute, client=app.state.redis, namespace=settings.namespace
    )
    app.state.auth_throttle = AuthThrottle(
        RateLimiter(settings.auth_failures_per_minute, client=app.state.redis, namespace=f"{settings.namespace}:api")
    )
    app.state.metrics = Metrics(settings, app.state.broker_redis)

    install_error_handlers(app)
    # Inside the observability middleware, so a 413 is counted and logged with its request id. The upload route
    # streams its body to disk, counting it against MAX_UPLOAD_BYTES itself, after the key is checked.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_body_bytes, limits={"/v1/files": None})
    app.add_middleware(
        ObservabilityMiddleware, metrics=app.state.metrics.http, access_log=logging.getLogger("conch.api.access")
    )
    for router in (files.router, jobs.router, models.router, keys.router, health.router):
        app.include_router(router)
    return app
