"""``/healthz`` (the process answers), ``/readyz`` (database and broker reachable) and ``/metrics``."""

from __future__ import annotations

import logging
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.deps import ProbeDetailsDep, metrics_reader
from api.metrics import Metrics
from core.db import get_engine
from core.http.probes import readiness_response
from core.queue import get_celery
from core.settings import Settings

router = APIRouter(tags=["health"])
log = logging.getLogger("conch.api")

CHECK_TIMEOUT_SECONDS = 3.0


def _check_database() -> None:
    with get_engine().connect() as conn:
        conn.execute(text("SELECT 1"))


def _check_broker(settings: Settings) -> None:
    with get_celery(settings).connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2, interval_start=0, interval_step=0.2)


async def _run_check(check: Any, *args: Any) -> str:
    try:
        with anyio.fail_after(CHECK_TIMEOUT_SECONDS):
            await anyio.to_thread.run_sync(check, *args, abandon_on_cancel=True)
        return "ok"
    except TimeoutError:
        return "timeout"
    except Exception as exc:
        # Only the class: messages may carry connection strings.
        log.warning("readyz.check_failed", extra={"check": check.__name__, "error_class": type(exc).__name__})
        return f"unavailable ({type(exc).__name__})"


@router.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: database and broker", responses={503: {"description": "Not ready"}})
async def readyz(request: Request, details: ProbeDetailsDep) -> JSONResponse:
    """Status and reason for anyone; each check's result only for an admin key (or without AUTH_REQUIRED)."""
    settings: Settings = request.app.state.settings
    checks = {
        "database": await _run_check(_check_database),
        "broker": await _run_check(_check_broker, settings),
    }
    failing = ", ".join(k for k, v in checks.items() if v != "ok")
    return readiness_response(
        {"checks": checks} if details else {}, unready_reason=f"Not ready: {failing} unavailable" if failing else None
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics (with AUTH_REQUIRED: an admin key as bearer token)",
    response_class=Response,
    dependencies=[Depends(metrics_reader)],
)
def metrics(request: Request) -> Response:
    registry: Metrics = request.app.state.metrics
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)
