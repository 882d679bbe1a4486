"""One error envelope everywhere (unknown routes, wrong methods, validation, crashes, database outage), the
health endpoints and the Prometheus metrics."""

from __future__ import annotations

import re

import redis
from fastapi.testclient import TestClient

from api.app import create_app
from tests.api.helpers import assert_envelope, make_client, settings_env
from tests.processes import free_port


def test_unknown_route_and_wrong_method(client: TestClient) -> None:
    assert_envelope(client.get("/v1/nothing-here"), 404, code="not_found")
    assert_envelope(client.delete("/v1/fine_tuning/jobs"), 405, code="method_not_allowed")
    assert_envelope(client.put("/v1/files/file-123"), 405)


def test_validation_errors_name_the_dotted_field(client: TestClient) -> None:
    error = assert_envelope(
        client.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": "tiny-llama",
                "training_file": "file-x",
                "method": {"type": "supervised", "supervised": {"hyperparameters": {"lora_rank": "eight"}}},
            },
        ),
        422,
        param="method.supervised.hyperparameters.lora_rank",
    )
    assert error["type"] == "invalid_request_error" and error["code"] == "int_type"
    assert "eight" not in str(error)  # the input is never echoed back
    assert_envelope(client.get("/v1/files", params={"limit": "many"}), 422, param="limit")
    assert_envelope(
        client.post("/v1/models/tiny-llama/deploy", headers={"Idempotency-Key": "k" * 300}),
        422,
        param="Idempotency-Key",
    )


def test_values_the_database_refuses_are_400(client: TestClient) -> None:
    assert_envelope(client.get("/v1/models/ft%00x"), 400, code="invalid_value")
    assert_envelope(client.get("/v1/fine_tuning/jobs", params={"metadata[k]": "a\x00b"}), 400, code="invalid_value")
    assert_envelope(client.get("/v1/files", params={"purpose": "\x00"}), 400, code="invalid_value")
    assert client.get("/v1/models").status_code == 200


def test_unhandled_exception_is_500_without_details(clean_db: None) -> None:
    app = create_app(run_reconciler=False)

    def explode() -> None:
        raise RuntimeError("password=hunter2 at /srv/secret/path.py")

    app.add_api_route("/v1/explode", explode)
    with TestClient(app, raise_server_exceptions=False) as crashing:
        response = crashing.get("/v1/explode")
    error = assert_envelope(response, 500, code="internal_error")
    assert error["type"] == "server_error"
    assert "hunter2" not in response.text and "secret" not in response.text and "RuntimeError" not in response.text


def test_database_down_is_503_and_not_ready(clean_db: None) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    with make_client(DATABASE_URL=url, raise_server_exceptions=False) as down:
        assert down.get("/healthz").json() == {"status": "ok"}
        ready = down.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"] != "ok" and ready.json()["checks"]["broker"] == "ok"
        assert_envelope(ready, 503, code="service_unavailable")
        # The readiness body both services answer with: the status, why, their own detail and the envelope.
        assert ready.json()["status"] == "unavailable"
        assert ready.json()["reason"] == ready.json()["error"]["message"] == "Not ready: database unavailable"
        assert "nowhere" not in ready.text
        response = down.get("/v1/fine_tuning/jobs")
        assert_envelope(response, 503, code="service_unavailable")
        assert response.headers["Retry-After"] == "5"


def test_health_endpoints(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok"}}
    assert client.get("/openapi.json").json()["info"]["title"] == "Conch control plane"


def _sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rindex("}")]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics(client: TestClient, training_file: str, redis_client: redis.Redis, queue_name: str) -> None:
    for _ in range(2):
        client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": training_file})
    client.get("/v1/files/file-" + "0" * 32)
    text = client.get("/metrics").text
    assert _sample(text, "conch_api_requests_total", route="/v1/fine_tuning/jobs", method="POST", status="200") == 2
    # Routes are labelled by template, never by raw path.
    assert _sample(text, "conch_api_requests_total", route="/v1/files/{file_id}", status="404") == 1
    assert "file-0000" not in text
    assert _sample(text, "conch_jobs", status="queued") == 2
    assert _sample(text, "conch_jobs", status="running") == 0
    assert _sample(text, "conch_queue_depth", queue=queue_name) == redis_client.llen(queue_name) == 2


def test_request_id_header(client: TestClient) -> None:
    assert re.fullmatch(r"[0-9a-f]{16}", client.get("/healthz").headers["x-request-id"])
    # A caller's id is kept, so one trace spans a proxy and both services.
    assert client.get("/healthz", headers={"X-Request-ID": "edge-7f3a"}).headers["x-request-id"] == "edge-7f3a"


def test_settings_env_restores_everything() -> None:
    from core.settings import get_settings

    before = get_settings().max_upload_bytes
    with settings_env(MAX_UPLOAD_BYTES="123"):
        assert get_settings().max_upload_bytes == 123
    assert get_settings().max_upload_bytes == before
