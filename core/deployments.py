"""Which model answers a tenant's requests: deployment rows written by the api and the worker, driven to
``active`` or ``failed`` by the inference service."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.contracts import DeploymentAnnouncement, DeploymentStatus
from core.orm import Deployment
from core.pubsub import announce_deployment
from core.settings import Settings


def request_deployment(session: Session, *, tenant_id: str, model_id: str, requested_by: str) -> Deployment:
    deployment = Deployment(
        tenant_id=tenant_id, model_id=model_id, requested_by=requested_by, status=DeploymentStatus.PENDING
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
        session.scalars(
            select(Deployment)
            .where(Deployment.status.in_([DeploymentStatus.PENDING, DeploymentStatus.LOADING]))
            .order_by(Deployment.created_at)
        )
    )


# A deployment requested by a rollback says so in ``requested_by``: the history then steps back instead of forward.
ROLLBACK_PREFIX = "rollback:"


def serving_history(session: Session, tenant_id: str, base_model: str) -> list[str]:
    """The models that served this tenant, oldest first, as a stack: ``base_model`` (what serves before any
    deployment) at the bottom, each activation pushed on top, and each activated rollback popping back down to the
    model it returned to. Repeated rollbacks therefore walk back through history rather than toggle between the
    last two models."""
    rows = session.execute(
        select(Deployment.model_id, Deployment.requested_by)
        .where(
            Deployment.tenant_id == tenant_id,
            Deployment.status.in_([DeploymentStatus.ACTIVE, DeploymentStatus.SUPERSEDED]),
            Deployment.activated_at.is_not(None),
        )
        .order_by(Deployment.activated_at.asc(), Deployment.created_at.asc())
    ).all()
    stack = [base_model]
    for model_id, requested_by in rows:
        if (requested_by or "").startswith(ROLLBACK_PREFIX) and model_id in stack:
            last = len(stack) - 1 - stack[::-1].index(model_id)
            del stack[last + 1 :]
        elif stack[-1] != model_id:
            stack.append(model_id)
    return stack


def rollback_target(
    session: Session, tenant_id: str, current_model_id: str, *, base_model: str, servable: Callable[[str], bool]
) -> str | None:
    """The model that served before ``current_model_id`` and can still serve (``servable``: not deleted), or None
    when ``current_model_id`` never served or nothing servable came before it."""
    stack = serving_history(session, tenant_id, base_model)
    if current_model_id not in stack:
        return None
    last = len(stack) - 1 - stack[::-1].index(current_model_id)
    for model_id in reversed(stack[:last]):
        if model_id != current_model_id and servable(model_id):
            return model_id
    return None
