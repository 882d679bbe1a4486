"""Fine-tuning jobs: create (commit, then ring the broker), read, list, cancel, events and checkpoints."""

from __future__ import annotations

import logging
import secrets
import uuid
from datetime import timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import ColumnElement, exists, func, select
from sqlalchemy.orm import Session

from api.db import on_commit
from api.schemas import (
    MAX_METADATA_KEY_CHARS,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE_CHARS,
    CheckpointList,
    CheckpointOut,
    DpoOut,
    EventList,
    EventOut,
    JobCreate,
    JobError,
    JobList,
    JobOut,
    MethodOut,
    SupervisedOut,
)
from api.services import hyperparameters as hparams
from api.services.common import cursor_page, unix, unix_required, unknown_cursor
from api.services.files import DELETED, PURPOSE
from api.services.models import start_model_base
from api.services.placement import place_job
from api.services.servability import check_servable
from core.contracts import TERMINAL_STATUSES, Hyperparameters, JobStatus, fine_tuned_model_id
from core.datasets import is_preference_format
from core.errors import Conflict, InvalidRequest, NotFound, RateLimited
from core.ids import Prefix, parse_event_id, parse_public_id, public_id
from core.jobs import add_event, db_now, lock_tenant, request_cancel
from core.orm import Checkpoint, FileObject, FineTuningJob, JobEvent
from core.queue import enqueue_fine_tune
from core.settings import Settings

log = logging.getLogger("conch.api.jobs")

_LEVELS = {"warning": "warn", "warn": "warn", "error": "error", "critical": "error"}


# ------------------------------------------------------------------------------------------------ create


def _training_file(session: Session, tenant_id: str, public_id: str, param: str) -> FileObject:
    file_id = parse_public_id(public_id, Prefix.FILE)
    row = None
    if file_id is not None:
        # FOR SHARE: a concurrent DELETE of this file waits for this transaction and then sees the job.
        row = session.scalars(
            select(FileObject)
            .where(FileObject.id == file_id, FileObject.tenant_id == tenant_id, FileObject.status != DELETED)
            .with_for_update(read=True)
        ).first()
    if row is None:
        raise InvalidRequest(f"No such file: {public_id}", param=param, code="file_not_found")
    if row.purpose != PURPOSE:
        raise InvalidRequest(f"{public_id} was not uploaded for fine-tuning.", param=param, code="invalid_file")
    return row


def _hyperparameters(body: JobCreate, settings: Settings) -> hparams.Resolved:
    method = body.method.type if body.method else "supervised"
    other = "dpo" if method == "supervised" else "supervised"
    if body.method is not None and getattr(body.method, other) is not None:
        raise InvalidRequest(
            f"method.{other} does not go with method.type '{method}'; send method.{method} instead.",
            param=f"method.{other}",
            code="conflicting_parameters",
        )
    section = (body.method.dpo if method == "dpo" else body.method.supervised) if body.method else None
    in_method = section.hyperparameters if section else None
    if body.hyperparameters is not None and in_method is not None:
        raise InvalidRequest(
            f"Send hyperparameters either at the top level or under method.{method}, not both.",
            param="hyperparameters",
            code="conflicting_parameters",
        )
    if in_method is not None:
        return hparams.resolve(
            in_method, param_prefix=f"method.{method}.hyperparameters", settings=settings, method=method
        )
    return hparams.resolve(body.hyperparameters, param_prefix="hyperparameters", settings=settings, method=method)


def _check_file_kind(row: FileObject, method: str, param: str) -> None:
    """DPO trains on preference pairs and supervised fine-tuning on conversations; the upload's validation named
    which of the two a file holds."""
    preference = is_preference_format(row.format)
    if preference == (method == "dpo"):
        return
    if preference:
        message = (
            f"{row.public_id} holds preference pairs ({row.format}); they train method.type 'dpo', not "
            f"'{method}'. Upload conversations (OpenAI chat, Alpaca or ShareGPT) for supervised fine-tuning."
        )
    else:
        message = (
            f"{row.public_id} holds conversations ({row.format}); method.type 'dpo' needs preference pairs: "
            "OpenAI's input/preferred_output/non_preferred_output, or Alpaca or ShareGPT with chosen/rejected."
        )
    raise InvalidRequest(message, param=param, code="invalid_file_kind")


def _check_queued_cap(session: Session, tenant_id: str, settings: Settings) -> None:
    """One tenant's backlog must not crowd out everyone else's: at most MAX_QUEUED_JOBS_PER_TENANT waiting jobs.
    Counted under the tenant's lock, so concurrent creations cannot all slip under the cap."""
    lock_tenant(session, tenant_id)
    waiting = session.execute(
        select(func.count())
        .select_from(FineTuningJob)
        .where(
            FineTuningJob.tenant_id == tenant_id,
            FineTuningJob.status.in_([JobStatus.QUEUED, JobStatus.VALIDATING_FILES]),
        )
    ).scalar_one()
    if waiting >= settings.max_queued_jobs_per_tenant:
        raise RateLimited(
            f"Too many jobs waiting to run ({waiting}; the limit is {settings.max_queued_jobs_per_tenant}); "
            "create more once some have started, or cancel some.",
            code="too_many_queued_jobs",
        )


def create_job(session: Session, *, tenant_id: str, body: JobCreate, settings: Settings) -> FineTuningJob:
    # A base model, or a fine-tuned model or checkpoint of this tenant to continue; the root base names the result.
    base_model = start_model_base(session, tenant_id, body.model, settings)
    resolved = _hyperparameters(body, settings)
    hparams.check_lora_modules(resolved, base_model, settings)
    check_servable(
        session, resolved, base_model, settings
    )  # a fine-tune the serving engine would refuse is refused now
    training = _training_file(session, tenant_id, body.training_file, "training_file")
    validation = (
        _training_file(session, tenant_id, body.validation_file, "validation_file") if body.validation_file else None
    )
    _check_file_kind(training, resolved.hp.method, "training_file")
    if validation is not None:
        _check_file_kind(validation, resolved.hp.method, "validation_file")
    if validation is None:  # with a validation file the worker evaluates on it and holds nothing out
        hparams.check_val_size(resolved, training.num_examples)
    placement = place_job(session, resolved, base_model, body.device_class, settings)
    _check_queued_cap(session, tenant_id, settings)
    hp = resolved.hp
    now = db_now(session)  # the reconciler judges enqueued_at by the database's clock, not this host's
    job = FineTuningJob(
        id=uuid.uuid4(),
        tenant_id=tenant_id,
        model=body.model,
        base_model=base_model,
        device_class=placement.device_class,
        training_file_id=training.id,
        validation_file_id=validation.id if validation else None,
        suffix=body.suffix,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
        user_metadata=body.metadata,
        hyperparameters=hp.model_dump(mode="json"),
        auto_deploy=body.auto_deploy,
        # Files are validated at upload and the knobs against them above, so a new job is ready to run: it never
        # shows OpenAI's validating_files.
        status=JobStatus.QUEUED.value,
        enqueued_at=now,
        created_at=now,
        updated_at=now,
        attempts=0,
        cancel_requested=False,
    )
    session.add(job)
    session.flush()
    add_event(session, job.id, f"Created fine-tuning job: {job.public_id}", data={"status": JobStatus.QUEUED.value})
    for note in placement.notes:
        add_event(session, job.id, note, level="warning", data={"queue": placement.queue})
    public_id, device_class = job.public_id, placement.device_class
    on_commit(session, lambda: ring_broker(public_id, settings, device_class))
    log.info("job.created", extra={"job_id": public_id, "tenant_id": tenant_id, "model": body.model})
    return job


def ring_broker(public_id: str, settings: Settings, device_class: str | None = None) -> None:
    """After commit. A broker outage leaves the job queued in the database; the reconciler enqueues it later."""
    try:
        enqueue_fine_tune(public_id, settings, device_class)
    except Exception as exc:
        log.warning("job.enqueue_failed", extra={"job_id": public_id, "error_class": type(exc).__name__})


# ------------------------------------------------------------------------------------------------ read


def get_job(session: Session, tenant_id: str, public_id: str) -> FineTuningJob:
    job_id = parse_public_id(public_id, Prefix.JOB)
    job = None
    if job_id is not None:
        job = session.scalars(
            select(FineTuningJob).where(FineTuningJob.id == job_id, FineTuningJob.tenant_id == tenant_id)
        ).first()
    if job is None:
        raise NotFound(f"No such fine-tuning job: {public_id}", param="fine_tuning_job_id")
    return job


def model_name(job: FineTuningJob) -> str:
    """The fine-tuned model's id: ``ft:<base>:<suffix>:<job id>`` (the worker records the same on success)."""
    return job.fine_tuned_model or fine_tuned_model_id(job.base_model or job.model, job.suffix, job.public_id)


def _file_public_id(file_id: uuid.UUID | None) -> str | None:
    return public_id(Prefix.FILE, file_id) if file_id else None


def _error(raw: dict[str, Any] | None) -> JobError | None:
    if not raw:
        return None
    return JobError(code=str(raw.get("code") or "error"), message=str(raw.get("message") or ""), param=raw.get("param"))


def stored_hyperparameters(raw: dict[str, Any]) -> Hyperparameters:
    """The job's knobs as stored. A row written under an older schema must still be readable, so unknown keys are
    dropped and, failing validation, the stored values are taken as they are."""
    known = {k: v for k, v in raw.items() if k in Hyperparameters.model_fields}
    try:
        return Hyperparameters.model_validate(known)
    except ValidationError:
        return Hyperparameters.model_construct(**known)


def job_out(job: FineTuningJob) -> JobOut:
    hp = stored_hyperparameters(job.hyperparameters or {})
    openai_hp = hparams.openai_view(hp)
    estimated_finish = None
    eta = (job.progress or {}).get("eta_seconds")
    if job.status == JobStatus.RUNNING and isinstance(eta, int | float):
        estimated_finish = unix(job.updated_at + timedelta(seconds=float(eta)))
    return JobOut(
        id=job.public_id,
        model=job.model,
        created_at=unix_required(job.created_at),
        finished_at=unix(job.finished_at),
        fine_tuned_model=job.fine_tuned_model,
        organization_id=job.tenant_id,
        result_files=list(job.result_files or []),
        status=job.status,
        validation_file=_file_public_id(job.validation_file_id),
        training_file=_file_public_id(job.training_file_id) or "",
        hyperparameters=openai_hp,
        trained_tokens=job.trained_tokens,
        error=_error(job.error),
        seed=job.seed,
        metadata=job.user_metadata,
        method=(
            MethodOut(type="dpo", dpo=DpoOut(hyperparameters=hparams.dpo_view(hp)))
            if hp.method == "dpo"
            else MethodOut(supervised=SupervisedOut(hyperparameters=openai_hp))
        ),
        estimated_finish=estimated_finish,
        integrations=[],
        user_provided_suffix=job.suffix,
        stage=job.stage,
        progress=job.progress,
        metrics=job.metrics,
        attempts=job.attempts,
        auto_deploy=job.auto_deploy,
        conch_hyperparameters=hp.model_dump(mode="json"),
        device_class=job.device_class,
    )


def list_jobs(
    session: Session,
    tenant_id: str,
    *,
    after: str | None,
    limit: int,
    status: JobStatus | None,
    metadata: dict[str, str],
) -> JobList:
    stmt = select(FineTuningJob).where(FineTuningJob.tenant_id == tenant_id)
    if status is not None:
        stmt = stmt.where(FineTuningJob.status == status.value)
    check_metadata_filter(metadata)
    sqlite = session.get_bind().dialect.name == "sqlite"
    for key, value in metadata.items():
        stmt = stmt.where(_metadata_equals(key, value, sqlite=sqlite))
    cursor: tuple[Any, ...] | None = None
    if after:
        try:
            anchor = get_job(session, tenant_id, after)
        except NotFound as exc:
            raise unknown_cursor(after) from exc
        cursor = (anchor.created_at, anchor.id)
    rows, has_more = cursor_page(
        session, stmt, keys=[FineTuningJob.created_at, FineTuningJob.id], after=cursor, limit=limit
    )
    return JobList(data=[job_out(j) for j in rows], has_more=has_more)


def check_metadata_filter(metadata: dict[str, str]) -> None:
    """Filters beyond what a job can carry could never match; refusing them also keeps the query small."""
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidRequest(
            f"At most {MAX_METADATA_PAIRS} metadata[key] filters (a job carries at most {MAX_METADATA_PAIRS} pairs).",
            param="metadata",
            code="too_many_metadata_filters",
        )
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY_CHARS or len(value) > MAX_METADATA_VALUE_CHARS:
            raise InvalidRequest(
                f"metadata[{key[:MAX_METADATA_KEY_CHARS]}]: keys are 1-{MAX_METADATA_KEY_CHARS} characters and "
                f"values at most {MAX_METADATA_VALUE_CHARS}.",
                param=f"metadata[{key[:MAX_METADATA_KEY_CHARS]}]",
                code="invalid_metadata_filter",
            )


def _metadata_equals(key: str, value: str, *, sqlite: bool) -> ColumnElement[bool]:
    """The job's metadata has ``key`` set to ``value``, whatever characters the key holds.

    Postgres takes the key as a bound parameter (``->>``). SQLite's JSON functions take a path, which a key
    with quotes or dots cannot be spelled in safely, so there the key is compared as a value of ``json_each``.
    """
    if not sqlite:
        return FineTuningJob.user_metadata[key].as_string() == value
    pairs = func.json_each(FineTuningJob.user_metadata).table_valued("key", "value", "type")
    return exists(
        select(1).select_from(pairs).where(pairs.c.key == key, pairs.c.type == "text", pairs.c.value == value)
    )


def cancel_job(session: Session, tenant_id: str, public_id: str) -> FineTuningJob:
    job = get_job(session, tenant_id, public_id)
    if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        raise Conflict(f"{public_id} has already {job.status}; there is nothing to cancel.", code="job_finished")
    accepted = request_cancel(session, job.id)
    session.flush()
    session.refresh(job)
    if not accepted and job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        # It ended between the check above and the update: a publish that committed is past the point of no return.
        raise Conflict(f"{public_id} has already {job.status}; there is nothing to cancel.", code="job_finished")
    log.info("job.cancel_requested", extra={"job_id": public_id, "status": job.status})
    return job


# ------------------------------------------------------------------------------------------------ events


def event_out(event: JobEvent) -> EventOut:
    return EventOut(
        id=event.public_id,
        created_at=unix_required(event.created_at),
        level=_LEVELS.get(event.level, "info"),  # type: ignore[arg-type]
        message=event.message,
        type="metrics" if event.type == "metrics" else "message",
        data=event.data,
    )


def list_events(session: Session, tenant_id: str, public_id: str, *, after: str | None, limit: int) -> EventList:
    job = get_job(session, tenant_id, public_id)
    cursor: tuple[Any, ...] | None = None
    if after:
        seq = parse_event_id(after)
        if seq is None:
            raise unknown_cursor(after)
        cursor = (seq,)
    rows, has_more = cursor_page(
        session, select(JobEvent).where(JobEvent.job_id == job.id), keys=[JobEvent.seq], after=cursor, limit=limit
    )
    return EventList(data=[event_out(e) for e in rows], has_more=has_more)


def start_cursor(after: str | None) -> int:
    """Where an event stream starts: after an event id (``after`` or ``Last-Event-ID``), or at the beginning."""
    if not after:
        return 0
    seq = parse_event_id(after)
    if seq is None:
        raise unknown_cursor(after)
    return seq


def events_since(session: Session, job_id: uuid.UUID, seq: int, limit: int = 200) -> tuple[list[EventOut], int, bool]:
    """New events oldest first, the cursor after them, and whether the job had ended before they were read."""
    # Read the status first: a job's terminal status and its last event commit together, so once the status
    # reads terminal, the events read next include the last one.
    status = session.scalars(select(FineTuningJob.status).where(FineTuningJob.id == job_id)).first()
    rows = list(
        session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > seq).order_by(JobEvent.seq).limit(limit)
        )
    )
    last = rows[-1].seq if rows else seq
    ended = status is None or status in TERMINAL_STATUSES
    return [event_out(e) for e in rows], last, ended and len(rows) < limit


# ------------------------------------------------------------------------------------------------ checkpoints


def checkpoint_out(job: FineTuningJob, checkpoint: Checkpoint) -> CheckpointOut:
    metrics = {"step": checkpoint.step, **(checkpoint.metrics or {})}
    return CheckpointOut(
        id=checkpoint.public_id,
        created_at=unix_required(checkpoint.created_at),
        fine_tuned_model_checkpoint=f"{model_name(job)}:ckpt-step-{checkpoint.step}",
        step_number=checkpoint.step,
        metrics=metrics,
        fine_tuning_job_id=job.public_id,
    )


def list_checkpoints(
    session: Session, tenant_id: str, public_id: str, *, after: str | None, limit: int
) -> CheckpointList:
    job = get_job(session, tenant_id, public_id)
    cursor: tuple[Any, ...] | None = None
    if after:
        ckpt_id = parse_public_id(after, Prefix.CHECKPOINT)
        anchor = (
            session.scalars(select(Checkpoint).where(Checkpoint.id == ckpt_id, Checkpoint.job_id == job.id)).first()
            if ckpt_id
            else None
        )
        if anchor is None:
            raise unknown_cursor(after)
        cursor = (anchor.step,)
    rows, has_more = cursor_page(
        session,
        select(Checkpoint).where(Checkpoint.job_id == job.id),
        keys=[Checkpoint.step],
        after=cursor,
        limit=limit,
    )
    data = [checkpoint_out(job, c) for c in rows]
    return CheckpointList(
        data=data, has_more=has_more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )
