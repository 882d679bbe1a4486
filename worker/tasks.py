"""The fine-tune task. Its message is ``core.contracts.FineTuneTask``, the job id only; everything else is re-read
from the database."""

from __future__ import annotations

from core.contracts import TASK_FINE_TUNE, FineTuneTask
from core.settings import get_settings
from worker.app import celery_app
from worker.runner import run_job


@celery_app.task(name=TASK_FINE_TUNE, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def fine_tune(job_id: str) -> str:
    """Claim, train, merge and publish job ``ftjob-<hex>``; a copy that cannot claim the job returns at once."""
    task = FineTuneTask(job_id=job_id)  # the message's contract, checked on arrival as it was built on sending
    return run_job(task.job_id, get_settings())
