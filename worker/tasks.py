"""The fine-tune task. It carries only the job id; everything else is re-read from the database."""

from __future__ import annotations

from core.contracts import TASK_FINE_TUNE
from worker.app import celery_app
from worker.runner import run_job


@celery_app.task(name=TASK_FINE_TUNE, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def fine_tune(job_id: str) -> str:
    """Claim, train, merge and publish job ``ftjob-<hex>``; a copy that cannot claim the job returns at once."""
    return run_job(job_id)
