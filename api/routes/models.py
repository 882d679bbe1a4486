"""``/v1/models`` (base and fine-tuned, with lineage), deploy and rollback, and ``/v1/deployments``.

Fine-tuned model ids contain colons and base model ids may contain slashes (``ft:base:suffix:ftjob-...``), so the
id is matched with a path converter; the deploy and rollback routes are declared before the catch-all ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse

from api.deps import After, IdempotencyKey, LimitDep, PrincipalDep, SessionDep, SettingsDep
from api.http import idempotency
from api.schemas import (
    ERROR_RESPONSES,
    DeploymentList,
    DeploymentOut,
    DeployRequest,
    ModelDeleted,
    ModelList,
    ModelOut,
)
from api.services import models as service
from core.api_keys import Principal
from core.orm import Deployment

router = APIRouter(tags=["models"], responses=ERROR_RESPONSES)


def _with_idempotency(
    request: Request,
    session: SessionDep,
    principal: Principal,
    idempotency_key: str | None,
    create: Callable[[], Deployment],
    body: DeployRequest | None = None,
) -> DeploymentOut | JSONResponse:
    """The key, the route, the path and the optional body (``serve_as``) identify the request."""
    identity: dict[str, object] = {"path": request.url.path}
    if body is not None and body.serve_as is not None:
        identity["serve_as"] = body.serve_as
    return idempotency.respond_once(
        session,
        tenant_id=principal.tenant_id,
        key=idempotency_key,
        route=f"POST {request.url.path}",
        req_hash=idempotency.request_hash(identity),
        create=lambda: service.deployment_out(create()),
    )


@router.get("/v1/models", response_model=ModelList, summary="List base and fine-tuned models")
def list_models(session: SessionDep, principal: PrincipalDep, settings: SettingsDep) -> ModelList:
    return service.list_models(session, principal.tenant_id, settings)


@router.post("/v1/models/{model_id:path}/deploy", response_model=DeploymentOut, summary="Serve this model by default")
def deploy_model(
    model_id: str,
    request: Request,
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
    body: Annotated[DeployRequest | None, Body()] = None,
) -> DeploymentOut | JSONResponse:
    serve_as = body.serve_as if body is not None else None
    return _with_idempotency(
        request,
        session,
        principal,
        idempotency_key,
        lambda: service.deploy(
            session,
            tenant_id=principal.tenant_id,
            model_id=model_id,
            actor=principal.actor,
            settings=settings,
            serve_as=serve_as,
        ),
        body,
    )


@router.post(
    "/v1/models/{model_id:path}/rollback",
    response_model=DeploymentOut,
    summary="Deploy the model that served before this one",
)
def rollback_model(
    model_id: str,
    request: Request,
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
) -> DeploymentOut | JSONResponse:
    return _with_idempotency(
        request,
        session,
        principal,
        idempotency_key,
        lambda: service.rollback(
            session, tenant_id=principal.tenant_id, current_model=model_id, actor=principal.actor, settings=settings
        ),
    )


@router.get("/v1/models/{model_id:path}", response_model=ModelOut, summary="Retrieve a model")
def retrieve_model(model_id: str, session: SessionDep, principal: PrincipalDep, settings: SettingsDep) -> ModelOut:
    return service.get_model(session, principal.tenant_id, model_id, settings)


@router.delete("/v1/models/{model_id:path}", response_model=ModelDeleted, summary="Delete a fine-tuned model")
def delete_model(model_id: str, session: SessionDep, principal: PrincipalDep, settings: SettingsDep) -> ModelDeleted:
    return service.delete_model(session, principal.tenant_id, model_id, settings)


@router.get("/v1/deployments", response_model=DeploymentList, summary="List deployments, newest first")
def list_deployments(
    session: SessionDep, principal: PrincipalDep, limit: LimitDep, after: After = None
) -> DeploymentList:
    return service.list_deployments(session, principal.tenant_id, after=after, limit=limit)


@router.post(
    "/v1/deployments/rollback",
    response_model=DeploymentOut,
    summary="Deploy the model that served before the active one",
)
def rollback_active(
    request: Request,
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
) -> DeploymentOut | JSONResponse:
    return _with_idempotency(
        request,
        session,
        principal,
        idempotency_key,
        lambda: service.rollback(
            session, tenant_id=principal.tenant_id, current_model=None, actor=principal.actor, settings=settings
        ),
    )


@router.get("/v1/deployments/{deployment_id}", response_model=DeploymentOut, summary="Retrieve a deployment")
def retrieve_deployment(deployment_id: str, session: SessionDep, principal: PrincipalDep) -> DeploymentOut:
    return service.deployment_out(service.get_deployment(session, principal.tenant_id, deployment_id))
