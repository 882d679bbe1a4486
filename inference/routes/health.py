"""Probes and metrics: ``/healthz`` (the process answers), ``/readyz`` (the deployed model is loaded, passed its
smoke generation and its engine works), ``/metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from core.http.probes import readiness_response
from inference.registry import Registry

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: 503 until the deployed model answers, and whenever its engine fails",
    responses={503: {"description": "not ready: the reason, and the error envelope"}},
)
async def readyz(request: Request) -> JSONResponse:
    registry: Registry = request.app.state.registry
    ready, detail = registry.readiness()
    return readiness_response(detail, unready_reason=None if ready else str(detail.get("reason", "not ready")))


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    request.app.state.registry.readiness()  # refreshes the readiness gauge
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
