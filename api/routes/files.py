"""``/v1/files``: upload (multipart, streamed), list, retrieve, content, delete."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from api.deps import After, FilesLimit, IdempotencyKey, PrincipalDep, SessionDep, SettingsDep
from api.http import idempotency
from api.http.uploads import check_declared_length, receive_upload
from api.schemas import ERROR_RESPONSES, FileDeleted, FileList, FileOut
from api.services import files as service
from core.datasets import JSON_TOO_LARGE, ColumnMapping, DatasetLimits, scan_dataset
from core.errors import PayloadTooLarge
from core.storage import files_dir

router = APIRouter(prefix="/v1/files", tags=["files"], responses=ERROR_RESPONSES)

_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "JSON array or JSONL"},
                        "purpose": {"type": "string", "enum": ["fine-tune"]},
                        "format": {"type": "string", "enum": ["alpaca", "sharegpt", "openai"]},
                        "column_mapping": {
                            "type": "string",
                            "description": "JSON object shaped like a LLaMA-Factory dataset_info.json entry",
                        },
                    },
                }
            }
        },
    }
}


@router.post(
    "",
    response_model=FileOut,
    openapi_extra=_UPLOAD_BODY,
    responses={
        413: {"description": "File larger than MAX_UPLOAD_BYTES (a JSON array: MAX_JSON_ARRAY_BYTES)"},
        429: {"description": "Tenant's file quota (MAX_FILES_PER_TENANT, MAX_FILE_BYTES_PER_TENANT) reached"},
    },
    summary="Upload a dataset",
)
async def upload_file(
    request: Request,
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
) -> FileOut | JSONResponse:
    check_declared_length(request.headers.get("content-length"), settings.max_upload_bytes)
    folder = files_dir(settings)
    upload = await receive_upload(
        request.stream(),
        content_type=request.headers.get("content-type"),
        folder=folder,
        max_file_bytes=settings.max_upload_bytes,
    )
    try:
        filename = service.check_filename(upload.filename)
        options = service.upload_options(upload.fields)
        route = f"POST {request.url.path}"
        req_hash = idempotency.request_hash({"sha256": upload.sha256, "filename": filename, **upload.fields})
        if idempotency_key:
            replay = await run_in_threadpool(
                idempotency.find_replay,
                session,
                tenant_id=principal.tenant_id,
                key=idempotency_key,
                route=route,
                req_hash=req_hash,
            )
            if replay is not None:
                return replay.response()
        # A first look without the lock, so an upload past the quota is refused before it is scanned; the
        # decisive check is store_file's, under the tenant's lock.
        await run_in_threadpool(service.check_quota, session, principal.tenant_id, upload.size, settings)
        report, _ = await run_in_threadpool(
            scan_dataset,
            upload.path,
            fmt=options.format,
            mapping=options.mapping or ColumnMapping(),
            limits=DatasetLimits.from_settings(settings),
        )
        if report.error_counts.get(JSON_TOO_LARGE):
            # Refused for its size, like an upload over MAX_UPLOAD_BYTES: a 413 that names the file.
            raise PayloadTooLarge(
                f"A JSON-array dataset may be at most {settings.max_json_array_bytes} bytes; "
                "send larger datasets as JSONL, one example per line.",
                param="file",
            )
        if not report.ok:
            raise service.invalid_dataset(report)
        row = await run_in_threadpool(
            service.store_file,
            session,
            tenant_id=principal.tenant_id,
            upload=upload,
            options=options,
            report=report,
            folder=folder,
            settings=settings,
        )
        out = service.file_out(row)
        if idempotency_key:
            await run_in_threadpool(
                idempotency.remember,
                session,
                tenant_id=principal.tenant_id,
                key=idempotency_key,
                route=route,
                req_hash=req_hash,
                body=out.model_dump(mode="json"),
            )
        return out
    finally:
        upload.discard()  # a no-op once the file was moved to its final name


@router.get("", response_model=FileList, summary="List files")
def list_files(
    session: SessionDep,
    principal: PrincipalDep,
    limit: FilesLimit,
    after: After = None,
    purpose: Annotated[str | None, Query(max_length=32)] = None,
    order: Literal["asc", "desc"] = "desc",
) -> FileList:
    return service.list_files(
        session, principal.tenant_id, after=after, limit=limit, purpose=purpose, descending=order == "desc"
    )


@router.get("/{file_id}", response_model=FileOut, summary="Retrieve a file")
def retrieve_file(file_id: str, session: SessionDep, principal: PrincipalDep) -> FileOut:
    return service.file_out(service.get_file(session, principal.tenant_id, file_id))


@router.get(
    "/{file_id}/content",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"application/octet-stream": {}, "text/csv": {}, "image/png": {}},
            "description": "The file's bytes: a dataset as uploaded, or a job's result file (CSV or PNG)",
        }
    },
    summary="Download a file's content",
)
def file_content(file_id: str, session: SessionDep, principal: PrincipalDep) -> FileResponse:
    row = service.get_file(session, principal.tenant_id, file_id)
    # FileResponse streams the file in chunks; it is never read whole into memory.
    return FileResponse(service.content_path(row), media_type=service.media_type(row), filename=row.filename)


@router.delete("/{file_id}", response_model=FileDeleted, summary="Delete a file")
def delete_file(file_id: str, session: SessionDep, principal: PrincipalDep) -> FileDeleted:
    return service.delete_file(session, principal.tenant_id, file_id)
