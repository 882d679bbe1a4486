"""Property-based fuzzing of the control plane from its own OpenAPI schema: whatever a client sends, the api
answers without a 5xx and within its documented schema (status codes, content types, response shapes).

One check is left out: "schema-valid data is accepted". A schema can say a file is uploaded, not that its bytes
are a valid dataset, so a generated PNG is rightly refused with a 400 and its validation report."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from api.app import create_app

app = create_app(run_reconciler=False)
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(autouse=True)
def _empty_tables(clean_db: None) -> None:
    """Each operation starts from empty tables on the real test database."""


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_survives_generated_requests(case: schemathesis.Case) -> None:
    case.call_and_validate(excluded_checks=[positive_data_acceptance])
