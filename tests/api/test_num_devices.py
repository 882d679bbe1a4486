"""num_devices: a job may ask for up to TRAINING_DEVICES_MAX training processes; above it the job is a 422 naming
the field, with no row stored and nothing queued."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from core.orm import FineTuningJob
from tests.api.helpers import assert_envelope, count_rows, make_client
from tests.factories import alpaca_records, jsonl

METHOD = "method.supervised.hyperparameters"


@pytest.fixture
def client(clean_db: None, queue_name: str) -> Iterator[TestClient]:
    with make_client(TRAINING_DEVICES_MAX="4") as client:
        yield client


def _create(client: TestClient, devices: int) -> Any:
    upload = client.post(
        "/v1/files",
        files={"file": ("train.jsonl", jsonl(alpaca_records(8)), "application/octet-stream")},
        data={"purpose": "fine-tune"},
    )
    assert upload.status_code == 200, upload.text
    method = {"type": "supervised", "supervised": {"hyperparameters": {"num_devices": devices}}}
    return client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": upload.json()["id"], "method": method}
    )


def test_more_devices_than_the_maximum_is_refused(
    client: TestClient, redis_client: redis.Redis, queue_name: str
) -> None:
    response = _create(client, 5)
    assert_envelope(response, 422, param=f"{METHOD}.num_devices", code="too_many_devices")
    assert "TRAINING_DEVICES_MAX" in response.json()["error"]["message"]
    assert count_rows(FineTuningJob) == 0 and redis_client.llen(queue_name) == 0


def test_devices_up_to_the_maximum_are_stored_with_the_job(client: TestClient) -> None:
    from core.db import get_sessionmaker

    response = _create(client, 4)
    assert response.status_code == 200, response.text
    with get_sessionmaker()() as session:
        row = session.query(FineTuningJob).one()
        assert row.hyperparameters["num_devices"] == 4
