"""One delivery of the fine-tune task: claim the job, hold its lease, run the pipeline, end the job once.

The broker is only a doorbell. The job row decides: a delivery whose claim fails (the job is running elsewhere,
finished, or cancelled) returns at once without importing torch, so duplicates and late copies never train.
Every outcome is written under this worker's lease; a worker that lost it stops and writes nothing more.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
import uuid

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from core.contracts import JobStatus, fine_tuned_model_id
from core.db import SessionFactory, get_sessionmaker
from core.hostload import training_here
from core.ids import Prefix, parse_public_id
from core.jobs import LeaseLost, add_event, claim, finish, release_to_queue
from core.orm import Checkpoint
from core.queue import enqueue_fine_tune
from core.settings import Settings
from core.storage import fine_tuned_dir, job_dir
from worker.db import transact
from worker.heartbeat import JobControl, install_sigterm_handler
from worker.spec import JobSpec

log = logging.getLogger("conch.worker.runner")

INTERNAL_ERROR_MESSAGE = "Training stopped on an internal error ({kind}); the worker log has the details."


def worker_identity() -> str:
    """hostname:pid:random, unique per delivery even when a pid is reused."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def claim_job(job_id: uuid.UUID, owner: str, settings: Settings, sessions: SessionFactory) -> JobSpec | None:
    def claim_and_record_start(session: Session) -> JobSpec | None:
        job = claim(session, job_id, owner, settings.lease_seconds)
        if job is None:  # the conditional UPDATE matched no row: nothing was written
            return None
        spec = JobSpec.from_row(job, settings)
        add_event(
            session,
            job_id,
            f"Job started (attempt {job.attempts})",
            data={"status": JobStatus.RUNNING.value, "attempt": job.attempts, "worker": owner},
        )
        return spec

    return transact(sessions, claim_and_record_start, what="job.claim")


def run_job(public_id: str, settings: Settings) -> str:
    """Handle one delivery; returns what happened (for logs and tests): succeeded, failed, cancelled,
    released, skipped, lease_lost or invalid."""
    sessions = get_sessionmaker()
    job_id = parse_public_id(public_id, Prefix.JOB)  # a malformed message is dropped, never retried
    if job_id is None:
        log.error("job.invalid_id", extra={"job_id": str(public_id)[:80]})
        return "invalid"
    owner = worker_identity()
    spec = claim_job(job_id, owner, settings, sessions)
    if spec is None:
        # Already running elsewhere, finished, cancelled or unknown: a duplicate or late delivery.
        log.info("job.claim_refused", extra={"job_id": public_id, "owner": owner})
        return "skipped"
    log.info("job.claimed", extra={"job_id": public_id, "owner": owner, "attempt": spec.attempts})
    control = JobControl(
        job_id,
        owner,
        lease_seconds=settings.lease_seconds,
        interval_seconds=settings.heartbeat_seconds,
        session_factory=sessions,
    ).start()
    restore_signal = install_sigterm_handler(control)
    started = time.monotonic()
    try:
        # While it trains, inference on this host leaves it half the cores (core.hostload).
        with training_here(settings):
            outcome = _run_claimed(spec, control, sessions, settings)
    finally:
        restore_signal()
        control.close()
    log.info(
        "job.delivery_done",
        extra={"job_id": public_id, "outcome": outcome, "seconds": round(time.monotonic() - started, 1)},
    )
    return outcome


def _run_claimed(spec: JobSpec, control: JobControl, sessions: SessionFactory, settings: Settings) -> str:
    # The heavy imports happen here, after the claim: only a worker that really trains pays for them.
    from worker.launch import RanksCrashed, requested_devices, run_ranks
    from worker.pipeline.errors import PipelineError, TrainingStopped

    try:
        devices = requested_devices(spec, settings)
        if devices > 1:
            # The ranks train (rank 0 reports and publishes); this process keeps the lease and ends the job.
            run_ranks(spec, control, settings, devices)
            return "succeeded"
        from worker.pipeline.progress import JobReporter
        from worker.pipeline.recipe import run_pipeline

        model_id = fine_tuned_model_id(spec.model, spec.suffix, spec.public_id)
        run_pipeline(spec, JobReporter(control, sessions, model_id=model_id), sessions, settings)
        return "succeeded"
    except TrainingStopped as stop:
        control.finishing.set()
        if stop.reason == "cancel":
            return _end_cancelled(spec, control.owner, sessions, settings)
        if stop.reason == "shutdown":
            return _release(spec, control.owner, sessions, stop.checkpoint_step, settings)
        log.warning("job.stopped_lease_lost", extra={"job_id": spec.public_id})
        return "lease_lost"
    except LeaseLost:
        log.warning("job.stopped_lease_lost", extra={"job_id": spec.public_id})
        return "lease_lost"
    except PipelineError as exc:
        log.warning("job.failed", extra={"job_id": spec.public_id, "code": exc.code, "error": exc.message})
        return _fail(spec, control, sessions, exc.to_error())
    except RanksCrashed as exc:
        if exc.rank_lost and spec.attempts < settings.max_attempts:
            log.warning("job.rank_lost", extra={"job_id": spec.public_id, "error": exc.kind, "attempt": spec.attempts})
            return _retry_after_lost_rank(spec, control, sessions, settings, exc.kind)
        log.error("job.ranks_crashed", extra={"job_id": spec.public_id, "error": exc.kind})
        if exc.rank_lost:  # as the reconciler ends a job whose worker keeps dying
            message = f"The {exc.kind} on attempt {spec.attempts} of {settings.max_attempts}; giving up."
            return _fail(spec, control, sessions, {"code": "max_attempts_exceeded", "param": None, "message": message})
        return _fail(spec, control, sessions, _internal_error(exc))
    except Exception as exc:
        log.exception("job.crashed", extra={"job_id": spec.public_id})
        error = _internal_error(exc)
        return _fail(spec, control, sessions, error)


def _internal_error(exc: BaseException) -> dict[str, object]:
    import torch

    from worker.launch import RanksCrashed

    kind = type(exc).__name__
    out_of_memory = isinstance(exc, torch.OutOfMemoryError | MemoryError)
    if isinstance(exc, RanksCrashed):  # one of the job's training processes crashed; the worker log has it
        kind, out_of_memory = exc.kind, exc.out_of_memory
    if out_of_memory:
        return {
            "code": "out_of_memory",
            "message": "Training ran out of memory; lower per_device_train_batch_size or cutoff_len.",
            "param": None,
        }
    return {"code": "internal_error", "message": INTERNAL_ERROR_MESSAGE.format(kind=kind), "param": None}


def _fail(spec: JobSpec, control: JobControl, sessions: SessionFactory, error: dict[str, object]) -> str:
    if control.lease_lost.is_set():
        return "lease_lost"
    control.finishing.set()

    def end_failed(session: Session) -> bool:
        message = f"Job failed: {error['message']}"
        return finish(session, spec.job_id, JobStatus.FAILED, owner=control.owner, message=message, error=error)

    return "failed" if transact(sessions, end_failed, what="job.fail") else "lease_lost"


def _end_cancelled(spec: JobSpec, owner: str, sessions: SessionFactory, settings: Settings) -> str:
    """End the job cancelled and drop what it produced (checkpoints and any half-written model)."""

    def end_cancelled(session: Session) -> bool:
        if not finish(session, spec.job_id, JobStatus.CANCELLED, owner=owner, message="Job cancelled"):
            return False  # the conditional UPDATE matched no row: nothing was written
        session.execute(delete(Checkpoint).where(Checkpoint.job_id == spec.job_id))
        return True

    if not transact(sessions, end_cancelled, what="job.cancel"):
        return "lease_lost"
    shutil.rmtree(job_dir(spec.job_id, settings), ignore_errors=True)
    shutil.rmtree(fine_tuned_dir(spec.job_id, settings), ignore_errors=True)  # merged before the cancel was seen
    log.info("job.cancelled", extra={"job_id": spec.public_id})
    return "cancelled"


def _release(
    spec: JobSpec, owner: str, sessions: SessionFactory, checkpoint_step: int | None, settings: Settings
) -> str:
    """Graceful shutdown: the job goes back to the queue without spending an attempt, and is enqueued again."""
    why = "The worker is shutting down"
    return _requeue(spec, owner, sessions, settings, why, checkpoint_step=checkpoint_step, refund_attempt=True)


def _retry_after_lost_rank(
    spec: JobSpec, control: JobControl, sessions: SessionFactory, settings: Settings, what: str
) -> str:
    """A training process died of a signal (a native crash, the OOM killer) while the others were sound: the job
    goes back to the queue, spending this attempt, and continues from its last complete checkpoint, as it does
    when a whole worker dies. ``MAX_ATTEMPTS`` bounds a crash that repeats."""
    if control.lease_lost.is_set():
        return "lease_lost"
    control.finishing.set()

    def last_checkpoint_step(session: Session) -> int | None:
        return session.scalar(select(func.max(Checkpoint.step)).where(Checkpoint.job_id == spec.job_id))

    step = transact(sessions, last_checkpoint_step, what="job.checkpoints")
    why = f"The {what} (attempt {spec.attempts} of {settings.max_attempts})"
    return _requeue(spec, control.owner, sessions, settings, why, checkpoint_step=step, refund_attempt=False)


def _requeue(
    spec: JobSpec,
    owner: str,
    sessions: SessionFactory,
    settings: Settings,
    why: str,
    *,
    checkpoint_step: int | None,
    refund_attempt: bool,
) -> str:
    """Put the job back on its queue, with an event that says ``why`` and where it will continue."""
    where = f" from the checkpoint at step {checkpoint_step}" if checkpoint_step else " from the start"
    message = f"{why}; the job was queued again and will continue{where}"

    def requeue(session: Session) -> bool:
        return release_to_queue(session, spec.job_id, owner, refund_attempt=refund_attempt, message=message)

    if not transact(sessions, requeue, what="job.release"):
        return "lease_lost"
    try:
        enqueue_fine_tune(spec.public_id, settings, spec.device_class)
    except Exception as exc:  # the reconciler enqueues queued jobs whose message was lost
        log.warning("job.requeue_failed", extra={"job_id": spec.public_id, "error": str(exc)[:200]})
    log.info("job.released", extra={"job_id": spec.public_id, "checkpoint_step": checkpoint_step})
    return "released"
