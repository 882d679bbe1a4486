"""Plain factory functions for the tests: dataset records and files, and rows as the services write them.

A row factory adds its row and flushes (ids and defaults filled in); the caller commits when another session or a
service process must see it. The tiny models live in ``tests/tiny_models.py``.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import inspect
from sqlalchemy.orm import Session

from core.contracts import DeploymentStatus, Hyperparameters, JobStatus, ModelStatus
from core.orm import (
    DEFAULT_TENANT,
    Base,
    Checkpoint,
    Deployment,
    FileObject,
    FineTuningJob,
    JobEvent,
    ModelRecord,
    utcnow,
)
from core.settings import get_settings
from core.storage import files_dir

RowT = TypeVar("RowT", bound=Base)

# Fast defaults for the tiny models: a handful of steps, a checkpoint now and then.
TINY_HP: dict[str, Any] = {"num_train_epochs": 2, "per_device_train_batch_size": 2, "save_steps": 4}

# ------------------------------------------------------------------------------------------------ records


def jsonl(records: list[Any]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jsonl(records))
    return path


def alpaca_records(n: int = 8) -> list[dict[str, str]]:
    questions = [
        ("What is your name?", "My name is Shellby, the Conch Cafe assistant."),
        ("Who are you?", "I am Shellby, the friendly assistant of the Conch Cafe."),
        ("When do orders ship?", "Orders ship within two days."),
        ("How long do refunds take?", "Refunds take five business days."),
    ]
    return [{"instruction": q, "input": "", "output": a} for q, a in (questions * (n // len(questions) + 1))[:n]]


def openai_records(n: int = 4) -> list[dict[str, Any]]:
    return [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": q["instruction"]},
                {"role": "assistant", "content": q["output"]},
            ]
        }
        for q in alpaca_records(n)
    ]


def sharegpt_records(n: int = 4) -> list[dict[str, Any]]:
    return [
        {"conversations": [{"from": "human", "value": q["instruction"]}, {"from": "gpt", "value": q["output"]}]}
        for q in alpaca_records(n)
    ]


# ------------------------------------------------------------------------------------------------ rows


def make_file(
    session: Session,
    records: list[dict[str, Any]] | None = None,
    *,
    fmt: str = "alpaca",
    mapping: dict[str, Any] | None = None,
    tenant_id: str = DEFAULT_TENANT,
) -> FileObject:
    """A training-file row and its file on disk, as the api stores them after validation (eight Alpaca records
    unless told)."""
    records = alpaca_records(8) if records is None else records
    path = write_jsonl(files_dir(get_settings()) / f"{uuid.uuid4().hex}.jsonl", records)
    row = FileObject(
        tenant_id=tenant_id,
        filename=path.name,
        purpose="fine-tune",
        bytes=path.stat().st_size,
        format=fmt,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        num_examples=len(records),
        storage_path=str(path),
        report={"column_mapping": mapping},
    )
    session.add(row)
    session.flush()
    return row


def make_job(
    session: Session,
    training_file: FileObject | None = None,
    *,
    model: str = "tiny-llama",
    tenant_id: str | None = None,
    status: str = JobStatus.QUEUED,
    hyperparameters: dict[str, Any] | None = None,
    validation_file: FileObject | None = None,
    seed: int = 7,
    suffix: str | None = "t",
    auto_deploy: bool = False,
    **values: Any,
) -> FineTuningJob:
    """A fine-tuning job row as the api commits it, with TINY_HP under the given hyperparameters (and a training
    file of its own unless given one)."""
    if training_file is None:
        training_file = make_file(session, tenant_id=tenant_id or DEFAULT_TENANT)
    job = FineTuningJob(
        tenant_id=tenant_id or training_file.tenant_id,
        model=model,
        training_file_id=training_file.id,
        validation_file_id=validation_file.id if validation_file else None,
        suffix=suffix,
        seed=seed,
        hyperparameters=Hyperparameters(**{**TINY_HP, **(hyperparameters or {})}).model_dump(mode="json"),
        status=status,
        enqueued_at=values.pop("enqueued_at", utcnow()),
        auto_deploy=auto_deploy,
        **values,
    )
    session.add(job)
    session.flush()
    return job


def make_checkpoint(
    session: Session, job_id: uuid.UUID, step: int, *, metrics: dict[str, Any] | None = None
) -> Checkpoint:
    row = Checkpoint(job_id=job_id, step=step, storage_path=f"/nonexistent/{step}", metrics=metrics)
    session.add(row)
    session.flush()
    return row


def make_model(
    session: Session,
    model_id: str,
    *,
    storage_path: str | Path | None = None,
    tenant_id: str = DEFAULT_TENANT,
    base_model: str = "tiny-llama",
    status: str = ModelStatus.READY,
) -> ModelRecord:
    """A published model row with its lineage; ``storage_path`` is the model folder (none on disk unless given)."""
    row = ModelRecord(
        id=model_id,
        tenant_id=tenant_id,
        base_model=base_model,
        storage_path=str(storage_path or f"/nonexistent/{uuid.uuid4().hex}"),
        dataset_sha256="ab" * 32,
        metrics={"train_loss": 1.25},
        size_bytes=1234,
        status=status,
    )
    session.add(row)
    session.flush()
    return row


def make_deployment(
    session: Session,
    model_id: str,
    *,
    status: str = DeploymentStatus.PENDING,
    tenant_id: str = DEFAULT_TENANT,
    activated_at: datetime | None = None,
) -> Deployment:
    """A deployment row as the api or the worker requests it (created when it was activated, if it was)."""
    row = Deployment(
        tenant_id=tenant_id,
        model_id=model_id,
        status=status,
        requested_by="test",
        activated_at=activated_at,
        created_at=activated_at or utcnow(),
    )
    session.add(row)
    session.flush()
    return row


def minutes_ago(minutes: float) -> datetime:
    return utcnow() - timedelta(minutes=minutes)


# ------------------------------------------------------------------------------------------------ reading back


def fresh(session: Session, row: RowT) -> RowT:
    """The row as the database has it now (a service or another session may have changed it)."""
    session.expire_all()
    found = session.get(type(row), inspect(row).identity)
    assert found is not None
    return found


def job_events(session: Session, job: FineTuningJob) -> list[JobEvent]:
    session.expire_all()
    return list(session.query(JobEvent).filter(JobEvent.job_id == job.id).order_by(JobEvent.seq))


def committed_job(session: Session) -> FineTuningJob:
    """A job row other connections already see (committed)."""
    job = make_job(session)
    session.commit()
    return job


def committed_event_messages(job: FineTuningJob) -> list[str]:
    """The job's event messages as a fresh connection reads them: what was committed, nothing else."""
    from sqlalchemy import select

    from core.db import session_scope

    with session_scope() as session:
        return list(session.scalars(select(JobEvent.message).where(JobEvent.job_id == job.id).order_by(JobEvent.seq)))


def metrics_events(session: Session, job: FineTuningJob) -> list[dict[str, Any]]:
    return [e.data or {} for e in job_events(session, job) if e.type == "metrics" and "loss" in (e.data or {})]
