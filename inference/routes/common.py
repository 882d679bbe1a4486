"""Pieces the generation routes share: the service from app state, SSE framing, the model header."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from core.errors import InvalidRequest
from inference.engine.loader import LoadedModel
from inference.registry import Hold
from inference.service import Generation, InferenceService

MODEL_HEADER = "x-conch-model"
SSE_DONE = "data: [DONE]\n\n"


def service_of(request: Request) -> InferenceService:
    service: InferenceService = request.app.state.service
    return service


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def model_headers(name: str) -> dict[str, str]:
    return {MODEL_HEADER: name}


def encode_messages(model: LoadedModel, messages: list[dict[str, str]]) -> list[int]:
    try:
        return model.encode_chat(messages)
    except ValueError as exc:  # the template cannot render this conversation (e.g. a role out of place)
        raise InvalidRequest(str(exc), param="messages", code="invalid_messages") from exc
    except Exception as exc:  # a template's own raise_exception() reports a jinja error
        raise InvalidRequest(f"the model's chat template refused these messages: {exc}", param="messages") from exc


def released_on_error(hold: Hold) -> _ReleaseOnError:
    return _ReleaseOnError(hold)


class _ReleaseOnError:
    """Until a Generation owns the hold, an error while preparing the request must give it back."""

    def __init__(self, hold: Hold) -> None:
        self.hold = hold

    def __enter__(self) -> Hold:
        return self.hold

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.hold.release()


def event_stream(generation: Generation, body: Any) -> StreamingResponse:
    """SSE response whose cleanup (cancel + release) also runs if the client leaves before the first byte."""
    return StreamingResponse(
        body,
        media_type="text/event-stream",
        headers={**model_headers(generation.model_name), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(generation.close),
    )
