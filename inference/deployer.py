"""Driving deployments: pending -> loading -> active (the previous one superseded) or failed, with the reason.

The database is the truth. ``reconcile`` reads it (on start-up, on every pub/sub doorbell and every poll), so a
missed message or a restart loses nothing: whatever is active is served, whatever is pending gets deployed.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime

from sqlalchemy import select

from core.base_models import is_prepared
from core.contracts import DeploymentStatus
from core.db import session_scope
from core.deployments import pending_deployments
from core.orm import DEFAULT_TENANT, Deployment, utcnow
from core.settings import Settings
from inference.catalog import ModelNotReady, ModelSource, base_source, resolve
from inference.engine.loader import ModelLoadError
from inference.gate import GateResult
from inference.metrics import Metrics
from inference.registry import Registry

log = logging.getLogger("conch.inference.deployer")

REASON_LIMIT = 2000
# A deployment found still "loading" this many times when a load starts took its inference process down with it
# each time (a native crash while loading or gating): it is failed instead of crashing every restart.
MAX_LOAD_ATTEMPTS = 3


def _elapsed_since(moment: datetime, now: datetime) -> float:
    if moment.tzinfo is None:  # SQLite hands timestamps back without their zone; they were written in UTC
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (now - moment).total_seconds())


class Deployer:
    def __init__(self, registry: Registry, settings: Settings, metrics: Metrics) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics

    def reconcile(self) -> None:
        """One pass: learn what is active, deploy what is pending, load what must be served, drop dead engines."""
        self.registry.maintain()
        self.registry.retune_threads()
        self._refresh_defaults()
        with session_scope() as session:
            pending = [d.id for d in pending_deployments(session)]
        for deployment_id in pending:
            self.deploy(deployment_id)
        self._load_defaults()

    # ------------------------------------------------------------------------------- what is served

    def _refresh_defaults(self) -> None:
        with session_scope() as session:
            rows = session.execute(
                select(Deployment.tenant_id, Deployment.model_id)
                .where(Deployment.status == DeploymentStatus.ACTIVE)
                .order_by(Deployment.activated_at.asc(), Deployment.created_at.asc())
            ).all()
        # Ascending order: the newest active row of each tenant is written last and wins.
        self.registry.replace_defaults({tenant: model for tenant, model in rows})
        self.registry.synced = True

    def _load_defaults(self) -> None:
        defaults = self.registry.defaults()
        wanted = [(DEFAULT_TENANT, self.registry.default_for(DEFAULT_TENANT))]
        wanted += [(tenant, name) for tenant, name in defaults.items() if tenant != DEFAULT_TENANT]
        for tenant, name in wanted:
            handle = self.registry.loaded(name)
            if handle is not None and handle.engine.alive:
                continue
            try:
                self.registry.ensure(self._source(name, tenant))
            except ModelNotReady as exc:
                self.registry.problems[name] = exc.message  # e.g. base model still being prepared: retry next pass
            except ModelLoadError as exc:
                log.error("model.load_failed", extra={"model": name, "tenant": tenant, "error": str(exc)})
            except Exception as exc:
                self.registry.problems[name] = f"{type(exc).__name__}: {exc}"
                log.error("model.load_failed", extra={"model": name, "tenant": tenant, "error": str(exc)})

    def _source(self, name: str, tenant: str) -> ModelSource:
        if name in self.settings.base_models:
            return base_source(name, self.settings)
        with session_scope() as session:
            return resolve(session, name, tenant, self.settings)

    # ------------------------------------------------------------------------------- one deployment

    def deploy(self, deployment_id: uuid.UUID) -> None:
        claimed = self._claim(deployment_id)
        if claimed is None:
            return
        tenant, model_id, attempts = claimed
        if attempts > MAX_LOAD_ATTEMPTS:
            self._fail(
                deployment_id,
                f"loading {model_id} stopped the inference service {attempts - 1} times (a crash in native code); "
                "it is not tried again",
            )
            return
        log.info("deployment.loading", extra={"deployment_id": str(deployment_id), "model": model_id})
        try:
            source = self._source(model_id, tenant)
        except ModelNotReady as exc:
            if model_id in self.settings.base_models and not is_prepared(model_id, self.settings):
                self._set_status(deployment_id, DeploymentStatus.PENDING, exc.message, uncount=True)  # wait
                return
            self._fail(deployment_id, exc.message)
            return
        except Exception as exc:
            self._fail(deployment_id, getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}")
            return
        try:
            # A model already in memory is smoke-tested again: it must answer now, not when it was loaded.
            handle = self.registry.ensure(source, deploying=True)
        except Exception as exc:
            self._fail(deployment_id, f"{type(exc).__name__}: {exc}")
            return
        self._activate(deployment_id, tenant, model_id, handle.gate)

    def _claim(self, deployment_id: uuid.UUID) -> tuple[str, str, int] | None:
        """Mark the deployment loading and count the attempt (committed before the load starts, so a load that
        kills the process is still counted)."""
        with session_scope() as session:
            row = session.get(Deployment, deployment_id, with_for_update=True)
            if row is None or row.status not in (DeploymentStatus.PENDING, DeploymentStatus.LOADING):
                return None
            row.load_attempts = (row.load_attempts or 0) + 1
            row.status = DeploymentStatus.LOADING
            return row.tenant_id, row.model_id, row.load_attempts

    def _activate(self, deployment_id: uuid.UUID, tenant: str, model_id: str, gate: GateResult | None) -> None:
        # The in-memory switch comes first, inside the transaction that marks the row active, and is undone if
        # that transaction does not commit: whoever reads "active" from the database is already served the new
        # model. Requests already running keep their hold on the old one.
        before = self.registry.defaults()
        latency: float | None = None
        try:
            with session_scope() as session:
                row = session.get(Deployment, deployment_id, with_for_update=True)
                if row is None or row.status != DeploymentStatus.LOADING:
                    return  # changed under us (another replica finished it); the next refresh picks it up
                now = utcnow()
                for other in session.scalars(
                    select(Deployment).where(
                        Deployment.tenant_id == tenant,
                        Deployment.status == DeploymentStatus.ACTIVE,
                        Deployment.id != deployment_id,
                    )
                ):
                    other.status = DeploymentStatus.SUPERSEDED
                row.status = DeploymentStatus.ACTIVE
                row.activated_at = now
                row.reason = None
                row.latency_seconds = latency = _elapsed_since(row.created_at, now)
                if gate is not None:
                    row.route = gate.route
                    row.fidelity = gate.to_json()
                self.registry.set_default(tenant, model_id)
        except BaseException:
            self.registry.replace_defaults(before)
            raise
        if latency is None:
            return
        self.metrics.swaps.labels("ok").inc()
        self.metrics.swap_latency.observe(latency)
        log.info(
            "deployment.active",
            extra={"deployment_id": str(deployment_id), "model": model_id, "tenant": tenant, "latency": latency},
        )
        self.registry.enforce_budget()

    def _fail(self, deployment_id: uuid.UUID, reason: str) -> None:
        self._set_status(deployment_id, DeploymentStatus.FAILED, reason)
        self.metrics.swaps.labels("failed").inc()
        log.error("deployment.failed", extra={"deployment_id": str(deployment_id), "reason": reason})

    def _set_status(
        self, deployment_id: uuid.UUID, status: DeploymentStatus, reason: str | None, *, uncount: bool = False
    ) -> None:
        """``uncount``: the load never started (the base model is still being prepared), so it is no attempt."""
        with session_scope() as session:
            row = session.get(Deployment, deployment_id, with_for_update=True)
            if row is not None:
                row.status = status
                row.reason = reason[:REASON_LIMIT] if reason else None
                if uncount:
                    row.load_attempts = max(0, (row.load_attempts or 0) - 1)
