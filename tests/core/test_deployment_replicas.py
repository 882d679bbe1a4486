"""A deployment's status changes only conditionally, so replicas acting on what they read a moment ago cannot undo
each other: a replica that failed to load never fails a deployment another replica activated or still loads."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session

from core.contracts import DeploymentStatus
from core.db import session_scope
from core.deployments import (
    abandoned_by_replica,
    activate_for_replica,
    claim_for_replica,
    coalesce_pending,
    fail_for_replica,
    fair_queue,
    heartbeat,
    leave,
    replica_view,
    settle_failed,
)
from core.jobs import db_now
from core.orm import Deployment, DeploymentReplica, utcnow
from tests.factories import fresh, make_deployment

STALE = 30.0


def _pending(db: Session, model: str = "tiny-llama", tenant: str = "default") -> Deployment:
    row = make_deployment(db, model, tenant_id=tenant)
    db.commit()
    return row


def _claim(row: Deployment, replica: str) -> None:
    with session_scope() as session:
        claim_for_replica(session, row.id, replica)


def _fail(row: Deployment, replica: str, reason: str = "no room") -> bool:
    with session_scope() as session:
        return fail_for_replica(session, row.id, replica, reason, stale_seconds=STALE)


def _activate(row: Deployment, replica: str) -> str:
    with session_scope() as session:
        status, _ = activate_for_replica(session, row.id, replica)
        return status


def test_a_late_failure_on_one_replica_leaves_a_deployment_another_activated_active(
    clean_db: None, db: Session
) -> None:
    row = _pending(db)
    _claim(row, "slow")  # both replicas start loading
    _claim(row, "fast")
    assert _activate(row, "fast") == DeploymentStatus.ACTIVE
    assert _fail(row, "slow", "failed loading /srv/conch/models/ft-x/config.json") is False  # the stale writer
    assert fresh(db, row).status == DeploymentStatus.ACTIVE and fresh(db, row).reason is None
    with session_scope() as session:
        failed = session.get(DeploymentReplica, (row.id, "slow"))
        assert failed is not None and failed.state == "failed"
        assert failed.reason == "failed loading config.json"  # stored without the server's folders
        view = replica_view(session, "slow")
    # The failing replica keeps the tenant's previous model (none: the default base model) and reports the failure.
    target = view.tenants["default"]
    assert target.state == "failed" and target.fallback is None
    assert [(f["model"], f["tenant"]) for f in view.failed] == [("tiny-llama", "default")]


def test_a_failure_while_another_replica_still_loads_waits_for_that_one(clean_db: None, db: Session) -> None:
    row = _pending(db)
    _claim(row, "a")
    _claim(row, "b")
    assert _fail(row, "a") is False
    assert fresh(db, row).status == DeploymentStatus.LOADING
    assert _fail(row, "b", "out of memory") is True  # the last live holder gave up: now it fails
    assert fresh(db, row).status == DeploymentStatus.FAILED and fresh(db, row).reason == "out of memory"


def test_a_live_replica_that_has_not_tried_yet_keeps_it_open(clean_db: None, db: Session) -> None:
    with session_scope() as session:  # two replicas are up; neither has served a deployment yet
        heartbeat(session, "a")
        heartbeat(session, "b")
    row = _pending(db)
    _claim(row, "a")
    assert _fail(row, "a") is False  # b has not tried it yet
    assert fresh(db, row).status == DeploymentStatus.LOADING
    _claim(row, "b")
    assert _fail(row, "b") is True
    assert fresh(db, row).status == DeploymentStatus.FAILED
    # Replicas that stop (leave) no longer keep a deployment waiting for them.
    other = _pending(db)
    with session_scope() as session:
        heartbeat(session, "c")
    _claim(other, "a")
    assert _fail(other, "a") is False
    with session_scope() as session:
        leave(session, "b")
        leave(session, "c")
    with session_scope() as session:
        assert settle_failed(session, other.id, None, now=db_now(session), stale_seconds=STALE) is True


def test_a_replica_that_stopped_beating_holds_nothing_open(clean_db: None, db: Session) -> None:
    row = _pending(db)
    _claim(row, "dead")
    with session_scope() as session:
        session.execute(
            update(DeploymentReplica)
            .where(DeploymentReplica.replica_id == "dead")
            .values(heartbeat_at=utcnow() - timedelta(seconds=STALE * 3))
        )
    assert _fail(row, "alive") is True
    assert fresh(db, row).status == DeploymentStatus.FAILED


def test_when_the_last_loader_dies_the_survivors_next_pass_fails_it(clean_db: None, db: Session) -> None:
    row = _pending(db)
    _claim(row, "a")
    _claim(row, "b")
    assert _fail(row, "a", "no room") is False  # b still loads it
    with session_scope() as session:
        assert heartbeat(session, "a") == 1
        session.execute(  # b's process dies mid-load: its heartbeat stops
            update(DeploymentReplica)
            .where(DeploymentReplica.replica_id == "b")
            .values(heartbeat_at=utcnow() - timedelta(seconds=STALE * 3))
        )
    with session_scope() as session:
        ((deployment_id, reason),) = abandoned_by_replica(session, "a")
        assert settle_failed(session, deployment_id, reason, now=db_now(session), stale_seconds=STALE) is True
    assert fresh(db, row).status == DeploymentStatus.FAILED and fresh(db, row).reason == "no room"


def test_an_older_deployment_finishing_late_never_replaces_a_newer_active_one(clean_db: None, db: Session) -> None:
    older, newer = _pending(db, "tiny-llama"), _pending(db, "tiny-qwen2")
    _claim(older, "slow")
    _claim(newer, "fast")
    assert _activate(newer, "fast") == DeploymentStatus.ACTIVE
    assert _activate(older, "slow") == DeploymentStatus.SUPERSEDED
    assert fresh(db, newer).status == DeploymentStatus.ACTIVE


def test_only_the_newest_pending_deployment_of_a_tenant_is_loaded(clean_db: None, db: Session) -> None:
    flood = [_pending(db, "tiny-llama", "a") for _ in range(5)]
    other = _pending(db, "tiny-qwen2", "b")
    for index, row in enumerate([*flood, other]):  # distinct request times, in this order
        row.created_at = utcnow() - timedelta(seconds=60 - index)
    db.commit()
    with session_scope() as session:
        assert coalesce_pending(session) == 4
        assert fair_queue(session, "r1") == [flood[-1].id, other.id]
    assert {fresh(db, r).status for r in flood[:-1]} == {DeploymentStatus.SUPERSEDED}
