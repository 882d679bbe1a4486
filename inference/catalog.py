"""Which models exist for a tenant: the configured base models (everyone's) and its own fine-tuned ones."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.base_models import base_model_path, is_prepared
from core.checkpoint_models import checkpoint_models
from core.contracts import ModelStatus, parse_checkpoint_model_id
from core.deployments import ADAPTER, MERGED, default_serve_as
from core.errors import NotFound, ServiceUnavailable
from core.orm import Checkpoint, FineTuningJob, ModelRecord
from core.settings import Settings

MAX_MODEL_ID = 512


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class ModelNotReady(ServiceUnavailable):
    default_code = "model_not_ready"


@dataclass(frozen=True)
class ModelSource:
    name: str
    folder: Path
    template: str
    owner: str | None  # tenant; None for base models, which every tenant may use
    base_model: str | None
    created: int
    adapter: Path | None = None  # a checkpoint's LoRA adapter, served on its base (INFERENCE_BACKEND=vllm only)
    # "adapter": a fine-tune served as its LoRA adapter on its base model's vLLM server (where it fits that base);
    # "merged": its merged weights as a model of their own (the only way of the other backends, and of base models).
    serve_as: str = MERGED

    def visible_to(self, tenant: str) -> bool:
        return self.owner is None or self.owner == tenant


def _timestamp(value: datetime | None) -> int:
    return int(value.timestamp()) if value else 0


MANIFEST = "conch.json"


def _manifest_template(folder: Path) -> str | None:
    try:
        value = json.loads((folder / MANIFEST).read_text()).get("template")
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if value else None


def _template_of(session: Session, record: ModelRecord) -> str:
    """The template the model was trained with: named by the published folder's manifest, else by its job
    (``auto`` = the tokenizer's own)."""
    from_manifest = _manifest_template(Path(record.storage_path))
    if from_manifest:
        return from_manifest
    if record.job_id is None:
        return "auto"
    job = session.get(FineTuningJob, record.job_id)
    if job is None:
        return "auto"
    return str((job.hyperparameters or {}).get("template") or "auto")


def base_source(name: str, settings: Settings) -> ModelSource:
    folder = base_model_path(name, settings)
    if not is_prepared(name, settings):
        raise ModelNotReady(f"base model {name!r} is not prepared yet; retry later", param="model")
    return ModelSource(name=name, folder=folder, template="auto", owner=None, base_model=None, created=0)


def resolve(session: Session, name: str, tenant: str, settings: Settings) -> ModelSource:
    """A model this tenant may use, ready to load. Another tenant's model answers exactly like a missing one."""
    if name in settings.base_models:
        return base_source(name, settings)
    if not name or len(name) > MAX_MODEL_ID or any(ord(c) < 32 for c in name):
        raise ModelNotFound(f"The model {name!r} does not exist", param="model")  # not even worth a query
    checkpoint = parse_checkpoint_model_id(name) if settings.inference_backend == "vllm" else None
    if checkpoint is not None:  # on vLLM a checkpoint costs only an adapter load
        return _checkpoint_source(session, name, checkpoint, tenant)
    record = session.get(ModelRecord, name)
    if record is None or record.tenant_id != tenant:
        raise ModelNotFound(f"The model {name!r} does not exist", param="model")
    if record.status != ModelStatus.READY:
        raise ModelNotReady(f"model {name!r} is {record.status}", param="model")
    return ModelSource(
        name=record.id,
        folder=Path(record.storage_path),
        template=_template_of(session, record),
        owner=record.tenant_id,
        base_model=record.base_model,
        created=_timestamp(record.created_at),
        serve_as=default_serve_as(settings, record),
    )


def _checkpoint_source(session: Session, name: str, checkpoint: tuple[str, int], tenant: str) -> ModelSource:
    """``<model id>:ckpt-step-<N>``: the adapter saved at step N by the job that published the model, with the
    published model's tokenizer and template."""
    model_id, step = checkpoint
    record = session.get(ModelRecord, model_id)
    if record is None or record.tenant_id != tenant:
        raise ModelNotFound(f"The model {name!r} does not exist", param="model")
    if record.status != ModelStatus.READY:
        raise ModelNotReady(f"model {model_id!r} is {record.status}", param="model")
    path = session.scalars(
        select(Checkpoint.storage_path)
        .join(FineTuningJob, FineTuningJob.id == Checkpoint.job_id)
        .where(FineTuningJob.tenant_id == tenant, FineTuningJob.fine_tuned_model == model_id, Checkpoint.step == step)
    ).first()
    adapter = Path(path) if path else None
    if adapter is None or not (adapter / "adapter_config.json").is_file():
        raise ModelNotFound(f"The model {name!r} does not exist", param="model")
    return ModelSource(
        name=name,
        folder=Path(record.storage_path),
        template=_template_of(session, record),
        owner=record.tenant_id,
        base_model=record.base_model,
        created=_timestamp(record.created_at),
        adapter=adapter,
        serve_as=ADAPTER,  # a checkpoint has no merged weights of its own
    )


@dataclass(frozen=True)
class ModelEntry:
    id: str
    created: int
    owned_by: str
    base_model: str | None
    ready: bool


def visible_models(session: Session, tenant: str, settings: Settings) -> list[ModelEntry]:
    entries = [
        ModelEntry(id=name, created=0, owned_by="conch", base_model=None, ready=is_prepared(name, settings))
        for name in settings.base_models
    ]
    records = list(
        session.scalars(select(ModelRecord).where(ModelRecord.tenant_id == tenant).order_by(ModelRecord.created_at))
    )
    entries += [
        ModelEntry(
            id=r.id,
            created=_timestamp(r.created_at),
            owned_by=r.tenant_id,
            base_model=r.base_model,
            ready=r.status == ModelStatus.READY,
        )
        for r in records
    ]
    if settings.inference_backend == "vllm":  # only there does a checkpoint answer (as its adapter)
        ready = {r.id: r for r in records if r.status == ModelStatus.READY}
        entries += [
            ModelEntry(
                id=c.id,
                created=_timestamp(c.created_at),
                owned_by=tenant,
                base_model=ready[c.model_id].base_model,
                ready=True,
            )
            for c in checkpoint_models(session, tenant, list(ready))
        ]
    return entries
