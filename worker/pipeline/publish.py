"""Publishing a merged model: the model row, the job's success and (with ``auto_deploy``) a deployment request,
committed together in one transaction that only this worker's lease can pass; the announcement goes out after
the commit, so inference never hears of a model the database does not hold."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from core.contracts import JobStage, JobStatus, ModelStatus
from core.db import SessionFactory
from core.deployments import announce, request_deployment
from core.jobs import LeaseLost, add_event, cancel_was_requested, finish
from core.orm import Deployment, ModelRecord
from core.settings import Settings
from core.storage import directory_size
from worker.db import transact
from worker.pipeline.errors import TrainingStopped
from worker.pipeline.merge import ADAPTER_SUBDIR
from worker.spec import JobSpec

log = logging.getLogger("conch.worker.publish")


def register_model(
    session_factory: SessionFactory,
    spec: JobSpec,
    owner: str,
    *,
    model_id: str,
    folder: Path,
    metrics: dict[str, Any],
    trained_tokens: int,
    progress: dict[str, Any],
    settings: Settings,
) -> Deployment | None:
    """Record the model and finish the job as succeeded; returns the deployment requested, if any."""
    size = directory_size(folder)

    def publish(session: Session) -> Deployment | None:
        record = session.get(ModelRecord, model_id) or ModelRecord(id=model_id)
        record.tenant_id = spec.tenant_id
        record.base_model = spec.model
        record.job_id = spec.job_id
        record.storage_path = str(folder)
        record.adapter_path = str(folder / ADAPTER_SUBDIR)
        record.dataset_sha256 = spec.training_file.sha256
        record.metrics = metrics
        record.size_bytes = size
        record.status = ModelStatus.READY
        session.add(record)
        session.flush()
        finished = finish(
            session,
            spec.job_id,
            JobStatus.SUCCEEDED,
            owner=owner,
            message=f"The job has successfully completed: {model_id}",
            fine_tuned_model=model_id,
            trained_tokens=trained_tokens,
            metrics=metrics,
            progress=progress,
            stage=(JobStage.DEPLOYING if spec.auto_deploy else JobStage.PUBLISHING).value,
        )
        if not finished:
            if cancel_was_requested(session, spec.job_id):
                # The cancel committed before this transaction's success: honour it (nothing is published, the
                # transaction rolls back, the runner ends the job cancelled and removes the merged folder).
                raise TrainingStopped("cancel")
            # Cancelled-and-ended by the reconciler, or taken over: not ours to publish (rolled back).
            raise LeaseLost(str(spec.job_id))
        if not spec.auto_deploy:
            return None
        deployment = request_deployment(
            session, tenant_id=spec.tenant_id, model_id=model_id, requested_by=spec.public_id
        )
        add_event(
            session,
            spec.job_id,
            f"Deployment of {model_id} requested",
            data={"stage": JobStage.DEPLOYING.value, "deployment": deployment.public_id},
        )
        return deployment

    deployment = transact(session_factory, publish, what="job.publish")
    if deployment is not None:
        announce(deployment, settings)
    log.info("job.published", extra={"job_id": spec.public_id, "model_id": model_id, "size_bytes": size})
    return deployment
