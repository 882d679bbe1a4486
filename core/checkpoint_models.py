"""A fine-tuned model's checkpoints as models of their own (``<model id>:ckpt-step-N``, as OpenAI names them).

Each checkpoint a job saved stays addressable for as long as the model that job published: a new job may continue
from it, and on vLLM it answers as its adapter on the base model. The api's and the inference service's
``/v1/models`` both list them from this one query.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.contracts import checkpoint_model_id
from core.orm import Checkpoint, FineTuningJob


@dataclass(frozen=True)
class CheckpointModel:
    id: str  # <model id>:ckpt-step-<N>
    model_id: str  # the fine-tuned model the job published
    step: int
    created_at: datetime
    metrics: dict[str, Any]
    job_id: str  # the job's public id


def checkpoint_models(session: Session, tenant_id: str, model_ids: Collection[str]) -> list[CheckpointModel]:
    """The checkpoints of the given models of this tenant, each model's in step order."""
    if not model_ids:
        return []
    rows = session.execute(
        select(FineTuningJob, Checkpoint)
        .join(Checkpoint, Checkpoint.job_id == FineTuningJob.id)
        .where(FineTuningJob.tenant_id == tenant_id, FineTuningJob.fine_tuned_model.in_(list(model_ids)))
        .order_by(FineTuningJob.fine_tuned_model, Checkpoint.step)
    ).all()
    return [
        CheckpointModel(
            id=checkpoint_model_id(job.fine_tuned_model, checkpoint.step),
            model_id=job.fine_tuned_model,
            step=checkpoint.step,
            created_at=checkpoint.created_at,
            metrics=dict(checkpoint.metrics or {}),
            job_id=job.public_id,
        )
        for job, checkpoint in rows
        if job.fine_tuned_model
    ]
