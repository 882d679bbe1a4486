"""``/v1/fine_tuning/jobs``: create, list, retrieve, cancel, events (paged and live over SSE), checkpoints."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from api.deps import (
    After,
    CheckpointsLimit,
    EventsLimit,
    IdempotencyKey,
    JobsLimit,
    PrincipalDep,
    SessionDep,
    SettingsDep,
)
from api.http import idempotency
from api.schemas import ERROR_RESPONSES, CheckpointList, EventList, JobCreate, JobList, JobOut
from api.services import jobs as service
from api.services.event_streams import registry_for
from core.contracts import JobStatus
from core.db import session_scope
from core.http.ratelimit import client_address

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=ERROR_RESPONSES)

STREAM_PING_SECONDS = 15


@router.post("", response_model=JobOut, summary="Create a fine-tuning job")
def create_job(
    body: JobCreate,
    request: Request,
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
) -> JobOut | JSONResponse:
    route = f"POST {request.url.path}"
    req_hash = idempotency.request_hash(body.model_dump(mode="json", exclude_unset=True))
    return idempotency.respond_once(
        session,
        tenant_id=principal.tenant_id,
        key=idempotency_key,
        route=route,
        req_hash=req_hash,
        create=lambda: service.job_out(
            service.create_job(session, tenant_id=principal.tenant_id, body=body, settings=settings)
        ),
    )


def _metadata_filter(request: Request) -> dict[str, str]:
    """OpenAI's ``metadata[key]=value`` query parameters."""
    found: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name.startswith("metadata[") and name.endswith("]") and len(name) > len("metadata[]"):
            found[name[len("metadata[") : -1]] = value
    return found


@router.get("", response_model=JobList, summary="List fine-tuning jobs")
def list_jobs(
    request: Request,
    session: SessionDep,
    principal: PrincipalDep,
    limit: JobsLimit,
    after: After = None,
    status: Annotated[
        JobStatus | None,
        Query(
            description="validating_files is accepted, as OpenAI lists it, and matches no job: Conch validates "
            "files at upload and a job's knobs against them at creation, so a job starts queued"
        ),
    ] = None,
) -> JobList:
    return service.list_jobs(
        session, principal.tenant_id, after=after, limit=limit, status=status, metadata=_metadata_filter(request)
    )


@router.get("/{job_id}", response_model=JobOut, summary="Retrieve a fine-tuning job")
def retrieve_job(job_id: str, session: SessionDep, principal: PrincipalDep) -> JobOut:
    return service.job_out(service.get_job(session, principal.tenant_id, job_id))


@router.post("/{job_id}/cancel", response_model=JobOut, summary="Cancel a fine-tuning job")
def cancel_job(job_id: str, session: SessionDep, principal: PrincipalDep) -> JobOut:
    return service.job_out(service.cancel_job(session, principal.tenant_id, job_id))


@router.get("/{job_id}/events", response_model=EventList, summary="List a job's events, newest first")
def list_events(
    job_id: str, session: SessionDep, principal: PrincipalDep, limit: EventsLimit, after: After = None
) -> EventList:
    return service.list_events(session, principal.tenant_id, job_id, after=after, limit=limit)


def _poll(job_uuid: Any, cursor: int) -> tuple[list[dict[str, Any]], int, bool]:
    with session_scope() as session:
        events, cursor, ended = service.events_since(session, job_uuid, cursor)
    return [e.model_dump(mode="json") for e in events], cursor, ended


@router.get(
    "/{job_id}/events/stream",
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-sent events"}},
    summary="Follow a job's events live (SSE), oldest first, until the job ends",
)
def stream_events(
    job_id: str,
    request: Request,
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    after: After = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=128)] = None,
    poll_seconds: Annotated[
        float | None,
        Query(
            ge=0.1,
            le=60.0,
            description="how often to look for new events; never more often than EVENT_STREAM_POLL_SECONDS",
        ),
    ] = None,
) -> EventSourceResponse:
    job = service.get_job(session, principal.tenant_id, job_id)
    job_uuid = job.id
    # A reconnecting EventSource sends Last-Event-ID; it wins over the query parameter.
    start = service.start_cursor(last_event_id or after)
    # A client may poll less often than the setting, never more: each poll is a database query.
    interval = max(poll_seconds or 0.0, settings.event_stream_poll_seconds)
    identity = f"key:{principal.key_id}" if principal.key_id else f"addr:{client_address(request.client)}"
    slot = registry_for(request.app).acquire(identity, settings.event_streams_per_key)

    async def events() -> AsyncIterator[ServerSentEvent]:
        try:
            cursor = start
            while True:
                # Only the query itself runs in the threadpool; the wait between polls holds no thread.
                batch, cursor, ended = await run_in_threadpool(_poll, job_uuid, cursor)
                for event in batch:
                    yield ServerSentEvent(data=json.dumps(event), id=event["id"], event=event["object"])
                if ended:
                    yield ServerSentEvent(data="[DONE]", event="done")
                    return
                if not batch:
                    await anyio.sleep(interval)
        finally:
            slot.release()

    # The stream runs after this function returns, so it reads with its own short sessions, not the request's.
    # The background task gives the slot back too, for a stream cut off before its first poll (release is
    # idempotent).
    return EventSourceResponse(events(), ping=STREAM_PING_SECONDS, background=BackgroundTask(slot.release))


@router.get("/{job_id}/checkpoints", response_model=CheckpointList, summary="List a job's checkpoints")
def list_checkpoints(
    job_id: str, session: SessionDep, principal: PrincipalDep, limit: CheckpointsLimit, after: After = None
) -> CheckpointList:
    return service.list_checkpoints(session, principal.tenant_id, job_id, after=after, limit=limit)
