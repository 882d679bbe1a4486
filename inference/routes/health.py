"""Probes and metrics: ``/healthz`` (the process answers), ``/readyz`` (the deployed model is loaded, passed its
smoke generation and its engine works; ``degraded`` when this replica failed a deployment another replica serves,
with the tenants and models for an admin key), ``/metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from core.http.probes import readiness_response
from inference.auth import ProbeDetailsDep, metrics_reader
from inference.registry import Registry

router = APIRouter(tags=["health"])
# What an outsider learns of an unready service: the engine's own reason can name models and folders.
PUBLIC_UNREADY_REASON = "Not ready: the default model is not serving yet (details for an admin key)."


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: 503 until the deployed model answers, and whenever its engine fails",
    responses={503: {"description": "not ready: the reason, and the error envelope"}},
)
async def readyz(request: Request, details: ProbeDetailsDep) -> JSONResponse:
    """Status and a reason for anyone; the models, their routes and the engine's own reason only for an admin key
    (or without AUTH_REQUIRED, which is loopback only)."""
    registry: Registry = request.app.state.registry
    ready, detail = registry.readiness()
    if details:
        return readiness_response(detail, unready_reason=None if ready else str(detail.get("reason", "not ready")))
    # An outsider learns that this replica failed some deployment (it serves those tenants their previous model),
    # not which: the tenants and models are for an admin key.
    public = {"degraded": True} if detail.get("degraded") else {}
    return readiness_response(public, unready_reason=None if ready else PUBLIC_UNREADY_REASON)


@router.get(
    "/metrics",
    summary="Prometheus metrics (with AUTH_REQUIRED: an admin key as bearer token)",
    response_class=PlainTextResponse,
    dependencies=[Depends(metrics_reader)],
)
async def metrics(request: Request) -> Response:
    request.app.state.registry.readiness()  # refreshes the readiness gauge
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
