"""Auth (hashed keys), tenant isolation (another tenant's ids answer 404), and the per-key rate limit."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select

from core.api_keys import authenticate, create_api_key, revoke_api_key
from core.db import session_scope
from core.http.ratelimit import RateLimiter
from core.orm import ApiKey
from tests.api.helpers import (
    assert_envelope,
    bearer,
    create_key,
    make_client,
)
from tests.factories import alpaca_records, jsonl, make_deployment, make_model, minutes_ago


@pytest.fixture
def secured(clean_db: None, queue_name: str) -> Iterator[TestClient]:
    with make_client(AUTH_REQUIRED="true") as test_client:
        yield test_client


def test_keys_are_stored_hashed(clean_db: None) -> None:
    key = create_key("acme", "ci")
    with session_scope() as session:
        row = session.scalars(select(ApiKey)).one()
        assert row.tenant_id == "acme" and row.name == "ci"
        assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
        assert key not in (row.key_hash, row.prefix) and key.startswith(row.prefix)
        principal = authenticate(session, key)
        assert principal is not None and principal.tenant_id == "acme"
        assert authenticate(session, key + "x") is None
    with session_scope() as session, pytest.raises(ValueError):
        create_api_key(session, "bad tenant!", "x")


def test_auth_required_on_every_v1_route(secured: TestClient) -> None:
    for method, path in [
        ("GET", "/v1/files"),
        ("POST", "/v1/files"),
        ("GET", "/v1/fine_tuning/jobs"),
        ("POST", "/v1/fine_tuning/jobs"),
        ("GET", "/v1/models"),
        ("GET", "/v1/deployments"),
        ("POST", "/v1/models/tiny-llama/deploy"),
    ]:
        response = secured.request(method, path)
        error = assert_envelope(response, 401, code="invalid_api_key")
        assert error["type"] == "authentication_error"
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert_envelope(secured.get("/v1/models", headers=bearer("conch-not-a-real-key")), 401)
    assert_envelope(secured.get("/v1/models", headers={"Authorization": "Basic abc"}), 401)
    key = create_key("acme")
    assert secured.get("/v1/models", headers=bearer(key)).status_code == 200
    # Liveness and readiness stay open for probes (readiness without details); metrics need an admin key.
    assert secured.get("/healthz").status_code == 200 and secured.get("/readyz").json() == {"status": "ready"}
    assert_envelope(secured.get("/metrics"), 401)


def test_revoked_key_is_refused(secured: TestClient) -> None:
    key = create_key("acme")
    assert secured.get("/v1/models", headers=bearer(key)).status_code == 200
    with session_scope() as session:
        assert revoke_api_key(session, key[:12]) == 1
    assert_envelope(secured.get("/v1/models", headers=bearer(key)), 401)


def test_tenants_cannot_see_each_other(secured: TestClient) -> None:
    alice, bob = bearer(create_key("alice")), bearer(create_key("bob"))
    upload = secured.post(
        "/v1/files", files={"file": ("a.jsonl", jsonl(alpaca_records(4)))}, data={"purpose": "fine-tune"}, headers=alice
    )
    file_id = upload.json()["id"]
    job = secured.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id}, headers=alice
    ).json()
    assert job["organization_id"] == "alice"
    model_id = "ft:tiny-llama:alice:" + job["id"]
    with session_scope() as session:
        make_model(session, model_id, tenant_id="alice")
        deployment = make_deployment(session, model_id, status="active", tenant_id="alice", activated_at=minutes_ago(1))
        deployment_id = deployment.public_id

    for method, path in [
        ("GET", f"/v1/files/{file_id}"),
        ("GET", f"/v1/files/{file_id}/content"),
        ("DELETE", f"/v1/files/{file_id}"),
        ("GET", f"/v1/fine_tuning/jobs/{job['id']}"),
        ("POST", f"/v1/fine_tuning/jobs/{job['id']}/cancel"),
        ("GET", f"/v1/fine_tuning/jobs/{job['id']}/events"),
        ("GET", f"/v1/fine_tuning/jobs/{job['id']}/events/stream"),
        ("GET", f"/v1/fine_tuning/jobs/{job['id']}/checkpoints"),
        ("GET", f"/v1/models/{model_id}"),
        ("DELETE", f"/v1/models/{model_id}"),
        ("POST", f"/v1/models/{model_id}/deploy"),
        ("GET", f"/v1/deployments/{deployment_id}"),
    ]:
        assert_envelope(secured.request(method, path, headers=bob), 404)

    # Bob cannot build on Alice's file either, and his lists are empty.
    refused = secured.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id}, headers=bob)
    assert_envelope(refused, 400, param="training_file")
    assert secured.get("/v1/files", headers=bob).json()["data"] == []
    assert secured.get("/v1/fine_tuning/jobs", headers=bob).json()["data"] == []
    assert secured.get("/v1/deployments", headers=bob).json()["data"] == []
    assert model_id not in [m["id"] for m in secured.get("/v1/models", headers=bob).json()["data"]]
    assert_envelope(secured.post("/v1/deployments/rollback", headers=bob), 409)
    # Cursors from another tenant's list do not work either.
    assert_envelope(secured.get("/v1/files", params={"after": file_id}, headers=bob), 400, param="after")

    # Alice still sees everything, untouched.
    assert secured.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=alice).json()["status"] == "queued"
    assert secured.get(f"/v1/models/{model_id}", headers=alice).json()["conch"]["deployed"] is True


def test_rate_limit_per_key(clean_db: None, redis_client: redis.Redis) -> None:
    with make_client(AUTH_REQUIRED="true", RATE_LIMIT_PER_MINUTE="3") as limited:
        first, second = bearer(create_key("acme", "one")), bearer(create_key("acme", "two"))
        # Seven requests span at most two fixed windows, so one window sees more than three.
        statuses = [limited.get("/v1/models", headers=first) for _ in range(7)]
        refused = [r for r in statuses if r.status_code == 429]
        assert refused and all(r.status_code in (200, 429) for r in statuses)
        error = assert_envelope(refused[0], 429, code="rate_limit_exceeded")
        assert error["type"] == "rate_limit_error"
        assert 1 <= int(refused[0].headers["Retry-After"]) <= 60
        # The limit is per key: another key of the same tenant is unaffected.
        assert limited.get("/v1/models", headers=second).status_code == 200
    assert redis_client.keys(f"{get_namespace()}:ratelimit:*")


def get_namespace() -> str:
    from core.settings import get_settings

    return get_settings().namespace


def test_rate_limiter_falls_back_to_process_counter_without_redis() -> None:
    dead = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2, socket_timeout=0.2)
    for client in (None, dead):
        limiter = RateLimiter(2, client=client, namespace="unit")
        now = 1_000_040.0  # 20 s into a window (1_000_020 is a multiple of 60)
        assert limiter.hit("k", now) is None and limiter.hit("k", now) is None
        assert limiter.hit("k", now) == 40  # the window ends at the next multiple of 60 s
        assert limiter.hit("other", now) is None
        assert limiter.hit("k", now + 60) is None  # a new window
    assert RateLimiter(0, client=None, namespace="unit").hit("k") is None


def _api_key_queries(statements: list[str]) -> int:
    return sum(1 for statement in statements if "FROM api_keys" in statement)


def test_invalid_keys_are_throttled_per_address_before_any_lookup(clean_db: None) -> None:
    from sqlalchemy import event

    from core.db import get_engine

    # A namespace of its own: the run's other tests sent bad keys from the same address this minute.
    fresh_namespace = f"{get_namespace()}-{uuid.uuid4().hex[:8]}"
    with make_client(AUTH_REQUIRED="true", AUTH_FAILURES_PER_MINUTE="3", NAMESPACE=fresh_namespace) as throttled:
        key = create_key("acme")
        statements: list[str] = []

        def record(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
            statements.append(statement)

        event.listen(get_engine(), "before_cursor_execute", record)
        try:
            # Bad keys are answered 401 until this address has sent three in one window (seven span at most
            # two windows, so one of them sees a fourth)...
            statuses: list[int] = []
            for attempt in range(7):
                statements.clear()
                refused = throttled.get("/v1/models", headers=bearer(f"conch-guess-{attempt}"))
                statuses.append(refused.status_code)
                if refused.status_code == 429:
                    break
            assert statuses[-1] == 429 and set(statuses[:-1]) == {401}
            # ...and then it gets 429 without a database query, whatever key it sends.
            error = assert_envelope(refused, 429, code="rate_limit_exceeded")
            assert "invalid API keys" in error["message"] and 1 <= int(refused.headers["Retry-After"]) <= 60
            assert _api_key_queries(statements) == 0
            assert_envelope(throttled.get("/v1/models", headers=bearer(key)), 429)
            # A request with no key at all costs no lookup and is still told to send one.
            assert_envelope(throttled.get("/v1/models"), 401)
        finally:
            event.remove(get_engine(), "before_cursor_execute", record)


def test_single_tenant_mode_is_rate_limited_per_address(clean_db: None, queue_name: str) -> None:
    with make_client(RATE_LIMIT_PER_MINUTE="3", NAMESPACE=f"{get_namespace()}-{uuid.uuid4().hex[:8]}") as limited:
        # A presented key is ignored in this mode (loopback only), but the limit still counts.
        statuses = [limited.get("/v1/models", headers=bearer("conch-anything")).status_code for _ in range(7)]
        assert 429 in statuses and set(statuses) <= {200, 429}


def test_deployment_reasons_name_no_server_folder(client: TestClient) -> None:
    with session_scope() as session:
        make_model(session, "ft:tiny-llama:default:ftjob-x")
        row = make_deployment(session, "ft:tiny-llama:default:ftjob-x", status="failed")
        row.reason = "ModelLoadError: /srv/conch/var/models/ft-x/config.json is unreadable"
        deployment_id = row.public_id
    shown = client.get(f"/v1/deployments/{deployment_id}").json()
    assert shown["reason"] == "ModelLoadError: config.json is unreadable"
    listed = client.get("/v1/deployments").json()["data"]
    assert "/srv/" not in str(listed)
