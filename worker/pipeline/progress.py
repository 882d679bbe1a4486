"""The job's side of training: events, progress, stage and checkpoint rows, all written under the lease.

Every write is one short transaction that starts with ``update_owned`` (a conditional UPDATE naming this worker's
lease), so a worker that lost the job cannot add a single event; LeaseLost stops it instead.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from core.contracts import JobStage, checkpoint_model_id
from core.db import SessionFactory
from core.jobs import LeaseLost, add_event, update_owned
from core.orm import Checkpoint
from worker.db import transact
from worker.pipeline.checkpoints import is_complete, remove_checkpoint
from worker.pipeline.errors import StopReason, TrainingStopped

log = logging.getLogger("conch.worker.progress")
T = TypeVar("T")

# Checkpoints kept per job (rows and folders); older ones are removed as new ones land.
KEEP_CHECKPOINTS = 3


class Flag(Protocol):
    def is_set(self) -> bool: ...

    def set(self) -> None: ...


class JobFlags(Protocol):
    """What the reporter needs of the job's holder: ``worker.heartbeat.JobControl`` in the worker process, its
    relay (``worker.pipeline.distributed.RelayedControl``) in rank 0 of a job on several devices."""

    @property
    def job_id(self) -> uuid.UUID: ...

    @property
    def owner(self) -> str: ...

    @property
    def lease_lost(self) -> Flag: ...

    @property
    def finishing(self) -> Flag: ...

    def stop_reason(self) -> str | None: ...


class JobReporter:
    """Implements the training loop's hooks for a job in the database."""

    def __init__(
        self,
        control: JobFlags,
        session_factory: SessionFactory,
        *,
        model_id: str,
    ) -> None:
        self.control = control
        self.job_id: uuid.UUID = control.job_id
        self.owner = control.owner
        self.session_factory = session_factory
        self.model_id = model_id  # the id the finished model will get; checkpoints are named after it

    # -------------------------------------------------------------------------------------------- writing

    def _transact(self, what: str, work: Callable[[Session], T]) -> T:
        # The heartbeat already knows the lease is gone: not even one round trip to learn it again.
        if self.control.lease_lost.is_set():
            raise LeaseLost(str(self.job_id))
        return transact(self.session_factory, work, what=what)

    def event(
        self,
        message: str,
        *,
        data: dict[str, Any] | None = None,
        level: str = "info",
        type_: str = "message",
        **job_values: Any,
    ) -> None:
        def work(session: Session) -> None:
            update_owned(session, self.job_id, self.owner, **job_values)
            add_event(session, self.job_id, message, type_=type_, level=level, data=data)

        self._transact("job.event", work)

    def update(self, **job_values: Any) -> None:
        self._transact("job.update", lambda s: update_owned(s, self.job_id, self.owner, **job_values))

    def stage(self, stage: JobStage, message: str, data: dict[str, Any] | None = None) -> None:
        self.event(message, data={"stage": stage.value, **(data or {})}, stage=stage.value)

    # -------------------------------------------------------------------------------------------- stopping

    def should_stop(self) -> StopReason | None:
        reason = self.control.stop_reason()
        return reason  # type: ignore[return-value]

    def check_stop(self) -> None:
        """Between stages: stop now if cancelled, shutting down or no longer ours."""
        reason = self.should_stop()
        if reason is not None:
            raise TrainingStopped(reason)

    # -------------------------------------------------------------------------------------------- hooks

    def on_log(self, metrics: dict[str, Any]) -> None:
        step, total = metrics["step"], metrics["total_steps"]
        progress = {
            "step": step,
            "total_steps": total,
            "epoch": metrics["epoch"],
            "percent": round(100.0 * step / total, 1),
            "loss": metrics["loss"],
            "learning_rate": metrics["learning_rate"],
            "tokens_per_second": metrics["tokens_per_second"],
            "eta_seconds": metrics["eta_seconds"],
        }
        log.info(
            "job.step",
            extra={
                "job_id": self.job_id.hex,
                "step": step,
                "total_steps": total,
                "loss": metrics["loss"],
                "tokens_per_second": metrics["tokens_per_second"],
                "eta_seconds": metrics["eta_seconds"],
            },
        )
        self.event(
            f"Step {step}/{total}: training loss={metrics['loss']:.4f}",
            type_="metrics",
            data=metrics,
            progress=progress,
            trained_tokens=metrics.get("trained_tokens"),
        )

    def on_eval_start(self, step: int) -> None:
        self.stage(JobStage.EVALUATING, f"Evaluating on the validation split at step {step}", {"step": step})

    def on_eval(self, metrics: dict[str, Any]) -> None:
        # Training goes on after every epoch's evaluation but the last, which the merging stage follows.
        self.event(
            f"Epoch {metrics['epoch']:g} (step {metrics['step']}/{metrics['total_steps']}): "
            f"validation loss={metrics['eval_loss']:.4f}",
            type_="metrics",
            data=metrics,
            stage=JobStage.TRAINING.value,
        )

    def on_checkpoint(self, step: int, folder: Path, metrics: dict[str, Any]) -> None:
        stale: list[str] = []

        def work(session: Session) -> None:
            update_owned(session, self.job_id, self.owner)
            row = session.scalars(
                select(Checkpoint).where(Checkpoint.job_id == self.job_id, Checkpoint.step == step)
            ).first()
            data = {**metrics, "fine_tuned_model_checkpoint": checkpoint_model_id(self.model_id, step)}
            if row is None:
                session.add(Checkpoint(job_id=self.job_id, step=step, storage_path=str(folder), metrics=data))
            else:  # re-written after a resume: same step, same place
                row.storage_path, row.metrics = str(folder), data
            session.flush()
            older = session.scalars(
                select(Checkpoint)
                .where(Checkpoint.job_id == self.job_id)
                .order_by(Checkpoint.step.desc())
                .offset(KEEP_CHECKPOINTS)
            ).all()
            stale.extend(r.storage_path for r in older)
            if older:
                session.execute(delete(Checkpoint).where(Checkpoint.id.in_([r.id for r in older])))
            add_event(session, self.job_id, f"Checkpoint saved at step {step}", data={"step": step, **metrics})

        self._transact("job.checkpoint", work)
        for path in stale:  # only after the rows are gone, so a listed checkpoint always exists on disk
            remove_checkpoint(Path(path))

    # -------------------------------------------------------------------------------------------- resume

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint this job recorded whose folder is complete on disk."""

        def work(session: Session) -> list[str]:
            rows = session.scalars(
                select(Checkpoint.storage_path).where(Checkpoint.job_id == self.job_id).order_by(Checkpoint.step.desc())
            ).all()
            return list(rows)

        for path in self._transact("job.checkpoints", work):
            if is_complete(Path(path)):
                return Path(path)
            log.warning("checkpoint.incomplete", extra={"job_id": self.job_id.hex, "path": path})
        return None
