"""Plain helpers for the api tests: settings overrides, an in-process client, multipart bodies, API keys, queued
messages and assertions on the error envelope (rows come from ``tests.factories``)."""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import func, select, update


def reset_caches() -> None:
    """Settings, engine and Celery app are cached per process; forget them after changing the environment."""
    from core.db import reset_engine_cache
    from core.queue import close_clients
    from core.settings import get_settings

    get_settings.cache_clear()
    reset_engine_cache()
    close_clients()


@contextmanager
def settings_env(**overrides: str) -> Iterator[None]:
    """Run with some UPPER_CASE settings changed, then put everything back."""
    saved = {key: os.environ.get(key) for key in overrides}
    os.environ.update(overrides)
    reset_caches()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        reset_caches()


@contextmanager
def make_client(*, reconciler: bool = False, raise_server_exceptions: bool = True, **env: str) -> Iterator[TestClient]:
    """The real app (real Postgres, real Redis) in this process, lifespan included."""
    from api.app import create_app

    with (
        settings_env(**env),
        TestClient(create_app(run_reconciler=reconciler), raise_server_exceptions=raise_server_exceptions) as client,
    ):
        yield client


def multipart(fields: dict[str, str], file: tuple[str, bytes] | None, boundary: str = "conchtestboundary") -> bytes:
    """A multipart/form-data body built by hand, for streamed (chunked) uploads and malformed variants."""
    out = b""
    for name, value in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    if file is not None:
        filename, content = file
        out += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        out += content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def dir_entries(folder: Path) -> set[str]:
    """Everything in the folder, hidden temporaries included."""
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def count_rows(model: Any) -> int:
    from core.db import session_scope

    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def assert_envelope(response: Any, status: int, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert "error" in body, body
    error = body["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in response.text
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return dict(error)


def create_key(tenant: str, name: str = "test") -> str:
    from core.api_keys import create_api_key
    from core.db import session_scope

    with session_scope() as session:
        return create_api_key(session, tenant, name)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def queued_messages(redis_client: Any, queue: str) -> list[dict[str, Any]]:
    """Decode the Celery messages waiting in a Redis list: task name and kwargs."""
    out = []
    for raw in redis_client.lrange(queue, 0, -1):
        message = json.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body).decode()
        _args, kwargs, _embed = json.loads(body)
        out.append({"task": message["headers"]["task"], "kwargs": kwargs})
    return out


def job_uuid(public_id: str) -> uuid.UUID:
    return uuid.UUID(hex=public_id.removeprefix("ftjob-"))


def activate_deployment(deployment_id: str) -> None:
    """What inference does when a deployment loads: it becomes active and the tenant's previous one superseded
    (then a short pause, so activation times differ)."""
    from core.contracts import DeploymentStatus
    from core.db import session_scope
    from core.ids import Prefix, parse_public_id
    from core.orm import Deployment, utcnow

    row_id = parse_public_id(deployment_id, Prefix.DEPLOYMENT)
    with session_scope() as session:
        row = session.get(Deployment, row_id)
        assert row is not None
        session.execute(
            update(Deployment)
            .where(Deployment.tenant_id == row.tenant_id, Deployment.status == DeploymentStatus.ACTIVE)
            .values(status=DeploymentStatus.SUPERSEDED)
        )
        row.status = DeploymentStatus.ACTIVE
        row.activated_at = utcnow()
    time.sleep(0.01)
