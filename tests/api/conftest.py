"""Fixtures for the api tests: an in-process app on the run's real Postgres and Redis, the run's training queue
(emptied around each test), the files folder, and upload helpers."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from tests.api.helpers import make_client
from tests.factories import alpaca_records, jsonl


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


@pytest.fixture
def client(clean_db: None, queue_name: str) -> Iterator[TestClient]:
    with make_client() as test_client:
        yield test_client


@pytest.fixture
def files_dir() -> Path:
    from core.settings import get_settings
    from core.storage import files_dir as folder

    path = folder(get_settings())
    path.mkdir(parents=True, exist_ok=True)
    return path


UploadFn = Callable[..., Any]


@pytest.fixture
def upload(client: TestClient) -> UploadFn:
    """POST /v1/files with a file part and form fields (``purpose=None`` leaves the field out)."""

    def _upload(
        content: bytes,
        *,
        filename: str = "train.jsonl",
        purpose: str | None = "fine-tune",
        headers: dict[str, str] | None = None,
        via: TestClient | None = None,
        **fields: str,
    ) -> Any:
        data = dict(fields)
        if purpose is not None:
            data["purpose"] = purpose
        return (via or client).post(
            "/v1/files", files={"file": (filename, content, "application/octet-stream")}, data=data, headers=headers
        )

    return _upload


@pytest.fixture
def training_file(upload: UploadFn) -> str:
    response = upload(jsonl(alpaca_records(8)))
    assert response.status_code == 200, response.text
    return str(response.json()["id"])
