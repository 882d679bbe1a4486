"""Helpers for the inference tests: deploying (the row, then the announcement), waiting on a deployment, an
in-process client, reading metrics, copying and breaking model folders (rows come from ``tests.factories``)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.contracts import DeploymentStatus
from core.deployments import announce
from core.orm import DEFAULT_TENANT, Deployment, DeploymentReplica, utcnow
from core.settings import Settings, get_settings
from tests.factories import fresh, make_deployment
from tests.polling import wait_until


def deploy(
    session: Session, model_id: str, *, tenant: str = DEFAULT_TENANT, publish: bool = True, status: str = "pending"
) -> Deployment:
    """A deployment row as the api or the worker commits it, then (optionally) the pub/sub announcement."""
    row = make_deployment(session, model_id, status=status, tenant_id=tenant)
    session.commit()
    if publish:
        announce(row, get_settings())
    return row


def wait_deployment(session: Session, row: Deployment, *statuses: str, timeout: float = 60.0) -> Deployment:
    return wait_until(
        lambda: (d := fresh(session, row)).status in statuses and d,
        timeout=timeout,
        what=f"deployment {statuses}",
    )


def settings(**overrides: Any) -> Settings:
    return Settings(**overrides)


@contextmanager
def app_client(wait_ready: bool = True, **overrides: Any) -> Iterator[TestClient]:
    from inference.app import create_app

    app = create_app(settings(**overrides))
    with TestClient(app) as client:
        if wait_ready:
            wait_until(lambda: client.get("/readyz").status_code == 200, what="/readyz 200")
        yield client


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric_name, _, label_text = head.partition("{")
        if metric_name != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
    return total


def copy_model(source: Path, target: Path, *, config_changes: dict[str, Any] | None = None) -> Path:
    shutil.copytree(source, target)
    if config_changes:
        config_path = target / "config.json"
        config = json.loads(config_path.read_text())
        config.update(config_changes)
        config_path.write_text(json.dumps(config))
    return target


def truncate_weights(folder: Path) -> None:
    weights = next(folder.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def replica_row(
    session: Session,
    deployment: Deployment,
    replica_id: str,
    *,
    state: str,
    load_attempts: int = 1,
    heartbeat_minutes_ago: float = 0.0,
) -> DeploymentReplica:
    """One replica's state of a deployment, as that replica left it (``heartbeat_minutes_ago``: when it was last
    alive)."""
    beat = utcnow() - timedelta(minutes=heartbeat_minutes_ago)
    row = DeploymentReplica(
        deployment_id=deployment.id,
        replica_id=replica_id,
        state=state,
        load_attempts=load_attempts,
        heartbeat_at=beat,
        updated_at=beat,
    )
    session.add(row)
    session.commit()
    return row


def replica_states(session: Session, deployment: Deployment) -> dict[str, str]:
    session.expire_all()
    rows = session.scalars(select(DeploymentReplica).where(DeploymentReplica.deployment_id == deployment.id))
    return {row.replica_id: row.state for row in rows}


ACTIVE = DeploymentStatus.ACTIVE.value
FAILED = DeploymentStatus.FAILED.value
SUPERSEDED = DeploymentStatus.SUPERSEDED.value
