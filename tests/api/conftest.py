"""Fixtures for the api tests: an in-process app on the run's real Postgres and Redis, settings overrides,
API keys, and helpers to upload datasets and read the files folder."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient


def reset_caches() -> None:
    """Settings, engine and Celery app are cached per process; forget them after changing the environment."""
    from core.db import reset_engine_cache
    from core.queue import get_celery
    from core.settings import get_settings

    get_settings.cache_clear()
    reset_engine_cache()
    if get_celery.cache_info().currsize:
        get_celery().close()
    get_celery.cache_clear()


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


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    yield client
    client.close()


@pytest.fixture
def queue_name(redis_client: redis.Redis) -> Iterator[str]:
    """The run's training queue, emptied before and after the test (no worker consumes it here)."""
    name = os.environ["TRAINING_QUEUE"]
    redis_client.delete(name)
    yield name
    redis_client.delete(name)


@contextmanager
def make_client(*, reconciler: bool = False, raise_server_exceptions: bool = True, **env: str) -> Iterator[TestClient]:
    from api.app import create_app

    with (
        settings_env(**env),
        TestClient(create_app(run_reconciler=reconciler), raise_server_exceptions=raise_server_exceptions) as client,
    ):
        yield client


@pytest.fixture
def client(clean_db: None, queue_name: str) -> Iterator[TestClient]:
    with make_client() as test_client:
        yield test_client


@pytest.fixture
def files_dir() -> Path:
    from core.storage import files_dir as folder

    path = folder()
    path.mkdir(parents=True, exist_ok=True)
    return path


def dir_entries(folder: Path) -> set[str]:
    """Everything in the folder, hidden temporaries included."""
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def jsonl(records: list[Any]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


UploadFn = Callable[..., Any]


@pytest.fixture
def upload(client: TestClient) -> UploadFn:
    def _upload(
        content: bytes,
        *,
        filename: str = "train.jsonl",
        purpose: str | None = "fine-tune",
        headers: dict[str, str] | None = None,
        test_client: TestClient | None = None,
        **fields: str,
    ) -> Any:
        data = dict(fields)
        if purpose is not None:
            data["purpose"] = purpose
        return (test_client or client).post(
            "/v1/files", files={"file": (filename, content, "application/octet-stream")}, data=data, headers=headers
        )

    return _upload


@pytest.fixture
def training_file(upload: UploadFn) -> str:
    from tests.factories import alpaca_records

    response = upload(jsonl(alpaca_records(8)))
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def assert_envelope(response: Any, status: int, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error"}, body
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
    from api.services.auth import create_api_key
    from core.db import session_scope

    with session_scope() as session:
        return create_api_key(session, tenant, name)
