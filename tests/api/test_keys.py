"""Key management: an admin key lists, creates and revokes keys over the api; ``conch keys`` does the same from the
command line. A key's plaintext appears once, its last use is kept, and the probes show details to admins only."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from typer.testing import CliRunner

from core.api_keys import create_api_key
from core.db import session_scope
from core.orm import ApiKey
from tests.api.helpers import assert_envelope, bearer, create_key, make_client


def admin_key(tenant: str = "ops") -> str:
    with session_scope() as session:
        return create_api_key(session, tenant, "admin", admin=True)


@pytest.fixture
def secured(clean_db: None, queue_name: str) -> Iterator[TestClient]:
    with make_client(AUTH_REQUIRED="true") as test_client:
        yield test_client


def key_count() -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(ApiKey)) or 0


def test_admin_key_lists_creates_and_revokes_keys(secured: TestClient) -> None:
    admin = bearer(admin_key())
    tenant_key = create_key("acme", "ci")

    listed = secured.get("/v1/keys", headers=admin)
    assert listed.status_code == 200, listed.text
    rows = {row["tenant"]: row for row in listed.json()["data"]}
    assert set(rows) == {"ops", "acme"} and rows["ops"]["admin"] is True and rows["acme"]["admin"] is False
    assert rows["acme"]["prefix"] == tenant_key[:12] and rows["acme"]["name"] == "ci"
    # Neither the key nor its hash is ever listed.
    assert tenant_key not in listed.text and "hash" not in listed.text

    created = secured.post("/v1/keys", json={"tenant": "beta", "name": "deploy"}, headers=admin)
    assert created.status_code == 201, created.text
    new_key = created.json()["key"]
    assert new_key.startswith(created.json()["prefix"]) and created.json()["admin"] is False
    assert secured.get("/v1/models", headers=bearer(new_key)).status_code == 200
    assert new_key not in secured.get("/v1/keys", headers=admin).text  # shown once

    revoked = secured.delete(f"/v1/keys/{created.json()['id']}", headers=admin)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert_envelope(secured.get("/v1/models", headers=bearer(new_key)), 401)
    again = secured.delete(f"/v1/keys/{created.json()['id']}", headers=admin)
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]
    assert "beta" not in {row["tenant"] for row in secured.get("/v1/keys", headers=admin).json()["data"]}
    everything = secured.get("/v1/keys", params={"include_revoked": "true", "tenant": "beta"}, headers=admin)
    assert [row["revoked_at"] is not None for row in everything.json()["data"]] == [True]

    assert_envelope(secured.delete("/v1/keys/not-a-key-id", headers=admin), 404, param="key_id")
    assert_envelope(secured.delete("/v1/keys/00000000-0000-0000-0000-000000000000", headers=admin), 404)


def test_only_an_admin_key_manages_keys(secured: TestClient) -> None:
    tenant = bearer(create_key("acme"))
    for method, path in [("GET", "/v1/keys"), ("POST", "/v1/keys"), ("DELETE", "/v1/keys/x")]:
        error = assert_envelope(secured.request(method, path, headers=tenant), 403, code="forbidden")
        assert error["type"] == "permission_error"
        assert_envelope(secured.request(method, path), 401)
    before = key_count()
    refused = secured.post("/v1/keys", json={"tenant": "evil"}, headers=tenant)
    assert_envelope(refused, 403)
    assert key_count() == before


def test_key_creation_checks_its_fields(secured: TestClient) -> None:
    admin = bearer(admin_key())
    before = key_count()
    assert_envelope(secured.post("/v1/keys", json={"tenant": "bad tenant!"}, headers=admin), 422, param="tenant")
    assert_envelope(secured.post("/v1/keys", json={"tenant": "ok", "name": ""}, headers=admin), 422, param="name")
    assert key_count() == before


def test_key_management_needs_auth_required(client: TestClient) -> None:
    # Single-tenant mode has no keys to tell an admin by: manage keys with `conch keys` there.
    assert_envelope(client.get("/v1/keys"), 403)


def test_last_use_is_kept_once_a_minute(secured: TestClient) -> None:
    admin = bearer(admin_key())
    key = create_key("acme")

    def last_used() -> int | None:
        rows = secured.get("/v1/keys", params={"tenant": "acme"}, headers=admin).json()["data"]
        value: int | None = rows[0]["last_used_at"]
        return value

    assert last_used() is None
    assert secured.get("/v1/models", headers=bearer(key)).status_code == 200
    first = last_used()
    assert first is not None
    with session_scope() as session:
        stored = session.scalars(select(ApiKey).where(ApiKey.tenant_id == "acme")).one().last_used_at
    assert secured.get("/v1/models", headers=bearer(key)).status_code == 200
    with session_scope() as session:
        # Within LAST_USED_RESOLUTION the row is not written again.
        assert session.scalars(select(ApiKey).where(ApiKey.tenant_id == "acme")).one().last_used_at == stored


def test_probes_show_details_to_admin_keys_only(secured: TestClient) -> None:
    admin = bearer(admin_key())
    tenant = bearer(create_key("acme"))
    for headers in ({}, tenant, bearer("conch-not-a-key")):
        ready = secured.get("/readyz", headers=headers)
        assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    assert secured.get("/readyz", headers=admin).json()["checks"] == {"database": "ok", "broker": "ok"}
    # Prometheus scrapes with an admin key as its bearer token.
    assert_envelope(secured.get("/metrics"), 401)
    assert_envelope(secured.get("/metrics", headers=tenant), 403)
    scraped = secured.get("/metrics", headers=admin)
    assert scraped.status_code == 200 and "conch_" in scraped.text


def test_keys_cli_creates_lists_and_revokes(clean_db: None) -> None:
    from cli.main import app

    runner = CliRunner()
    made = runner.invoke(app, ["keys", "create", "acme", "--name", "laptop", "--admin"])
    assert made.exit_code == 0, made.output
    plaintext = made.output.strip()
    with session_scope() as session:
        row = session.scalars(select(ApiKey)).one()
        assert row.is_admin and row.name == "laptop" and plaintext.startswith(row.prefix)
        key_id = str(row.id)

    listed = runner.invoke(app, ["keys", "list"])
    assert listed.exit_code == 0 and "acme" in listed.output and plaintext not in listed.output

    revoked = runner.invoke(app, ["keys", "revoke", key_id])
    assert revoked.exit_code == 0, revoked.output
    with session_scope() as session:
        assert session.scalars(select(ApiKey)).one().revoked_at is not None
    assert "acme" not in runner.invoke(app, ["keys", "list"]).output
    assert "acme" in runner.invoke(app, ["keys", "list", "--revoked"]).output
    missing = runner.invoke(app, ["keys", "revoke", "conch-nothing"])
    assert missing.exit_code == 1
    bad = runner.invoke(app, ["keys", "create", "bad tenant!"])
    assert bad.exit_code == 1 and "tenant id" in bad.output
