"""What the inference service tells whom: ``/readyz`` gives outsiders the status alone and an admin key the
models and reasons, ``/metrics`` needs an admin key, no answer names a server folder, bad keys are throttled per
address, and the key cache is bounded without pushing valid keys out."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path

from core.api_keys import create_api_key, revoke_api_key
from core.db import session_scope
from core.settings import get_settings
from inference.auth import Authenticator
from inference.routes.health import PUBLIC_UNREADY_REASON
from tests.inference.helpers import app_client, settings
from tests.polling import wait_until


def _key(tenant: str, *, admin: bool = False) -> str:
    with session_scope() as session:
        return create_api_key(session, tenant, "probe-test", admin=admin)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_readyz_and_metrics_details_need_an_admin_key(clean_db: None) -> None:
    admin, tenant = _bearer(_key("ops", admin=True)), _bearer(_key("acme"))
    with app_client(auth_required=True) as client:
        for headers in ({}, tenant, _bearer("conch-not-a-key")):
            ready = client.get("/readyz", headers=headers)
            assert ready.status_code == 200 and ready.json() == {"status": "ready"}
        detailed = client.get("/readyz", headers=admin).json()
        assert detailed["status"] == "ready" and [m["id"] for m in detailed["models"]] == ["tiny-llama"]

        assert client.get("/metrics").status_code == 401
        forbidden = client.get("/metrics", headers=tenant)
        assert forbidden.status_code == 403 and forbidden.json()["error"]["type"] == "permission_error"
        scraped = client.get("/metrics", headers=admin)
        assert scraped.status_code == 200 and 'model="tiny-llama"' in scraped.text


def test_unready_answers_name_no_server_folder(clean_db: None, tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    broken = tmp_path / "hidden-folder" / "broken-model"
    shutil.copytree(tiny_models["tiny-llama"], broken)
    (broken / "config.json").write_text("{not json")  # the loader's error names the folder
    overrides = {"base_models": {"broken-model": str(broken)}, "default_base_model": "broken-model"}
    with app_client(wait_ready=False, **overrides) as client:
        wait_until(lambda: client.app.state.registry.synced, what="deployments read")  # type: ignore[attr-defined]
        wait_until(lambda: "broken-model" in client.app.state.registry.problems, what="load failed")  # type: ignore[attr-defined]
        # Without AUTH_REQUIRED (loopback) the reason is shown, with the folder reduced to its last name.
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["reason"]
        assert "hidden-folder" not in ready.text and str(tmp_path) not in ready.text
        refused = client.get("/generate", params={"prompt": "Hi"})
        assert refused.status_code == 503 and "hidden-folder" not in refused.text

    admin = _bearer(_key("ops", admin=True))
    with app_client(wait_ready=False, auth_required=True, **overrides) as client:
        wait_until(lambda: "broken-model" in client.app.state.registry.problems, what="load failed")  # type: ignore[attr-defined]
        public = client.get("/readyz")
        assert public.status_code == 503
        assert public.json()["reason"] == PUBLIC_UNREADY_REASON and "models" not in public.json()
        assert "broken-model" not in public.text
        detailed = client.get("/readyz", headers=admin)
        assert detailed.json()["model"] == "broken-model" and "hidden-folder" not in detailed.text


def test_bad_keys_are_throttled_per_address(clean_db: None) -> None:
    namespace = f"{get_settings().namespace}-{uuid.uuid4().hex[:8]}"
    with app_client(auth_required=True, auth_failures_per_minute=2, namespace=namespace) as client:
        statuses: list[int] = []
        for attempt in range(5):  # five span at most two fixed windows: one of them sees a third
            statuses.append(client.get("/v1/models", headers=_bearer(f"conch-guess-{attempt}")).status_code)
            if statuses[-1] == 429:
                break
        assert statuses[-1] == 429 and set(statuses[:-1]) == {401}
        # A valid key not looked up lately waits like any other: the address is refused before any lookup.
        assert client.get("/v1/models", headers=_bearer(_key("beta"))).status_code == 429


def test_key_cache_is_bounded_and_unknown_keys_do_not_push_out_valid_ones(clean_db: None) -> None:
    key = _key("acme")
    authenticator = Authenticator(settings(auth_required=True), max_cached_keys=4)
    try:
        assert asyncio.run(authenticator.principal_for(key)) is not None
        with session_scope() as session:
            assert revoke_api_key(session, key[:12]) == 1
        for attempt in range(20):
            assert asyncio.run(authenticator.principal_for(f"conch-guess-{attempt}")) is None
        assert len(authenticator._unknown) <= 4
        # Still answered from the cache (the revocation takes effect when the entry expires, within seconds):
        # twenty unknown keys did not evict it.
        cached = asyncio.run(authenticator.principal_for(key))
        assert cached is not None and cached.tenant_id == "acme"
    finally:
        authenticator.close()
