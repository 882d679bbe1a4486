"""The database tables (SQLAlchemy ORM classes): the single source of truth for files, jobs, events, checkpoints,
published models and deployments. (Named ``orm``, not ``models``: in this product a model is an LLM.)

Public ids are OpenAI-shaped (``file-<hex>``, ``ftjob-<hex>``; ``core.ids``); the primary keys underneath are UUIDs.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from core import ids
from core.contracts import FileStatus, ModelStatus

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

DEFAULT_TENANT = "default"
# SQLite only auto-increments an INTEGER PRIMARY KEY, Postgres wants BIGINT for an event log.
EventId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime(timezone=True)}


class TimestampMixin:
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(TimestampMixin, Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(128))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    revoked_at: Mapped[datetime | None]
    # May manage keys (``/v1/keys``) and read the probes' details and ``/metrics`` when AUTH_REQUIRED is on.
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Last request made with the key, to the nearest minute or so (``core.api_keys.LAST_USED_RESOLUTION``).
    last_used_at: Mapped[datetime | None]


class IdempotencyRecord(TimestampMixin, Base):
    """The first answer to a POST carrying an ``Idempotency-Key``, replayed for retries."""

    __tablename__ = "idempotency_records"
    __table_args__ = (UniqueConstraint("tenant_id", "key", "route", name="uq_idempotency_key"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(255))
    route: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int]
    response: Mapped[dict[str, Any]]


class FileObject(TimestampMixin, Base):
    __tablename__ = "files"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True, default=DEFAULT_TENANT)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64))
    num_examples: Mapped[int]
    storage_path: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(32), default=FileStatus.PROCESSED)
    report: Mapped[dict[str, Any]] = mapped_column(default=dict)

    @property
    def public_id(self) -> str:
        return ids.public_id(ids.Prefix.FILE, self.id)


class FineTuningJob(TimestampMixin, Base):
    __tablename__ = "fine_tuning_jobs"
    __table_args__ = (Index("ix_fine_tuning_jobs_status_enqueued", "status", "enqueued_at"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True, default=DEFAULT_TENANT)
    # What the job starts from: a base model, or a fine-tuned model or one of its checkpoints to continue.
    model: Mapped[str] = mapped_column(String(255))
    # The root base model under ``model`` (what the new model's ``ft:<base>:...`` id names); null on jobs created
    # before continuing existed, whose ``model`` is always the base.
    base_model: Mapped[str | None] = mapped_column(String(255))
    training_file_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("files.id", ondelete="RESTRICT"))
    validation_file_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("files.id", ondelete="RESTRICT"))
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    hyperparameters: Mapped[dict[str, Any]]
    auto_deploy: Mapped[bool] = mapped_column(Boolean, default=True)

    # validating_files | queued | running | cancelling | succeeded | failed | cancelled
    status: Mapped[str] = mapped_column(String(32), index=True)
    stage: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(512))
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Public ids of the files (purpose fine-tune-results) written when the job succeeded; a deleted one is skipped.
    result_files: Mapped[list[Any] | None] = mapped_column(JSON)
    # The device class whose queue the job is sent to (core.device_classes); null: the shared queue.
    device_class: Mapped[str | None] = mapped_column(String(64))

    # Dispatch: the broker is a doorbell, these columns are the truth.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None]
    enqueued_at: Mapped[datetime | None]
    # Re-rings by the reconciler since the job was last enqueued or claimed, and when the next one is due: the
    # wait doubles each time, so a backlog that cannot run yet is not rung again on every sweep.
    rings: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_ring_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    training_file: Mapped[FileObject] = relationship(foreign_keys=[training_file_id])
    validation_file: Mapped[FileObject | None] = relationship(foreign_keys=[validation_file_id])

    @property
    def public_id(self) -> str:
        return ids.public_id(ids.Prefix.JOB, self.id)


class JobEvent(TimestampMixin, Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_seq", "job_id", "seq"),)

    seq: Mapped[int] = mapped_column(EventId, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"))
    level: Mapped[str] = mapped_column(String(16), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    @property
    def public_id(self) -> str:
        return ids.event_id(self.seq)


class Checkpoint(TimestampMixin, Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_checkpoints_job_step"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int]
    storage_path: Mapped[str] = mapped_column(Text)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    @property
    def public_id(self) -> str:
        return ids.public_id(ids.Prefix.CHECKPOINT, self.id)


class ModelRecord(TimestampMixin, Base):
    """A fine-tuned model published by a job (base models come from settings)."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(512), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True, default=DEFAULT_TENANT)
    base_model: Mapped[str] = mapped_column(String(255))
    # The fine-tuned model or checkpoint id this one was trained from (lineage); null when trained from the base.
    # Kept as a plain id, so the lineage still reads after the parent is deleted.
    parent_model: Mapped[str | None] = mapped_column(String(512))
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("fine_tuning_jobs.id", ondelete="SET NULL"))
    storage_path: Mapped[str] = mapped_column(Text)
    adapter_path: Mapped[str | None] = mapped_column(Text)
    dataset_sha256: Mapped[str | None] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(32), default=ModelStatus.READY)


class Deployment(TimestampMixin, Base):
    """A request to serve a model by default; the inference service drives its status.

    pending -> loading -> active -> superseded, or -> failed (with ``reason``); the newest ``active`` row of a
    tenant names the model its requests get when they name none.
    """

    __tablename__ = "deployments"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True, default=DEFAULT_TENANT)
    model_id: Mapped[str] = mapped_column(String(512))
    status: Mapped[str] = mapped_column(String(32), index=True, default="pending")
    reason: Mapped[str | None] = mapped_column(Text)
    requested_by: Mapped[str | None] = mapped_column(String(64))
    activated_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    latency_seconds: Mapped[float | None] = mapped_column(Float)
    # The route that serves it (e.g. llamacpp:bf16) and that route's fidelity against the fp32 reference on the
    # golden prompts, with the routes it fell back from; written when it becomes active.
    route: Mapped[str | None] = mapped_column(String(64))
    fidelity: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Loads started: one that is still "loading" after several starts crashed its inference process each time.
    load_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # How a fine-tune is served: "adapter" (its LoRA adapter on its base model's server, INFERENCE_BACKEND=vllm)
    # or "merged" (its merged weights as a model of their own); null: the backend's default.
    serve_as: Mapped[str | None] = mapped_column(String(16))

    @property
    def public_id(self) -> str:
        return ids.public_id(ids.Prefix.DEPLOYMENT, self.id)


class DeploymentReplica(Base):
    """One inference replica's own progress on one deployment: ``loading`` -> ``active`` or ``failed``.

    The deployment row says what the tenant asked for; these rows say which replica serves it. A replica that
    cannot load a model fails it for itself only (it keeps serving its previous model for that tenant); the
    deployment fails only when no live replica (``heartbeat_at`` recent, database time) is loading or serving it.
    ``replica_id`` is stable across restarts of the same replica (INFERENCE_REPLICA_ID, else the host name), so a
    load that kills its process is counted in ``load_attempts`` across restarts.
    """

    __tablename__ = "deployment_replicas"

    deployment_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"), primary_key=True)
    replica_id: Mapped[str] = mapped_column(String(128), primary_key=True, index=True)
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)  # server paths already reduced to their last names
    # Loads started since the last success: still "loading" after several, the load crashed the process each time.
    load_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    heartbeat_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class InferenceReplica(Base):
    """An inference replica that is up: its heartbeat (database time) renewed every few seconds. A deployment
    fails only once every live replica has tried it, including the ones that never served a deployment yet."""

    __tablename__ = "inference_replicas"

    replica_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]
    # Set by a replica that serves fine-tunes as LoRA adapters (vLLM): the highest rank it loads. The api and the
    # workers hold new jobs to the lowest such limit of the live replicas (core.servability).
    max_lora_rank: Mapped[int | None] = mapped_column(Integer)


class DeviceClass(Base):
    """What the workers of one device class reported at start-up (core.device_classes): the latest one wins."""

    __tablename__ = "device_classes"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    capabilities: Mapped[dict[str, Any]]
    worker: Mapped[str] = mapped_column(String(255))
    seen_at: Mapped[datetime] = mapped_column(default=utcnow)


class StoreIdentity(TimestampMixin, Base):
    """The artifact store this database owns: the same id is written into the store (``core.janitor``), so the
    janitor never takes a store's contents for leftovers of a database that never knew them."""

    __tablename__ = "store_identity"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
