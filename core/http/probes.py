"""The ``/readyz`` body both services answer with.

200: ``{"status": "ready", ...detail}``. 503: ``{"status": "unavailable", "reason": ..., ...detail, "error":
{...}}``, the reason repeated as the error envelope's message so clients that read only errors see it too. The
detail is the service's own (the api: each dependency's check; inference: the models loaded and their routes), and
only for an admin key (or without AUTH_REQUIRED): an outsider gets the status and a reason, no model ids.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse

from core.errors import error_body
from core.redact import hide_paths


def readiness_response(detail: Mapping[str, Any], *, unready_reason: str | None) -> JSONResponse:
    """Ready when ``unready_reason`` is None; else 503 saying why."""
    if unready_reason is None:
        return JSONResponse({"status": "ready", **detail})
    unready_reason = hide_paths(unready_reason)  # reasons quote loaders' exceptions, which name folders
    body: dict[str, Any] = {"status": "unavailable", **detail, "reason": unready_reason}
    body.update(error_body(unready_reason, type_="server_error", code="service_unavailable"))
    return JSONResponse(body, status_code=503)
