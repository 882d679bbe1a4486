"""Models (base models from settings, fine-tuned ones from the database) and their deployments."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from api.db import on_commit
from api.schemas import DeploymentList, DeploymentOut, ModelDeleted, ModelList, ModelOut
from api.services.common import cursor_page, unix, unix_required, unknown_cursor
from core.base_models import base_model_path, is_prepared
from core.checkpoint_models import CheckpointModel, checkpoint_models
from core.contracts import LIVE_STATUSES, DeploymentStatus, ModelStatus, parse_checkpoint_model_id
from core.deployments import (
    ADAPTER,
    MERGED,
    ROLLBACK_PREFIX,
    active_deployment,
    adapter_refusal,
    adapter_replicas,
    adapters_served,
    announce,
    default_serve_as,
    lock_tenant_deployments,
    pending_count,
    request_deployment,
    rollback_entry,
)
from core.errors import Conflict, InvalidRequest, NotFound, RateLimited, ValidationFailed
from core.ids import Prefix, parse_public_id, public_id
from core.orm import Checkpoint, Deployment, FineTuningJob, ModelRecord
from core.settings import Settings
from core.storage import job_dir

log = logging.getLogger("conch.api.models")

BASE_OWNER = "conch"
_IN_FLIGHT = (DeploymentStatus.PENDING.value, DeploymentStatus.LOADING.value)


def _created(path: Path) -> int:
    try:
        return int(path.stat().st_mtime)
    except OSError:
        return 0


def _serving(session: Session, tenant_id: str) -> dict[str, dict[str, Any]]:
    """Per model: the route and fidelity of its latest activation for this tenant (what the gate measured)."""
    rows = session.execute(
        select(Deployment.model_id, Deployment.route, Deployment.fidelity)
        .where(Deployment.tenant_id == tenant_id, Deployment.fidelity.is_not(None))
        .order_by(Deployment.activated_at.asc())
    ).all()
    return {model_id: {"route": route, "fidelity": fidelity} for model_id, route, fidelity in rows}


def base_model_out(
    name: str, settings: Settings, active_model: str | None, serving: dict[str, Any] | None = None
) -> ModelOut:
    return ModelOut(
        id=name,
        created=_created(base_model_path(name, settings)),
        owned_by=BASE_OWNER,
        conch={
            "kind": "base",
            "prepared": is_prepared(name, settings),
            "default": name == settings.default_base_model,
            "deployed": name == active_model,
            "serving": serving,
        },
    )


# A model's lineage: its root base model, then every fine-tune (or checkpoint) down to its parent.
MAX_LINEAGE = 32
Lookup = Callable[[str], ModelRecord | None]


def lineage(row: ModelRecord, lookup: Lookup) -> list[str]:
    """Root base first, the direct parent last. A deleted ancestor still appears by its id (the child keeps it);
    what lay above it is then unknown, so the chain continues at the root base."""
    chain: list[str] = []
    parent = row.parent_model
    while parent and len(chain) < MAX_LINEAGE and parent not in chain:
        chain.append(parent)
        checkpoint = parse_checkpoint_model_id(parent)
        model_id = checkpoint[0] if checkpoint else parent
        if checkpoint:
            chain.append(model_id)
        record = lookup(model_id)
        parent = record.parent_model if record is not None else None
    return [row.base_model, *reversed(chain)]


def fine_tuned_out(
    row: ModelRecord, active_model: str | None, serving: dict[str, Any] | None = None, lookup: Lookup | None = None
) -> ModelOut:
    return ModelOut(
        id=row.id,
        created=unix_required(row.created_at),
        owned_by=row.tenant_id,
        conch={
            "kind": "fine-tuned",
            "base_model": row.base_model,
            "parent_model": row.parent_model,
            "lineage": lineage(row, lookup or (lambda _: None)),
            "job_id": public_id(Prefix.JOB, row.job_id) if row.job_id else None,
            "dataset_sha256": row.dataset_sha256,
            "metrics": row.metrics,
            "status": row.status,
            "size_bytes": row.size_bytes,
            "deployed": row.id == active_model,
            "serving": serving,
        },
    )


def _active_model(session: Session, tenant_id: str) -> str | None:
    active = active_deployment(session, tenant_id)
    return active.model_id if active else None


def list_models(session: Session, tenant_id: str, settings: Settings) -> ModelList:
    active = _active_model(session, tenant_id)
    serving = _serving(session, tenant_id)
    base = [base_model_out(name, settings, active, serving.get(name)) for name in sorted(settings.base_models)]
    tuned = session.scalars(
        select(ModelRecord).where(ModelRecord.tenant_id == tenant_id).order_by(ModelRecord.created_at.desc())
    ).all()
    by_id = {r.id: r for r in tuned}
    checkpoints: dict[str, list[CheckpointModel]] = {}
    for checkpoint in checkpoint_models(session, tenant_id, [r.id for r in tuned if r.status == ModelStatus.READY]):
        checkpoints.setdefault(checkpoint.model_id, []).append(checkpoint)
    data = list(base)
    servable = bool(checkpoints) and adapters_served(session, settings)
    for row in tuned:
        data.append(fine_tuned_out(row, active, serving.get(row.id), by_id.get))
        # Each checkpoint right after its model, newest step first, as a model of its own.
        data += [
            checkpoint_model_out(row, c, active, serving.get(c.id), servable)
            for c in reversed(checkpoints.get(row.id, []))
        ]
    return ModelList(data=data)


def checkpoint_model_out(
    parent: ModelRecord,
    checkpoint: CheckpointModel,
    active_model: str | None,
    serving: dict[str, Any] | None,
    servable: bool,
) -> ModelOut:
    """A checkpoint as a model: a new job may continue from it, and where the serving engine loads adapters
    (vLLM: ``servable``, from ``adapters_served``) it answers as its adapter on the base model."""
    return ModelOut(
        id=checkpoint.id,
        created=unix_required(checkpoint.created_at),
        owned_by=parent.tenant_id,
        conch={
            "kind": "checkpoint",
            "base_model": parent.base_model,
            "parent_model": parent.id,
            "step": checkpoint.step,
            "job_id": checkpoint.job_id,
            "metrics": checkpoint.metrics,
            "servable": servable,
            "deployed": checkpoint.id == active_model,
            "serving": serving,
        },
    )


def _fine_tuned(session: Session, tenant_id: str, model_id: str) -> ModelRecord | None:
    return session.scalars(
        select(ModelRecord).where(ModelRecord.id == model_id, ModelRecord.tenant_id == tenant_id)
    ).first()


def get_model(session: Session, tenant_id: str, model_id: str, settings: Settings) -> ModelOut:
    active = _active_model(session, tenant_id)
    serving = _serving(session, tenant_id).get(model_id)
    if model_id in settings.base_models:
        return base_model_out(model_id, settings, active, serving)
    checkpoint = parse_checkpoint_model_id(model_id)
    row = _fine_tuned(session, tenant_id, checkpoint[0] if checkpoint else model_id)
    if row is not None and checkpoint is not None:
        found = [c for c in checkpoint_models(session, tenant_id, [row.id]) if c.step == checkpoint[1]]
        if found and row.status == ModelStatus.READY:
            return checkpoint_model_out(row, found[0], active, serving, adapters_served(session, settings))
        row = None
    if row is None:
        raise NotFound(f"No such model: {model_id}", param="model")
    return fine_tuned_out(row, active, serving, lambda parent: _fine_tuned(session, tenant_id, parent))


def start_model_base(session: Session, tenant_id: str, name: str, settings: Settings) -> str:
    """The root base model of what a new job names as ``model``: a configured base model, or a fine-tuned model
    or checkpoint of this tenant to continue. Another tenant's model reads as unknown. The model row is held
    FOR SHARE until the job commits, so a concurrent delete either wins first or then sees the job."""
    if name in settings.base_models:
        return name
    base: str | None = None
    checkpoint = parse_checkpoint_model_id(name)
    model_id = checkpoint[0] if checkpoint else name
    record = session.scalars(
        select(ModelRecord)
        .where(ModelRecord.id == model_id, ModelRecord.tenant_id == tenant_id)
        .with_for_update(read=True)
    ).first()
    if record is not None and checkpoint is not None:
        # Checkpoints of a published model (they go when it is deleted), as its job recorded them.
        found = session.scalars(
            select(Checkpoint.id)
            .join(FineTuningJob, FineTuningJob.id == Checkpoint.job_id)
            .where(
                FineTuningJob.tenant_id == tenant_id,
                FineTuningJob.fine_tuned_model == model_id,
                Checkpoint.step == checkpoint[1],
            )
        ).first()
        if found is None:
            record = None
    if record is not None:
        if record.status != ModelStatus.READY:
            raise InvalidRequest(
                f"{model_id} is {record.status}, not ready to train from.", param="model", code="model_not_ready"
            )
        base = record.base_model
    if base is None:
        raise InvalidRequest(
            f"Unknown model '{name}': name a configured base model ({', '.join(sorted(settings.base_models))}), "
            "or a fine-tuned model or checkpoint of this organization.",
            param="model",
            code="model_not_found",
        )
    if base not in settings.base_models:
        raise InvalidRequest(
            f"{name} was trained from the base model '{base}', which is no longer configured.",
            param="model",
            code="model_not_found",
        )
    return base


def _remove_artifacts(paths: list[Path], root: Path) -> None:
    for path in paths:
        # Only ever delete inside the artifact root, whatever a row says.
        if path.is_relative_to(root) and path != root:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _remove_exports(folder: Path, settings: Settings) -> None:
    """The llama.cpp exports and reference answers inference cached for this model folder (named after it)."""
    cache = settings.gguf_cache_dir
    # A published folder is named by its job's 32-hex key, so the prefix cannot match a base model's cache.
    if not folder.is_relative_to(settings.artifacts) or len(folder.name) != 32 or not cache.is_dir():
        return
    for cached in cache.glob(f"{folder.name}-*"):
        if cached.is_file():
            cached.unlink(missing_ok=True)


def delete_model(session: Session, tenant_id: str, model_id: str, settings: Settings) -> ModelDeleted:
    if model_id in settings.base_models:
        raise InvalidRequest("Base models come from configuration and cannot be deleted.", param="model")
    checkpoint = parse_checkpoint_model_id(model_id)
    if checkpoint is not None and _fine_tuned(session, tenant_id, checkpoint[0]) is not None:
        raise InvalidRequest(
            f"{model_id} is a checkpoint of {checkpoint[0]}: it is deleted with that model.",
            param="model",
            code="checkpoint_not_deletable",
        )
    row = session.scalars(
        select(ModelRecord).where(ModelRecord.id == model_id, ModelRecord.tenant_id == tenant_id).with_for_update()
    ).first()
    if row is None:
        raise NotFound(f"No such model: {model_id}", param="model")
    if _active_model(session, tenant_id) == model_id:
        raise Conflict(f"{model_id} is the deployed model; deploy another model first.", code="model_deployed")
    in_flight = session.scalars(
        select(Deployment.id).where(
            Deployment.tenant_id == tenant_id, Deployment.model_id == model_id, Deployment.status.in_(_IN_FLIGHT)
        )
    ).first()
    if in_flight is not None:
        raise Conflict(f"{model_id} is being deployed; wait for that to finish.", code="model_deploying")
    continuing = session.scalars(
        select(FineTuningJob.id).where(
            FineTuningJob.tenant_id == tenant_id,
            FineTuningJob.status.in_([s.value for s in LIVE_STATUSES]),
            (FineTuningJob.model == model_id)
            | FineTuningJob.model.startswith(f"{model_id}:ckpt-step-", autoescape=True),
        )
    ).first()
    if continuing is not None:
        raise Conflict(
            f"{model_id} is being trained from by a job that has not finished; wait for it or cancel it.",
            code="model_in_use",
        )
    paths = [Path(p) for p in (row.storage_path, row.adapter_path) if p]
    if row.job_id is not None:
        # The job's checkpoints (and the rows that list them) go with the model they were trained into.
        paths.append(job_dir(row.job_id, settings))
        paths += [
            Path(p) for p in session.scalars(select(Checkpoint.storage_path).where(Checkpoint.job_id == row.job_id))
        ]
        session.execute(delete(Checkpoint).where(Checkpoint.job_id == row.job_id))
    root = settings.artifacts
    folder = Path(row.storage_path)
    session.delete(row)

    def remove() -> None:
        _remove_artifacts(paths, root)
        _remove_exports(folder, settings)

    on_commit(session, remove)
    log.info("model.deleted", extra={"model_id": model_id, "tenant_id": tenant_id})
    return ModelDeleted(id=model_id, deleted=True)


# ------------------------------------------------------------------------------------------------ deployments


def deployment_out(row: Deployment) -> DeploymentOut:
    return DeploymentOut(
        id=row.public_id,
        model=row.model_id,
        status=row.status,
        reason=row.reason,
        requested_by=row.requested_by,
        created_at=unix_required(row.created_at),
        updated_at=unix_required(row.updated_at),
        activated_at=unix(row.activated_at),
        latency_seconds=row.latency_seconds,
        route=row.route,
        fidelity=row.fidelity,
        serve_as=row.serve_as,
    )


def _check_deployable(session: Session, tenant_id: str, model_id: str, settings: Settings) -> ModelRecord | None:
    """The fine-tuned model's row (None for a base model)."""
    if model_id in settings.base_models:
        return None
    # FOR SHARE until this transaction ends: a concurrent delete (FOR UPDATE on the same row) either commits
    # first, and this finds no row, or waits and then sees this deployment in flight and refuses.
    row = session.scalars(
        select(ModelRecord)
        .where(ModelRecord.id == model_id, ModelRecord.tenant_id == tenant_id)
        .with_for_update(read=True)
    ).first()
    if row is None:
        raise NotFound(f"No such model: {model_id}", param="model")
    if row.status != ModelStatus.READY:
        raise Conflict(f"{model_id} is {row.status}, not ready to serve.", code="model_not_ready")
    return row


def _serve_as(
    session: Session, requested: str | None, row: ModelRecord | None, settings: Settings, *, strict: bool = True
) -> str:
    """How to serve the model: as requested, else the backend's default (its adapter where the backend serves one:
    this api's INFERENCE_BACKEND=vllm, or a live vLLM replica). ``merged`` is honoured everywhere; ``adapter`` only
    where it can be, else 422 (``strict``) or the default."""
    if requested == MERGED:
        return MERGED
    vllm_replicas = (
        row is not None and settings.inference_backend != "vllm" and bool(adapter_replicas(session, settings))
    )
    if requested == ADAPTER:
        refusal = adapter_refusal(settings, row, vllm_replicas=vllm_replicas)
        if refusal is None:
            return ADAPTER
        if strict:
            raise ValidationFailed(f"serve_as 'adapter' cannot be honoured: {refusal}.", param="serve_as")
    return default_serve_as(settings, row, vllm_replicas=vllm_replicas)


def _check_pending_cap(session: Session, tenant_id: str, settings: Settings) -> None:
    """At most MAX_PENDING_DEPLOYMENTS_PER_TENANT deployments of one tenant wait to load. Counted under the
    tenant's deployments lock, so concurrent deploys cannot all slip under the cap. (Inference loads only a tenant's
    newest pending deployment and supersedes the older ones, so a full queue is a client deploying in a loop.)"""
    lock_tenant_deployments(session, tenant_id)
    waiting = pending_count(session, tenant_id)
    cap = settings.max_pending_deployments_per_tenant
    if waiting >= cap:
        raise RateLimited(
            f"Too many deployments waiting to load ({waiting}; the limit is {cap}); deploy again once they have "
            "loaded (GET /v1/deployments shows them).",
            code="too_many_pending_deployments",
        )


def deploy(
    session: Session,
    *,
    tenant_id: str,
    model_id: str,
    actor: str,
    settings: Settings,
    serve_as: str | None = None,
    strict: bool = True,
) -> Deployment:
    """Record the request; once committed, tell inference services to load the model now. ``serve_as``: adapter or
    merged (None: the backend's default); ``strict``: an adapter that cannot be honoured is a 422, not merged."""
    row = _check_deployable(session, tenant_id, model_id, settings)
    mode = _serve_as(session, serve_as, row, settings, strict=strict)
    _check_pending_cap(session, tenant_id, settings)
    deployment = request_deployment(session, tenant_id=tenant_id, model_id=model_id, requested_by=actor, serve_as=mode)
    session.refresh(deployment)
    on_commit(session, lambda: announce(deployment, settings))
    log.info("deployment.requested", extra={"deployment_id": deployment.public_id, "model_id": model_id})
    return deployment


def _servable(session: Session, tenant_id: str, model_id: str, settings: Settings) -> bool:
    if model_id in settings.base_models:
        return True
    row = _fine_tuned(session, tenant_id, model_id)
    return row is not None and row.status == ModelStatus.READY


def rollback(
    session: Session, *, tenant_id: str, current_model: str | None, actor: str, settings: Settings
) -> Deployment:
    """Deploy the model that served before ``current_model`` (default: the active one), skipping deleted models;
    before the first deployment the default base model served. Repeated rollbacks keep walking back. The model is
    served the way it was then (adapter or merged; the same model served the other way is a step back too)."""
    if current_model is None:
        active = active_deployment(session, tenant_id)
        if active is None:
            raise Conflict("No model is deployed, so there is nothing to roll back.", code="nothing_to_roll_back")
        current_model = active.model_id
    target = rollback_entry(
        session,
        tenant_id,
        current_model,
        base_model=settings.default_base_model,
        servable=lambda model_id: _servable(session, tenant_id, model_id, settings),
    )
    if target is None:
        raise Conflict(
            f"No model that can still serve was deployed before {current_model}; there is nothing to roll back to.",
            code="nothing_to_roll_back",
        )
    requested_by = f"{ROLLBACK_PREFIX}{actor}"[:64]
    return deploy(
        session,
        tenant_id=tenant_id,
        model_id=target.model_id,
        actor=requested_by,
        settings=settings,
        serve_as=target.serve_as,
        strict=False,  # the backend may have changed since: then the way it can serve it now
    )


def get_deployment(session: Session, tenant_id: str, public_id: str) -> Deployment:
    deployment_id = parse_public_id(public_id, Prefix.DEPLOYMENT)
    row = None
    if deployment_id is not None:
        row = session.scalars(
            select(Deployment).where(Deployment.id == deployment_id, Deployment.tenant_id == tenant_id)
        ).first()
    if row is None:
        raise NotFound(f"No such deployment: {public_id}", param="deployment_id")
    return row


def list_deployments(session: Session, tenant_id: str, *, after: str | None, limit: int) -> DeploymentList:
    cursor: tuple[Any, ...] | None = None
    if after:
        try:
            anchor = get_deployment(session, tenant_id, after)
        except NotFound as exc:
            raise unknown_cursor(after) from exc
        cursor = (anchor.created_at, anchor.id)
    rows, has_more = cursor_page(
        session,
        select(Deployment).where(Deployment.tenant_id == tenant_id),
        keys=[Deployment.created_at, Deployment.id],
        after=cursor,
        limit=limit,
    )
    return DeploymentList(data=[deployment_out(r) for r in rows], has_more=has_more)
