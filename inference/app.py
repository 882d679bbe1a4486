"""The inference service: ``uvicorn inference.app:create_app --factory``.

Start-up reads the deployments table (serving whatever is active, deploying whatever is pending) in a
background thread, so ``/healthz`` answers at once and ``/readyz`` turns 200 when the deployed model has loaded
and answered its smoke generation.
"""

from __future__ import annotations

import faulthandler
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from core.http.limits import BodyLimitMiddleware
from core.http.listen import refuse_unsafe_start
from core.http.observability import ObservabilityMiddleware
from core.logging import configure_logging
from core.settings import Settings, get_settings
from inference.auth import Authenticator
from inference.deployer import Deployer
from inference.errors import install_error_handlers
from inference.listener import Listener
from inference.metrics import Metrics
from inference.registry import Registry
from inference.routes import generate, health, openai
from inference.service import InferenceService


def create_app(settings: Settings | None = None, *, background: bool = True) -> FastAPI:
    """``background=False``: no deployments listener and no unloading at shutdown; the caller drives
    ``app.state.deployer`` and closes ``app.state.registry`` (tests that run the lifespan many times)."""
    settings = settings or get_settings()
    configure_logging(settings.log_level, json_lines=settings.log_json)
    refuse_unsafe_start(settings, service="inference")
    # A crash in native code (llama.cpp, a torch kernel) ends the process; this leaves the Python stacks of every
    # thread on stderr first, so the log says where. The supervisor (``conch up``, compose) starts it again.
    faulthandler.enable()
    metrics = Metrics()
    registry = Registry(settings, metrics)
    deployer = Deployer(registry, settings, metrics)
    listener = Listener(settings, deployer)

    authenticator = Authenticator(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if not background:  # the caller drives deployments and owns the models' lifetime
            try:
                yield
            finally:
                _app.state.service.close()
                authenticator.close()
            return
        listener.start()
        try:
            yield
        finally:
            listener.stop()
            _app.state.service.close()
            registry.close()
            authenticator.close()

    app = FastAPI(
        title="Conch inference",
        version="0.1.0",
        description="Generation with the deployed (or any named) model; OpenAI-compatible routes.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.registry = registry
    app.state.deployer = deployer
    app.state.listener = listener
    app.state.service = InferenceService(registry, settings)
    app.state.authenticator = authenticator
    install_error_handlers(app)
    # Inside the observability middleware, so a 413 is counted and logged with its request id.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    app.add_middleware(
        ObservabilityMiddleware, metrics=metrics.http, access_log=logging.getLogger("conch.inference.access")
    )
    app.include_router(health.router)
    app.include_router(generate.router)
    app.include_router(openai.router)
    return app
