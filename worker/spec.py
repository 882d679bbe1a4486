"""What a claimed job asks for, read once from its row into plain values (no session outlives the claim)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.orm import FileObject, FineTuningJob
from core.settings import Settings


@dataclass(frozen=True)
class FileSpec:
    public_id: str
    path: Path
    format: str
    mapping: dict[str, Any] | None
    sha256: str

    @classmethod
    def from_row(cls, row: FileObject, settings: Settings) -> FileSpec:
        path = Path(row.storage_path)
        if not path.is_absolute():
            path = settings.artifacts / path
        report = row.report or {}
        mapping = report.get("column_mapping") or report.get("mapping")
        return cls(row.public_id, path, row.format, mapping if isinstance(mapping, dict) else None, row.sha256)


@dataclass(frozen=True)
class JobSpec:
    job_id: uuid.UUID
    public_id: str
    tenant_id: str
    model: str  # the root base model (what ``ft:<base>:...`` and the model row name)
    suffix: str | None
    seed: int
    auto_deploy: bool
    attempts: int
    hyperparameters: dict[str, Any]
    training_file: FileSpec
    validation_file: FileSpec | None
    # The fine-tuned model or checkpoint the job continues (the job's ``model`` field), None when it starts from
    # the base model.
    parent_model: str | None = None
    device_class: str | None = None  # the queue it came from and goes back to (core.device_classes)

    @classmethod
    def from_row(cls, job: FineTuningJob, settings: Settings) -> JobSpec:
        return cls(
            job_id=job.id,
            public_id=job.public_id,
            tenant_id=job.tenant_id,
            model=job.base_model or job.model,
            suffix=job.suffix,
            seed=int(job.seed),
            auto_deploy=bool(job.auto_deploy),
            attempts=job.attempts,
            hyperparameters=dict(job.hyperparameters or {}),
            training_file=FileSpec.from_row(job.training_file, settings),
            validation_file=FileSpec.from_row(job.validation_file, settings) if job.validation_file else None,
            parent_model=job.model if job.base_model and job.model != job.base_model else None,
            device_class=job.device_class,
        )
