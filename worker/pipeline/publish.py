"""Publishing a merged model: the model row (with its parent when the job continued a fine-tuned model), the job's
success with its result files, and (with ``auto_deploy``) a deployment request, committed together in one
transaction that only this worker's lease can pass; the announcement goes out after the commit, so inference never
hears of a model the database does not hold."""

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
from worker.pipeline.results import ResultFile, discard, read_metrics_events, write_result_files
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
    """Record the model and finish the job as succeeded with its result files; returns the deployment requested,
    if any."""
    size = directory_size(folder)
    results = _write_results(session_factory, spec, model_id, settings)

    def publish(session: Session) -> Deployment | None:
        record = session.get(ModelRecord, model_id) or ModelRecord(id=model_id)
        record.tenant_id = spec.tenant_id
        record.base_model = spec.model
        record.parent_model = spec.parent_model
        record.job_id = spec.job_id
        record.storage_path = str(folder)
        record.adapter_path = str(folder / ADAPTER_SUBDIR)
        record.dataset_sha256 = spec.training_file.sha256
        record.metrics = metrics
        record.size_bytes = size
        record.status = ModelStatus.READY
        session.add(record)
        session.add_all([r.row(spec.tenant_id, spec.public_id) for r in results])
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
            result_files=[r.public_id for r in results],
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

    try:
        deployment = transact(session_factory, publish, what="job.publish")
    except BaseException:
        discard(results)  # their rows rolled back with the publish
        raise
    if deployment is not None:
        announce(deployment, settings)
    log.info("job.published", extra={"job_id": spec.public_id, "model_id": model_id, "size_bytes": size})
    return deployment


def _write_results(
    session_factory: SessionFactory, spec: JobSpec, model_id: str, settings: Settings
) -> list[ResultFile]:
    """The job's result files, drawn from its metrics events before the publishing transaction (rendering the
    picture takes a moment that the transaction should not hold its locks for)."""
    events = transact(session_factory, lambda s: read_metrics_events(s, spec.job_id), what="job.read_metrics")
    return write_result_files(events, f"{spec.public_id} -> {model_id}", settings)
