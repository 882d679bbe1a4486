"""Driving deployments on this replica: pending -> loading -> active (the previous one superseded) or failed.

The database is the truth. ``reconcile`` reads it (on start-up, on every pub/sub doorbell and every poll), so a
missed message or a restart loses nothing: whatever is active is served, whatever is pending gets deployed.

Several replicas may serve: each keeps its own state per deployment (``core.deployments``, ``deployment_replicas``)
and changes a deployment's status only conditionally, so one replica's failure to load never undoes another's
activation. A replica that failed the tenant's active deployment keeps serving the tenant's previous model (the
newest one it serves) and reports the failure in ``/readyz``.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace

from core import deployments as store
from core.base_models import is_prepared
from core.contracts import DeploymentStatus
from core.db import session_scope
from core.orm import DEFAULT_TENANT, Deployment
from core.settings import Settings
from inference.catalog import ModelNotReady, ModelSource, base_source, resolve
from inference.engine.loader import ModelLoadError
from inference.gate import GateResult
from inference.metrics import Metrics
from inference.registry import ModelHandle, Registry

log = logging.getLogger("conch.inference.deployer")

REASON_LIMIT = store.REASON_LIMIT
# A deployment found still "loading" by this replica this many times when a load starts took the replica's
# process down with it each time (a native crash while loading or gating): it fails here instead of crashing
# every restart. Counted per replica, under a name that survives the restart (INFERENCE_REPLICA_ID).
MAX_LOAD_ATTEMPTS = 3


class Deployer:
    def __init__(self, registry: Registry, settings: Settings, metrics: Metrics) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.replica_id = store.replica_identity(settings)
        # Advertised in the heartbeat: the api and the workers hold new jobs to the adapter limits of the live
        # replicas (core.servability), whatever their own INFERENCE_BACKEND.
        self.max_lora_rank = settings.vllm_max_lora_rank if settings.inference_backend == "vllm" else None
        # tenant -> (model this replica serves it, the deployment that model comes from)
        self._serving: dict[str, tuple[str, uuid.UUID | None]] = {}
        self._to_load: list[uuid.UUID] = []  # active deployments not loaded on this replica yet

    def reconcile(self) -> None:
        """One pass: learn what is active, deploy what is pending (one per tenant, fairly), load what must be
        served, drop dead engines."""
        self.registry.maintain()
        self.registry.retune_threads()
        with session_scope() as session:
            store.heartbeat(session, self.replica_id, max_lora_rank=self.max_lora_rank)
            store.coalesce_pending(session)
        self._settle_abandoned()
        self._refresh_defaults()
        with session_scope() as session:
            queue = store.fair_queue(session, self.replica_id)
        for deployment_id in queue:
            self.deploy(deployment_id)
        self._load_defaults()

    def heartbeat(self) -> None:
        """Renew this replica's presence and its hold on the deployments it loads or serves (also during a long
        load)."""
        with session_scope() as session:
            store.heartbeat(session, self.replica_id, max_lora_rank=self.max_lora_rank)

    def leave(self) -> None:
        """This replica stops: deployments no longer wait for it to try them."""
        with session_scope() as session:
            store.leave(session, self.replica_id)

    # ------------------------------------------------------------------------------- what is served

    def _refresh_defaults(self) -> None:
        """Point each tenant at the model this replica should serve it: the tenant's active deployment once loaded
        here; the model it served before while that one loads here (if that one is in memory: at start-up nothing
        is, and the active deployment is what to load); the previous one for good once it failed here."""
        with session_scope() as session:
            view = store.replica_view(session, self.replica_id)
        current = self.registry.defaults()
        serving: dict[str, tuple[str, uuid.UUID | None]] = {}
        to_load: list[uuid.UUID] = []
        for tenant, target in view.tenants.items():
            if target.state == store.ReplicaState.ACTIVE:
                serving[tenant] = (target.model, target.deployment_id)
                continue
            if target.state != store.ReplicaState.FAILED:
                to_load.append(target.deployment_id)
                before = current.get(tenant, self.settings.default_base_model)
                handle = self.registry.loaded(before)
                if before == target.model or handle is None or not handle.engine.alive:
                    serving[tenant] = (target.model, target.deployment_id)
                    continue
                if tenant in self._serving:
                    serving[tenant] = self._serving[tenant]
                continue
            if target.fallback is not None:  # failed here: what this replica served the tenant before
                serving[tenant] = target.fallback
        self._serving = serving
        self._to_load = to_load
        self.registry.replace_defaults({tenant: model for tenant, (model, _) in serving.items()})
        self.registry.failed_deployments = view.failed
        self.registry.synced = True

    def _settle_abandoned(self) -> None:
        """Deployments this replica failed while others were still loading them: failed once none holds them."""
        with session_scope() as session:
            abandoned = store.abandoned_by_replica(session, self.replica_id)
            now = store.db_now(session)
            for deployment_id, reason in abandoned:
                if store.settle_failed(
                    session, deployment_id, reason, now=now, stale_seconds=self.settings.replica_stale_seconds
                ):
                    log.error("deployment.failed", extra={"deployment_id": str(deployment_id)})

    def _load_defaults(self) -> None:
        """Load, on this replica, the tenants' active deployments it has not loaded yet, and whatever it serves
        that is not in memory (after a restart or a dead engine)."""
        for pending in list(self._to_load):
            self.deploy(pending)
        wanted: list[tuple[str, str, uuid.UUID | None]] = []
        if DEFAULT_TENANT not in self._serving:
            wanted.append((DEFAULT_TENANT, self.registry.default_for(DEFAULT_TENANT), None))
        wanted += [(tenant, model, deployment) for tenant, (model, deployment) in self._serving.items()]
        for tenant, name, deployment_id in wanted:
            handle = self.registry.loaded(name)
            if handle is not None and handle.engine.alive:
                continue
            if deployment_id is not None:
                self.deploy(deployment_id)
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
        """Load the deployment's model on this replica and record the outcome for this replica, then (only if
        still in flight) for the deployment. Also used to load again, after a restart, what this replica served."""
        claimed = self._claim(deployment_id)
        if claimed is None:
            return
        tenant, model_id, attempts, status, serve_as = claimed
        in_flight = status in store.IN_FLIGHT
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
            if serve_as is not None:  # as the deployment asks (adapter or merged), else the backend's default
                source = replace(source, serve_as=serve_as)
        except ModelNotReady as exc:
            if model_id in self.settings.base_models and not is_prepared(model_id, self.settings):
                with session_scope() as session:  # wait: the base model is being prepared
                    store.release_claim(session, deployment_id, self.replica_id)
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
        self._activate(deployment_id, tenant, model_id, handle, in_flight=in_flight)

    def _claim(self, deployment_id: uuid.UUID) -> tuple[str, str, int, str, str | None] | None:
        """Mark this replica loading and count its attempt (committed before the load starts, so a load that
        kills the process is still counted)."""
        with session_scope() as session:
            row = store.claim_for_replica(session, deployment_id, self.replica_id)
            if row is None:
                return None
            deployment = session.get(Deployment, deployment_id)
            assert deployment is not None
            session.refresh(deployment)
            return (
                deployment.tenant_id,
                deployment.model_id,
                row.load_attempts,
                deployment.status,
                deployment.serve_as,
            )

    def _activate(
        self, deployment_id: uuid.UUID, tenant: str, model_id: str, handle: ModelHandle, *, in_flight: bool
    ) -> None:
        # The in-memory switch comes first, inside the transaction that marks the row active, and is undone if
        # that transaction does not commit: whoever reads "active" from the database is already served the new
        # model. Requests already running keep their hold on the old one.
        gate: GateResult | None = handle.gate
        before = self.registry.defaults()
        try:
            with session_scope() as session:
                status, latency = store.activate_for_replica(
                    session,
                    deployment_id,
                    self.replica_id,
                    route=gate.route if gate is not None else None,
                    fidelity=gate.to_json() if gate is not None else None,
                )
                if status == DeploymentStatus.ACTIVE:
                    self.registry.set_default(tenant, model_id)
        except BaseException:
            self.registry.replace_defaults(before)
            raise
        self._refresh_defaults()
        if not in_flight:
            return  # loaded again what this replica already served (after a restart or a dead engine)
        if status == DeploymentStatus.ACTIVE:
            self.metrics.swaps.labels("ok").inc()
        if latency is not None:
            self.metrics.swap_latency.observe(latency)
        log.info(
            "deployment.active" if status == DeploymentStatus.ACTIVE else "deployment.loaded",
            extra={
                "deployment_id": str(deployment_id),
                "model": model_id,
                "tenant": tenant,
                "status": status,
                "latency": latency,
                "replica": self.replica_id,
            },
        )
        self.registry.enforce_budget()

    def _fail(self, deployment_id: uuid.UUID, reason: str) -> None:
        with session_scope() as session:
            failed = store.fail_for_replica(
                session, deployment_id, self.replica_id, reason, stale_seconds=self.settings.replica_stale_seconds
            )
        self.metrics.swaps.labels("failed").inc()
        log.error(
            "deployment.failed" if failed else "deployment.failed_on_replica",
            extra={"deployment_id": str(deployment_id), "reason": reason, "replica": self.replica_id},
        )
        self._refresh_defaults()
