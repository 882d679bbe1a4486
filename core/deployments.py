"""Which model answers a tenant's requests: deployment rows written by the api and the worker, driven to
``active`` or ``failed`` by the inference replicas, each of which keeps its own state in ``deployment_replicas``.

Every change of a deployment's status is a conditional UPDATE (``... WHERE status IN (expected)``), so a replica
acting on what it read a while ago cannot undo what another replica did since. The rules:

- active: when the first replica has loaded it (and no newer deployment of the tenant is active already); the
  tenant's older active deployment is then superseded.
- failed: when a replica failed to load it, no live replica (heartbeat within REPLICA_STALE_SECONDS, in
  ``inference_replicas``) is still loading or serving it, and every live replica has tried it. A replica's
  failure of a deployment another replica activated fails it for that replica alone: it keeps serving the
  tenant's previous model and says so in its ``/readyz``.
- superseded before loading: a pending deployment with a newer pending, loading or active one of its tenant is
  never loaded (only the newest request of a tenant matters), so a tenant's flood of deploys costs one load.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from sqlalchemy import ColumnElement, and_, delete, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from core import ids
from core.contracts import DeploymentAnnouncement, DeploymentStatus
from core.jobs import LOCK_NAMESPACE, db_now, is_postgres
from core.orm import Deployment, DeploymentReplica, InferenceReplica, ModelRecord
from core.pubsub import announce_deployment
from core.redact import hide_paths
from core.settings import Settings

IN_FLIGHT = (DeploymentStatus.PENDING.value, DeploymentStatus.LOADING.value)
REASON_LIMIT = 2000
DEPLOYMENTS_LOCK = "deployments:"
SUPERSEDED_UNLOADED = "superseded by a newer deployment of this tenant before it was loaded"


class ReplicaState(StrEnum):
    LOADING = "loading"
    ACTIVE = "active"
    FAILED = "failed"


def replica_identity(settings: Settings) -> str:
    """This inference replica's name: INFERENCE_REPLICA_ID, else the host name (a container's name, which its
    restarts keep). Two replicas on one host must each set INFERENCE_REPLICA_ID."""
    return (settings.inference_replica_id or socket.gethostname())[:128]


def lock_tenant_deployments(session: Session, tenant_id: str) -> None:
    """Serialise, until this transaction ends, the decisions about one tenant's deployments (admitting under the
    pending cap, activating and superseding). SQLite runs one writing transaction at a time and needs nothing."""
    if is_postgres(session):
        session.execute(select(func.pg_advisory_xact_lock(LOCK_NAMESPACE, func.hashtext(DEPLOYMENTS_LOCK + tenant_id))))


def pending_count(session: Session, tenant_id: str) -> int:
    return int(
        session.execute(
            select(func.count())
            .select_from(Deployment)
            .where(Deployment.tenant_id == tenant_id, Deployment.status == DeploymentStatus.PENDING)
        ).scalar_one()
    )


# How a deployment serves a fine-tune (``Deployment.serve_as``): as its LoRA adapter on its base model's server (only
# INFERENCE_BACKEND=vllm loads adapters), or as its merged weights, a model of its own (every backend; a base model
# is always its own weights).
ADAPTER = "adapter"
MERGED = "merged"
SERVE_AS = (ADAPTER, MERGED)


def adapter_refusal(settings: Settings, record: ModelRecord | None, *, vllm_replicas: bool = False) -> str | None:
    """Why the model (``record``; None for a base model) cannot be served as its adapter, or None when it can.
    ``vllm_replicas``: some live inference replica serves adapters (``adapter_replicas``), whatever this process's
    own INFERENCE_BACKEND."""
    if settings.inference_backend != "vllm" and not vllm_replicas:
        return (
            f"INFERENCE_BACKEND={settings.inference_backend} serves every model from its merged weights and no "
            "live inference replica serves adapters; only INFERENCE_BACKEND=vllm serves a fine-tune as its adapter"
        )
    if record is None:
        return "a base model is served as its own weights, it has no adapter"
    if record.parent_model:
        return (
            f"{record.id} continued {record.parent_model}: its adapter applies to that model's weights, not to a "
            "base model's"
        )
    if record.base_model not in settings.base_models:
        return f"its base model {record.base_model!r} is not configured"
    return None


def default_serve_as(settings: Settings, record: ModelRecord | None, *, vllm_replicas: bool = False) -> str:
    """The adapter where the backend can serve it as one, else the merged weights."""
    return ADAPTER if adapter_refusal(settings, record, vllm_replicas=vllm_replicas) is None else MERGED


def request_deployment(
    session: Session, *, tenant_id: str, model_id: str, requested_by: str, serve_as: str | None = None
) -> Deployment:
    """``serve_as``: ``adapter`` or ``merged`` (checked by the caller); None: the backend's default."""
    deployment = Deployment(
        tenant_id=tenant_id,
        model_id=model_id,
        requested_by=requested_by,
        status=DeploymentStatus.PENDING,
        serve_as=serve_as,
    )
    session.add(deployment)
    session.flush()
    return deployment


def announce(deployment: Deployment, settings: Settings) -> None:
    """Call after commit: tells listening inference services to load the model now rather than at next poll."""
    announce_deployment(
        DeploymentAnnouncement(
            deployment_id=str(deployment.id), model_id=deployment.model_id, tenant_id=deployment.tenant_id
        ),
        settings,
    )


def active_deployment(session: Session, tenant_id: str) -> Deployment | None:
    return session.scalars(
        select(Deployment)
        .where(Deployment.tenant_id == tenant_id, Deployment.status == DeploymentStatus.ACTIVE)
        .order_by(Deployment.activated_at.desc(), Deployment.created_at.desc())
        .limit(1)
    ).first()


def pending_deployments(session: Session) -> list[Deployment]:
    return list(
        session.scalars(select(Deployment).where(Deployment.status.in_(IN_FLIGHT)).order_by(Deployment.created_at))
    )


def coalesce_pending(session: Session) -> int:
    """Supersede, without loading them, pending deployments that a newer deployment of the same tenant (pending,
    loading or active) makes pointless. Returns how many."""
    newer = aliased(Deployment)
    result = session.execute(
        update(Deployment)
        .where(
            Deployment.status == DeploymentStatus.PENDING,
            exists().where(
                newer.tenant_id == Deployment.tenant_id,
                newer.id != Deployment.id,
                newer.status.in_([*IN_FLIGHT, DeploymentStatus.ACTIVE.value]),
                newer.created_at > Deployment.created_at,
            ),
        )
        .values(status=DeploymentStatus.SUPERSEDED, reason=SUPERSEDED_UNLOADED, updated_at=db_now(session))
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def fair_queue(session: Session, replica_id: str) -> list[uuid.UUID]:
    """The in-flight deployments this replica still has to load, one per tenant (the tenant's newest), tenants
    that have waited longest first. A pass loads each once, so however many deploys one tenant sends, another
    tenant's waits behind at most one load of each other tenant, never behind the whole flood."""
    settled = select(DeploymentReplica.deployment_id).where(
        DeploymentReplica.replica_id == replica_id,
        DeploymentReplica.state.in_([ReplicaState.ACTIVE.value, ReplicaState.FAILED.value]),
    )
    rows = session.execute(
        select(Deployment.id, Deployment.tenant_id, Deployment.created_at)
        .where(Deployment.status.in_(IN_FLIGHT), Deployment.id.not_in(settled))
        .order_by(Deployment.created_at)
    ).all()
    newest: dict[str, tuple[uuid.UUID, datetime]] = {}
    waiting_since: dict[str, datetime] = {}
    for deployment_id, tenant, created_at in rows:
        waiting_since.setdefault(tenant, created_at)
        newest[tenant] = (deployment_id, created_at)
    return [newest[tenant][0] for tenant in sorted(newest, key=lambda t: (waiting_since[t], t))]


# ------------------------------------------------------------------------------------------------ one replica


def claim_for_replica(session: Session, deployment_id: uuid.UUID, replica_id: str) -> DeploymentReplica | None:
    """Start this replica's load of the deployment: its row becomes ``loading`` with one more attempt (commit this
    before the load starts, so a load that kills the process is counted), and an in-flight deployment becomes
    ``loading``. None when the deployment is gone."""
    deployment = session.get(Deployment, deployment_id)
    if deployment is None:
        return None
    now = db_now(session)
    row = session.get(DeploymentReplica, (deployment_id, replica_id), with_for_update=True)
    if row is None:
        row = DeploymentReplica(
            deployment_id=deployment_id, replica_id=replica_id, load_attempts=0, heartbeat_at=now, updated_at=now
        )
        session.add(row)
    row.state = ReplicaState.LOADING
    row.reason = None
    row.load_attempts = (row.load_attempts or 0) + 1
    row.heartbeat_at = row.updated_at = now
    session.execute(
        update(Deployment)
        .where(Deployment.id == deployment_id, Deployment.status.in_(IN_FLIGHT))
        .values(status=DeploymentStatus.LOADING, load_attempts=Deployment.load_attempts + 1, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.flush()
    return row


def release_claim(session: Session, deployment_id: uuid.UUID, replica_id: str) -> None:
    """The load never started (its base model is still being prepared): it counts as no attempt."""
    row = session.get(DeploymentReplica, (deployment_id, replica_id), with_for_update=True)
    if row is not None:
        row.load_attempts = max(0, (row.load_attempts or 0) - 1)


def _set_replica_state(
    session: Session, deployment_id: uuid.UUID, replica_id: str, state: ReplicaState, reason: str | None, now: datetime
) -> None:
    row = session.get(DeploymentReplica, (deployment_id, replica_id), with_for_update=True)
    if row is None:
        row = DeploymentReplica(deployment_id=deployment_id, replica_id=replica_id, load_attempts=0)
        session.add(row)
    row.state = state
    row.reason = hide_paths(reason)[:REASON_LIMIT] if reason else None
    if state == ReplicaState.ACTIVE:
        row.load_attempts = 0  # the count is of loads that never finished
    row.heartbeat_at = row.updated_at = now
    session.flush()


def activate_for_replica(
    session: Session,
    deployment_id: uuid.UUID,
    replica_id: str,
    *,
    route: str | None = None,
    fidelity: dict[str, object] | None = None,
) -> tuple[str, float | None]:
    """This replica loaded the deployment. Returns its status afterwards and, when this call activated it, the
    latency from request to activation. An in-flight deployment becomes active unless a newer one of its tenant
    already is (then it is superseded); the tenant's older active deployment is superseded."""
    deployment = session.get(Deployment, deployment_id)
    if deployment is None:
        return DeploymentStatus.FAILED.value, None
    tenant = deployment.tenant_id
    lock_tenant_deployments(session, tenant)
    now = db_now(session)
    _set_replica_state(session, deployment_id, replica_id, ReplicaState.ACTIVE, None, now)
    session.refresh(deployment)
    if deployment.status not in IN_FLIGHT:
        return deployment.status, None
    newer_active = session.execute(
        select(Deployment.id).where(
            Deployment.tenant_id == tenant,
            Deployment.status == DeploymentStatus.ACTIVE,
            Deployment.created_at > deployment.created_at,
        )
    ).first()
    created = deployment.created_at
    latency = _elapsed(created, now)
    values: dict[str, object] = (
        {"status": DeploymentStatus.SUPERSEDED, "reason": "a newer deployment of this tenant became active first"}
        if newer_active is not None
        else {
            "status": DeploymentStatus.ACTIVE,
            "activated_at": now,
            "reason": None,
            "latency_seconds": latency,
            **({"route": route, "fidelity": fidelity} if route is not None else {}),
        }
    )
    changed = session.execute(
        update(Deployment)
        .where(Deployment.id == deployment_id, Deployment.status.in_(IN_FLIGHT))
        .values(updated_at=now, **values)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    if changed != 1 or newer_active is not None:
        session.refresh(deployment)
        return deployment.status, None
    session.execute(
        update(Deployment)
        .where(
            Deployment.tenant_id == tenant,
            Deployment.status == DeploymentStatus.ACTIVE,
            Deployment.id != deployment_id,
            Deployment.created_at < created,
        )
        .values(status=DeploymentStatus.SUPERSEDED, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.refresh(deployment)
    return deployment.status, latency


def _still_held(deployment_id: uuid.UUID, since: datetime) -> ColumnElement[bool]:
    """Some live replica (heartbeat since ``since``) still loads or serves the deployment, or has not tried it
    yet."""
    tried = select(DeploymentReplica.replica_id).where(DeploymentReplica.deployment_id == deployment_id)
    return or_(
        exists().where(
            DeploymentReplica.deployment_id == deployment_id,
            DeploymentReplica.state.in_([ReplicaState.LOADING.value, ReplicaState.ACTIVE.value]),
            DeploymentReplica.heartbeat_at >= since,
        ),
        exists().where(InferenceReplica.heartbeat_at >= since, InferenceReplica.replica_id.not_in(tried)),
    )


def fail_for_replica(
    session: Session, deployment_id: uuid.UUID, replica_id: str, reason: str, *, stale_seconds: float
) -> bool:
    """This replica cannot serve the deployment: its own row says failed, and the deployment itself fails only if
    it is still in flight and every live replica failed it too. Returns whether the deployment failed."""
    now = db_now(session)
    _set_replica_state(session, deployment_id, replica_id, ReplicaState.FAILED, reason, now)
    return settle_failed(
        session, deployment_id, hide_paths(reason)[:REASON_LIMIT], now=now, stale_seconds=stale_seconds
    )


def settle_failed(
    session: Session, deployment_id: uuid.UUID, reason: str | None, *, now: datetime, stale_seconds: float
) -> bool:
    """Fail an in-flight deployment that no live replica holds any more: every live replica tried and failed it,
    or the ones still loading it went away."""
    since = now - timedelta(seconds=stale_seconds)
    values: dict[str, object] = {"status": DeploymentStatus.FAILED, "updated_at": now}
    if reason is not None:
        values["reason"] = reason
    result = session.execute(
        update(Deployment)
        .where(
            Deployment.id == deployment_id,
            Deployment.status.in_(IN_FLIGHT),
            ~_still_held(deployment_id, since),
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def heartbeat(session: Session, replica_id: str, *, max_lora_rank: int | None = None) -> int:
    """This replica is up: renew its presence (with the LoRA rank it serves as adapters, if it does), and its rows
    of deployments still in flight or active. Returns how many such rows it holds."""
    now = db_now(session)
    present = session.execute(
        update(InferenceReplica)
        .where(InferenceReplica.replica_id == replica_id)
        .values(heartbeat_at=now, max_lora_rank=max_lora_rank)
        .execution_options(synchronize_session=False)
    )
    if not present.rowcount:  # type: ignore[attr-defined]
        try:
            with session.begin_nested():
                session.add(
                    InferenceReplica(
                        replica_id=replica_id, started_at=now, heartbeat_at=now, max_lora_rank=max_lora_rank
                    )
                )
        except IntegrityError:
            pass  # another process of the same name got there first: its beat counts as this one's
    open_deployments = select(Deployment.id).where(Deployment.status.in_([*IN_FLIGHT, DeploymentStatus.ACTIVE.value]))
    result = session.execute(
        update(DeploymentReplica)
        .where(DeploymentReplica.replica_id == replica_id, DeploymentReplica.deployment_id.in_(open_deployments))
        .values(heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def adapter_replicas(session: Session, settings: Settings) -> list[tuple[str, int]]:
    """(replica, highest LoRA rank it loads) of each live inference replica that serves fine-tunes as adapters."""
    since = db_now(session) - timedelta(seconds=settings.replica_stale_seconds)
    rows = session.execute(
        select(InferenceReplica.replica_id, InferenceReplica.max_lora_rank)
        .where(InferenceReplica.heartbeat_at >= since, InferenceReplica.max_lora_rank.is_not(None))
        .order_by(InferenceReplica.replica_id)
    ).all()
    return [(replica, rank) for replica, rank in rows if rank is not None]


def adapters_served(session: Session, settings: Settings) -> bool:
    """Whether a fine-tune (or a checkpoint) can answer as its adapter: this process's INFERENCE_BACKEND=vllm or a
    live inference replica that serves adapters."""
    return settings.inference_backend == "vllm" or bool(adapter_replicas(session, settings))


def leave(session: Session, replica_id: str) -> None:
    """This replica stops: it no longer keeps a deployment waiting for it to try (its rows stay, as history)."""
    session.execute(delete(InferenceReplica).where(InferenceReplica.replica_id == replica_id))


def abandoned_by_replica(session: Session, replica_id: str) -> list[tuple[uuid.UUID, str | None]]:
    """In-flight deployments this replica failed, with its reason: each pass checks whether the others have given
    up too (or gone away)."""
    rows = session.execute(
        select(DeploymentReplica.deployment_id, DeploymentReplica.reason)
        .join(Deployment, Deployment.id == DeploymentReplica.deployment_id)
        .where(
            DeploymentReplica.replica_id == replica_id,
            DeploymentReplica.state == ReplicaState.FAILED,
            Deployment.status.in_(IN_FLIGHT),
        )
    ).all()
    return [(deployment_id, reason) for deployment_id, reason in rows]


def _elapsed(moment: datetime, now: datetime) -> float:
    if moment.tzinfo is None:  # SQLite hands timestamps back without their zone; they were written in UTC
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (now - moment).total_seconds())


@dataclass
class TenantTarget:
    """A tenant's active deployment as one replica sees it: ``state`` is the replica's own (None: not tried here
    yet), ``fallback`` the newest other deployment of the tenant that this replica serves (None: none, so the
    default base model)."""

    model: str
    deployment_id: uuid.UUID
    state: str | None
    fallback: tuple[str, uuid.UUID] | None = None


@dataclass
class ReplicaView:
    tenants: dict[str, TenantTarget] = field(default_factory=dict)
    # Deployments this replica failed that are active or still in flight elsewhere (for /readyz).
    failed: list[dict[str, str]] = field(default_factory=list)


def replica_view(session: Session, replica_id: str) -> ReplicaView:
    """Per tenant with an active deployment: that deployment, this replica's state of it, and what this replica
    served the tenant before it; and the deployments this replica failed that others serve or still load."""
    view = ReplicaView()
    active = session.execute(
        select(Deployment.id, Deployment.tenant_id, Deployment.model_id)
        .where(Deployment.status == DeploymentStatus.ACTIVE)
        .order_by(Deployment.activated_at.asc(), Deployment.created_at.asc())
    ).all()
    mine = dict(
        session.execute(
            select(DeploymentReplica.deployment_id, DeploymentReplica.state).where(
                DeploymentReplica.replica_id == replica_id
            )
        ).all()
    )
    # Ascending order: the newest active row of each tenant is written last and wins.
    for deployment_id, tenant, model in active:
        view.tenants[tenant] = TenantTarget(model, deployment_id, mine.get(deployment_id))
    served_here = session.execute(
        select(Deployment.id, Deployment.tenant_id, Deployment.model_id)
        .join(
            DeploymentReplica,
            and_(DeploymentReplica.deployment_id == Deployment.id, DeploymentReplica.replica_id == replica_id),
        )
        .where(Deployment.tenant_id.in_(list(view.tenants)), DeploymentReplica.state == ReplicaState.ACTIVE)
        .order_by(Deployment.created_at.asc())
    ).all()
    for deployment_id, tenant, model in served_here:  # ascending: the newest wins
        target = view.tenants[tenant]
        if deployment_id != target.deployment_id:
            target.fallback = (model, deployment_id)
    failures = session.execute(
        select(Deployment.id, Deployment.tenant_id, Deployment.model_id, DeploymentReplica.reason)
        .join(DeploymentReplica, DeploymentReplica.deployment_id == Deployment.id)
        .where(
            DeploymentReplica.replica_id == replica_id,
            DeploymentReplica.state == ReplicaState.FAILED,
            Deployment.status.in_([*IN_FLIGHT, DeploymentStatus.ACTIVE.value]),
        )
        .order_by(Deployment.created_at.asc())
    ).all()
    for deployment_id, tenant, model, reason in failures:
        view.failed.append(
            {
                "deployment": ids.public_id(ids.Prefix.DEPLOYMENT, deployment_id),
                "tenant": tenant,
                "model": model,
                "reason": reason or "load failed",
            }
        )
    return view


# A deployment requested by a rollback says so in ``requested_by``: the history then steps back instead of forward.
ROLLBACK_PREFIX = "rollback:"


@dataclass(frozen=True)
class Served:
    """One entry of a tenant's serving history: a model and how it was served (``serve_as``; None: the backend's
    default)."""

    model_id: str
    serve_as: str | None = None

    def same(self, other: Served) -> bool:
        """The same model served the same way (an unknown way, None, is taken as the same)."""
        if self.model_id != other.model_id:
            return False
        return self.serve_as is None or other.serve_as is None or self.serve_as == other.serve_as


def serving_history(session: Session, tenant_id: str, base_model: str) -> list[Served]:
    """What served this tenant, oldest first, as a stack: ``base_model`` (what serves before any deployment) at the
    bottom, each activation pushed on top (the same model served another way is a new entry), and each activated
    rollback popping back down to the entry it returned to. Repeated rollbacks therefore walk back through history
    rather than toggle between the last two models."""
    rows = session.execute(
        select(Deployment.model_id, Deployment.serve_as, Deployment.requested_by)
        .where(
            Deployment.tenant_id == tenant_id,
            Deployment.status.in_([DeploymentStatus.ACTIVE, DeploymentStatus.SUPERSEDED]),
            Deployment.activated_at.is_not(None),
        )
        .order_by(Deployment.activated_at.asc(), Deployment.created_at.asc())
    ).all()
    stack = [Served(base_model)]
    for model_id, serve_as, requested_by in rows:
        entry = Served(model_id, serve_as)
        if (requested_by or "").startswith(ROLLBACK_PREFIX):
            returned = _last_index(stack, entry)
            if returned is None:  # a row older than serve_as, or the base model: the same model will do
                returned = _last_index(stack, model_id)
            if returned is not None:
                del stack[returned + 1 :]
                continue
        if not stack[-1].same(entry):
            stack.append(entry)
    return stack


def _last_index(stack: list[Served], match: Served | str) -> int | None:
    """The last position of ``match`` (an entry, or any entry of a model id) in ``stack``."""
    for index in range(len(stack) - 1, -1, -1):
        if stack[index].model_id == match if isinstance(match, str) else stack[index].same(match):
            return index
    return None


def rollback_entry(
    session: Session, tenant_id: str, current_model_id: str, *, base_model: str, servable: Callable[[str], bool]
) -> Served | None:
    """What served before ``current_model_id`` (its latest entry in the history) and can still serve
    (``servable``: not deleted), with the way it was served; None when ``current_model_id`` never served or nothing
    servable came before it. The same model served the other way counts as what came before."""
    stack = serving_history(session, tenant_id, base_model)
    last = _last_index(stack, current_model_id)
    if last is None:
        return None
    current = stack[last]
    for entry in reversed(stack[:last]):
        if not entry.same(current) and servable(entry.model_id):
            return entry
    return None


def rollback_target(
    session: Session, tenant_id: str, current_model_id: str, *, base_model: str, servable: Callable[[str], bool]
) -> str | None:
    """The model of ``rollback_entry``."""
    entry = rollback_entry(session, tenant_id, current_model_id, base_model=base_model, servable=servable)
    return entry.model_id if entry is not None else None
