"""Which model answers a tenant's requests: deployment rows written by the api and the worker, driven to
``active`` or ``failed`` by the inference service."""

from __future__ import annotations

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


def previous_good_model(session: Session, tenant_id: str, current_model_id: str) -> str | None:
    """The model that was active before the current one (rollback target)."""
    rows = session.scalars(
        select(Deployment)
        .where(
            Deployment.tenant_id == tenant_id,
            Deployment.status.in_([DeploymentStatus.ACTIVE, DeploymentStatus.SUPERSEDED]),
            Deployment.activated_at.is_not(None),
        )
        .order_by(Deployment.activated_at.desc())
    )
    for row in rows:
        if row.model_id != current_model_id:
            return row.model_id
    return None
