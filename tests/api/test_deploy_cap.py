"""One tenant's deployments waiting to load are capped: past MAX_PENDING_DEPLOYMENTS_PER_TENANT a deploy (or a
rollback) is refused with 429 in the error envelope and writes nothing; other tenants' do not count, and a slot
frees once a deployment leaves ``pending``."""

from __future__ import annotations

from sqlalchemy import update

from core.contracts import DeploymentStatus
from core.db import session_scope
from core.orm import Deployment
from tests.api.helpers import assert_envelope, count_rows, make_client
from tests.factories import make_deployment, minutes_ago


def test_pending_deployments_per_tenant_are_capped(clean_db: None) -> None:
    with make_client(MAX_PENDING_DEPLOYMENTS_PER_TENANT="2") as client:
        with session_scope() as session:
            for _ in range(3):  # another tenant's queue is its own
                make_deployment(session, "tiny-llama", tenant_id="other")
            make_deployment(session, "tiny-qwen2", status="active", activated_at=minutes_ago(5))
        first = client.post("/v1/models/tiny-llama/deploy")
        second = client.post("/v1/models/tiny-qwen2/deploy")
        assert first.status_code == 200 and second.status_code == 200, (first.text, second.text)

        before = count_rows(Deployment)
        refused = client.post("/v1/models/tiny-llama/deploy", headers={"Idempotency-Key": "deploy-3"})
        error = assert_envelope(refused, 429, code="too_many_pending_deployments")
        assert error["type"] == "rate_limit_error" and "limit is 2" in error["message"]
        assert_envelope(client.post("/v1/deployments/rollback"), 429, code="too_many_pending_deployments")
        assert count_rows(Deployment) == before == 6

        # A deployment that starts loading leaves the queue and frees a slot (the same key is not an answer).
        with session_scope() as session:
            session.execute(
                update(Deployment)
                .where(Deployment.tenant_id == "default", Deployment.status == DeploymentStatus.PENDING)
                .values(status=DeploymentStatus.LOADING)
            )
        retried = client.post("/v1/models/tiny-llama/deploy", headers={"Idempotency-Key": "deploy-3"})
        assert retried.status_code == 200, retried.text
