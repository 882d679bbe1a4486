"""``/v1/models``: the models a caller may use (the base models and its own fine-tuned ones), each saying whether
it is in memory and whether it is the one requests naming none get. Not a generation: two reads of the catalog,
no ``start`` / ``respond`` pair."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool

from core.db import session_scope
from inference.catalog import ModelEntry, ModelNotFound, visible_models
from inference.schemas import ModelList, ModelObject
from inference.service import InferenceService


async def list_models(service: InferenceService, tenant: str) -> ModelList:
    entries = await _entries(service, tenant)
    return ModelList(object="list", data=[_model_object(service, tenant, entry) for entry in entries])


async def retrieve_model(service: InferenceService, tenant: str, model_id: str) -> ModelObject:
    for entry in await _entries(service, tenant):
        if entry.id == model_id:
            return _model_object(service, tenant, entry)
    raise ModelNotFound(f"The model {model_id!r} does not exist", param="model")


async def _entries(service: InferenceService, tenant: str) -> list[ModelEntry]:
    def read() -> list[ModelEntry]:
        with session_scope() as session:
            return visible_models(session, tenant, service.settings)

    return await run_in_threadpool(read)


def _model_object(service: InferenceService, tenant: str, entry: ModelEntry) -> ModelObject:
    registry = service.registry
    return ModelObject(
        id=entry.id,
        object="model",
        created=entry.created,
        owned_by=entry.owned_by,
        base_model=entry.base_model,
        ready=entry.ready,
        loaded=registry.loaded(entry.id) is not None,
        deployed=entry.id == registry.default_for(tenant),
    )
