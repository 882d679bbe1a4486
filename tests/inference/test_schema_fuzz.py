"""Property-based fuzzing of the inference service from its own OpenAPI schema: whatever a client sends, it
answers without a 5xx and within the documented schema (status codes, content types, response shapes).

Left out: "schema-valid data is accepted". A schema cannot say which model ids exist or what this deployment's
MAX_NEW_TOKENS_LIMIT is, so a generated model name is rightly a 404 and a long max_tokens a 400."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from core.settings import Settings
from inference.app import create_app
from tests.polling import wait_until

# A short generation limit keeps hundreds of generated requests cheap on the tiny model. No background listener:
# the module's fixture reads the deployments once (the database only exists once the session fixture ran).
app = create_app(Settings(max_new_tokens_limit=8, max_new_tokens_default=4), background=False)
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module", autouse=True)
def _serving(database: str, tiny_models: object) -> Iterator[None]:
    app.state.deployer.reconcile()  # loads and smoke-tests the default model
    client = TestClient(app)
    wait_until(lambda: client.get("/readyz").status_code == 200, what="/readyz 200")
    yield
    app.state.registry.close()


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_inference_survives_generated_requests(case: schemathesis.Case) -> None:
    case.call_and_validate(excluded_checks=[positive_data_acceptance])
