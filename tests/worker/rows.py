"""Row factories for worker tests: a dataset file and a job, inserted the way the api commits them."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from core.contracts import Hyperparameters, JobStatus
from core.orm import FileObject, FineTuningJob, JobEvent, utcnow
from core.settings import get_settings
from core.storage import files_dir

# Fast defaults for the tiny models: a handful of steps, a checkpoint now and then.
TINY_HP: dict[str, Any] = {"num_train_epochs": 2, "per_device_train_batch_size": 2, "save_steps": 4}


def dataset_file(
    session: Session,
    records: list[dict[str, Any]],
    *,
    fmt: str = "alpaca",
    mapping: dict[str, Any] | None = None,
    tenant_id: str = "default",
) -> FileObject:
    path = files_dir(get_settings()) / f"{uuid.uuid4().hex}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
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


def job_row(
    session: Session,
    training_file: FileObject,
    *,
    model: str = "tiny-llama",
    hyperparameters: dict[str, Any] | None = None,
    validation_file: FileObject | None = None,
    seed: int = 7,
    suffix: str | None = "t",
    auto_deploy: bool = False,
    **values: Any,
) -> FineTuningJob:
    job = FineTuningJob(
        tenant_id=training_file.tenant_id,
        model=model,
        training_file_id=training_file.id,
        validation_file_id=validation_file.id if validation_file else None,
        suffix=suffix,
        seed=seed,
        hyperparameters=Hyperparameters(**{**TINY_HP, **(hyperparameters or {})}).model_dump(mode="json"),
        status=values.pop("status", JobStatus.QUEUED.value),
        enqueued_at=utcnow(),
        auto_deploy=auto_deploy,
        **values,
    )
    session.add(job)
    session.flush()
    return job


def events(session: Session, job: FineTuningJob) -> list[JobEvent]:
    session.expire_all()
    return list(session.query(JobEvent).filter(JobEvent.job_id == job.id).order_by(JobEvent.seq))


def metrics_events(session: Session, job: FineTuningJob) -> list[dict[str, Any]]:
    return [e.data or {} for e in events(session, job) if e.type == "metrics" and "loss" in (e.data or {})]


def fresh(session: Session, job: FineTuningJob) -> FineTuningJob:
    session.expire_all()
    row = session.get(FineTuningJob, job.id)
    assert row is not None
    return row


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
