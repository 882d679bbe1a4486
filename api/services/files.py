"""Datasets: validate an upload, keep it under a generated name, list, read and delete it per tenant."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from api.db import on_commit, on_rollback
from api.http.uploads import FILE_FIELD, Upload
from api.schemas import FileDeleted, FileList, FileOut
from api.services.common import cursor_page, unix_required, unknown_cursor
from core.contracts import LIVE_STATUSES, FileStatus
from core.datasets import FORMATS, ColumnMapping, DatasetReport, Format
from core.errors import Conflict, InvalidRequest, NotFound, RateLimited, ValidationFailed
from core.ids import Prefix, parse_public_id
from core.jobs import LOCK_NAMESPACE, is_postgres
from core.orm import FileObject, FineTuningJob
from core.settings import Settings

PURPOSE = "fine-tune"
# Written by the worker when a job succeeds (never uploaded): step_metrics.csv and loss_curve.png.
RESULTS_PURPOSE = "fine-tune-results"
# Result files are served as what they are (a browser shows the picture); datasets as plain bytes.
_RESULT_MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "png": "image/png"}
ACCEPTED_FIELDS = frozenset({FILE_FIELD, "purpose", "format", "column_mapping"})
# Soft-deleted rows stay while a finished job still names them (the foreign key keeps lineage intact).
DELETED = "deleted"
MAX_FILENAME_CHARS = 255
# Second key (hashed with the tenant) of the advisory lock that serialises one tenant's quota decisions.
FILES_LOCK = "files:"


@dataclass(frozen=True)
class UploadOptions:
    purpose: str
    format: Format | None
    mapping: ColumnMapping | None


def upload_options(fields: dict[str, str]) -> UploadOptions:
    """Check the text fields sent with the file: ``purpose``, optional ``format`` and ``column_mapping``."""
    unknown = sorted(set(fields) - ACCEPTED_FIELDS)
    if unknown:
        raise ValidationFailed(
            f"{unknown[0]}: this field is not accepted here", param=unknown[0], code="extra_forbidden"
        )
    purpose = fields.get("purpose")
    if purpose is None:
        raise ValidationFailed("purpose: Field required", param="purpose", code="missing")
    if purpose != PURPOSE:
        raise ValidationFailed(f"purpose must be '{PURPOSE}'", param="purpose", code="invalid_value")
    fmt = fields.get("format") or None
    if fmt is not None and fmt not in FORMATS:
        raise ValidationFailed(f"format must be one of {', '.join(FORMATS)}", param="format", code="invalid_value")
    mapping = None
    raw_mapping = fields.get("column_mapping")
    if raw_mapping:
        try:
            mapping = ColumnMapping.from_json(json.loads(raw_mapping))
        except (ValueError, RecursionError) as exc:
            # json.JSONDecodeError is a ValueError; RecursionError is absurdly deep nesting.
            message = str(exc) if not isinstance(exc, RecursionError) else "nested too deeply"
            raise ValidationFailed(
                f"column_mapping is not a valid dataset_info entry: {message}", param="column_mapping"
            ) from exc
        if fmt is not None and mapping.formatting is not None and mapping.formatting != fmt:
            raise ValidationFailed("format and column_mapping.formatting disagree", param="column_mapping")
    return UploadOptions(purpose=purpose, format=cast(Format | None, fmt), mapping=mapping)


def check_filename(filename: str) -> str:
    """The client's name for the file, kept for display only. Path parts or control characters are refused: a
    legitimate client sends a bare name, and the bytes are stored under a generated name anyway."""
    if not filename.strip():
        raise InvalidRequest("The file needs a name.", param=FILE_FIELD, code="invalid_filename")
    if "/" in filename or "\\" in filename or filename in (".", ".."):
        raise InvalidRequest(
            "The filename must not contain path components.", param=FILE_FIELD, code="invalid_filename"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in filename):
        raise InvalidRequest(
            "The filename must not contain control characters.", param=FILE_FIELD, code="invalid_filename"
        )
    if len(filename) > MAX_FILENAME_CHARS:
        raise InvalidRequest(
            f"The filename is longer than {MAX_FILENAME_CHARS} characters.", param=FILE_FIELD, code="invalid_filename"
        )
    return filename


def invalid_dataset(report: DatasetReport) -> InvalidRequest:
    """A 400 that says where the first problem is and carries the whole report."""
    first = report.errors[0] if report.errors else {}
    where = ""
    if "line" in first:
        where = f"line {first['line']}: "
    elif "index" in first:
        where = f"index {first['index']}: "
    message = f"The file is not a valid dataset: {where}{first.get('message', 'no examples')}"
    if report.num_errors > 1:
        message += f" ({report.num_errors - 1} more errors in the report)"
    return InvalidRequest(
        message,
        param=first.get("field") or FILE_FIELD,
        code="invalid_file",
        extra={"report": report.to_json()},
    )


@dataclass(frozen=True)
class FileUsage:
    files: int
    bytes: int


def file_usage(session: Session, tenant_id: str) -> FileUsage:
    """What a tenant has uploaded and still stores. A deleted file (its bytes are gone) no longer counts, nor do
    jobs' result files: they are small, written by the worker, and must not stop a tenant's uploads."""
    count, total = session.execute(
        select(func.count(), func.coalesce(func.sum(FileObject.bytes), 0)).where(
            FileObject.tenant_id == tenant_id, FileObject.status != DELETED, FileObject.purpose == PURPOSE
        )
    ).one()
    return FileUsage(files=int(count), bytes=int(total))


def lock_tenant_files(session: Session, tenant_id: str) -> None:
    """Serialise, until this transaction ends, one tenant's uploads at the point they are counted against the
    quota: without it two uploads at once each count the tenant's files without the other's and both pass.
    SQLite needs nothing: it runs one writing transaction at a time."""
    if is_postgres(session):
        session.execute(select(func.pg_advisory_xact_lock(LOCK_NAMESPACE, func.hashtext(FILES_LOCK + tenant_id))))


def check_quota(session: Session, tenant_id: str, size: int, settings: Settings) -> None:
    """Refuse (429, like the other per-tenant caps) an upload that would take the tenant past
    MAX_FILES_PER_TENANT files or MAX_FILE_BYTES_PER_TENANT bytes; deleting files frees room."""
    usage = file_usage(session, tenant_id)
    if usage.files >= settings.max_files_per_tenant:
        raise RateLimited(
            f"File quota reached: {usage.files} files stored, the limit is {settings.max_files_per_tenant} "
            "(MAX_FILES_PER_TENANT); delete files to upload more.",
            param=FILE_FIELD,
            code="file_count_quota_exceeded",
        )
    if usage.bytes + size > settings.max_file_bytes_per_tenant:
        raise RateLimited(
            f"Storage quota reached: {usage.bytes} bytes stored and this file has {size}, the limit is "
            f"{settings.max_file_bytes_per_tenant} bytes (MAX_FILE_BYTES_PER_TENANT); delete files to upload more.",
            param=FILE_FIELD,
            code="file_bytes_quota_exceeded",
        )


def store_file(
    session: Session,
    *,
    tenant_id: str,
    upload: Upload,
    options: UploadOptions,
    report: DatasetReport,
    folder: Path,
    settings: Settings,
) -> FileObject:
    """Move the validated upload to its final name and add its row; the bytes go away if the row is rolled back.
    The quota is checked here under the tenant's lock (held until the row commits), before anything is written."""
    lock_tenant_files(session, tenant_id)
    check_quota(session, tenant_id, upload.size, settings)
    file_id = uuid.uuid4()
    final = folder / f"{file_id.hex}.{report.container}"
    os.replace(upload.path, final)
    on_rollback(session, lambda: final.unlink(missing_ok=True))
    validation = report.to_json()
    # The worker reads the mapping back from here to parse the file the way it was validated.
    validation["column_mapping"] = options.mapping.to_json() if options.mapping else None
    row = FileObject(
        id=file_id,
        tenant_id=tenant_id,
        filename=upload.filename,
        purpose=options.purpose,
        bytes=upload.size,
        format=report.format or "unknown",
        sha256=upload.sha256,
        num_examples=report.num_examples,
        storage_path=str(final),
        status=FileStatus.PROCESSED,
        report=validation,
    )
    session.add(row)
    session.flush()
    return row


def file_out(row: FileObject) -> FileOut:
    return FileOut(
        id=row.public_id,
        bytes=row.bytes,
        created_at=unix_required(row.created_at),
        filename=row.filename,
        purpose=row.purpose,
        status=row.status,
        format=row.format,
        num_examples=row.num_examples,
        sha256=row.sha256,
        validation=row.report,
    )


def get_file(session: Session, tenant_id: str, public_id: str, *, lock: bool = False) -> FileObject:
    file_id = parse_public_id(public_id, Prefix.FILE)
    row = None
    if file_id is not None:
        stmt = select(FileObject).where(
            FileObject.id == file_id, FileObject.tenant_id == tenant_id, FileObject.status != DELETED
        )
        if lock:
            stmt = stmt.with_for_update()
        row = session.scalars(stmt).first()
    if row is None:
        raise NotFound(f"No such file: {public_id}", param="file_id")
    return row


def list_files(
    session: Session, tenant_id: str, *, after: str | None, limit: int, purpose: str | None, descending: bool
) -> FileList:
    stmt = select(FileObject).where(FileObject.tenant_id == tenant_id, FileObject.status != DELETED)
    if purpose:
        stmt = stmt.where(FileObject.purpose == purpose)
    cursor: tuple[Any, ...] | None = None
    if after:
        try:
            anchor = get_file(session, tenant_id, after)
        except NotFound as exc:
            raise unknown_cursor(after) from exc
        cursor = (anchor.created_at, anchor.id)
    rows, has_more = cursor_page(
        session, stmt, keys=[FileObject.created_at, FileObject.id], after=cursor, limit=limit, descending=descending
    )
    data = [file_out(r) for r in rows]
    return FileList(
        data=data,
        has_more=has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


def media_type(row: FileObject) -> str:
    if row.purpose == RESULTS_PURPOSE:
        return _RESULT_MEDIA_TYPES.get(row.format, "application/octet-stream")
    return "application/octet-stream"


def _drop_from_results(session: Session, row: FileObject) -> None:
    """A deleted result file leaves its job's ``result_files`` too (the job row is locked while it changes)."""
    job_id = parse_public_id(str((row.report or {}).get("fine_tuning_job_id") or ""), Prefix.JOB)
    if job_id is None:
        return
    job = session.scalars(
        select(FineTuningJob)
        .where(FineTuningJob.id == job_id, FineTuningJob.tenant_id == row.tenant_id)
        .with_for_update()
    ).first()
    if job is not None and job.result_files:
        job.result_files = [file_id for file_id in job.result_files if file_id != row.public_id]


def content_path(row: FileObject) -> Path:
    path = Path(row.storage_path)
    if not path.is_file():
        raise NotFound(f"The content of {row.public_id} is no longer stored.", param="file_id")
    return path


def delete_file(session: Session, tenant_id: str, public_id: str) -> FileDeleted:
    # The row lock serialises with job creation, which locks the file it names: a job created concurrently is
    # either visible here (409) or refused there (file gone).
    row = get_file(session, tenant_id, public_id, lock=True)
    users = session.scalars(
        select(FineTuningJob.status).where(
            or_(FineTuningJob.training_file_id == row.id, FineTuningJob.validation_file_id == row.id)
        )
    ).all()
    if any(status in LIVE_STATUSES for status in users):
        raise Conflict(f"{public_id} is used by a fine-tuning job that has not finished.", param="file_id")
    path = Path(row.storage_path)
    if row.purpose == RESULTS_PURPOSE:
        _drop_from_results(session, row)
    if users:
        row.status = DELETED
    else:
        session.delete(row)
    on_commit(session, lambda: path.unlink(missing_ok=True))
    return FileDeleted(id=public_id, deleted=True)
