"""List parameters on both databases (Postgres in production and tests, SQLite the embedded default): cursors that
name nothing are 400 ``invalid_cursor``, metadata filters match keys with any characters and are capped, and
page limits and defaults are OpenAI's, so a client written against OpenAI gets the page it asks for."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from fastapi.testclient import TestClient

from core.db import session_scope
from core.jobs import add_event
from tests.api.helpers import assert_envelope, job_uuid, make_client
from tests.factories import make_checkpoint, make_file, make_job

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["postgresql", "sqlite"])
def any_db_client(
    request: pytest.FixtureRequest, clean_db: None, queue_name: str, tmp_path: Path
) -> Iterator[TestClient]:
    """The app on the run's Postgres, or on a SQLite file built by the same migrations."""
    if request.param == "postgresql":
        with make_client() as client:
            yield client
        return
    url = f"sqlite:///{tmp_path / 'conch.db'}"
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["configure_logging"] = False
    config.attributes["url"] = url
    command.upgrade(config, "head")
    with make_client(DATABASE_URL=url) as client:
        yield client


def _job(**values: Any) -> str:
    """A committed job (and its file) in whichever database the client is on."""
    with session_scope() as session:
        return make_job(session, **values).public_id


# ------------------------------------------------------------------------------------------------ cursors

BAD_EVENT_CURSORS = [
    "ftevent-²",  # a digit to str.isdigit, not to int()
    "ftevent-１",  # a full-width digit
    "ftevent-" + "9" * 30,  # past BIGINT and SQLite's 64-bit integers
    "ftevent-" + "9" * 19,
    "ftevent--1",
    "ftevent-1.5",
    "ftevent-",
    "ftjob-1",
]


@pytest.mark.parametrize("cursor", BAD_EVENT_CURSORS)
def test_event_cursor_naming_no_event_is_400(any_db_client: TestClient, cursor: str) -> None:
    job_id = _job()
    events = f"/v1/fine_tuning/jobs/{job_id}/events"
    assert_envelope(any_db_client.get(events, params={"after": cursor}), 400, param="after", code="invalid_cursor")
    stream = f"{events}/stream"
    assert_envelope(any_db_client.get(stream, params={"after": cursor}), 400, param="after", code="invalid_cursor")
    if cursor.isascii():  # a header carries Latin-1 only
        response = any_db_client.get(stream, headers={"Last-Event-ID": cursor})
        assert_envelope(response, 400, param="after", code="invalid_cursor")


def test_largest_event_cursor_is_a_valid_empty_page(any_db_client: TestClient) -> None:
    job_id = _job()
    with session_scope() as session:
        add_event(session, job_uuid(job_id), "hello")
    page = any_db_client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"after": "ftevent-" + "9" * 18})
    assert page.status_code == 200, page.text
    # Newest first: every event comes before the largest sequence number.
    assert [e["message"] for e in page.json()["data"]] == ["hello"]


# ------------------------------------------------------------------------------------------------ metadata filters

ODD_KEYS = ['say "hi"', "it's", "a.b", "$", "[0]", "back\\slash", "ünï", '"']


def test_metadata_filter_matches_keys_with_any_characters(any_db_client: TestClient) -> None:
    wanted = _job(user_metadata={key: "yes" for key in ODD_KEYS})
    _job(user_metadata={key: "no" for key in ODD_KEYS})
    _job(user_metadata=None)
    for key in ODD_KEYS:
        response = any_db_client.get("/v1/fine_tuning/jobs", params={f"metadata[{key}]": "yes"})
        assert response.status_code == 200, (key, response.text)
        assert [j["id"] for j in response.json()["data"]] == [wanted], key
    all_keys = {f"metadata[{key}]": "yes" for key in ODD_KEYS}
    assert [j["id"] for j in any_db_client.get("/v1/fine_tuning/jobs", params=all_keys).json()["data"]] == [wanted]


@pytest.mark.parametrize(
    ("params", "param", "code"),
    [
        ({f"metadata[k{i}]": "v" for i in range(17)}, "metadata", "too_many_metadata_filters"),
        ({f"metadata[k{i}]": "v" for i in range(1000)}, "metadata", "too_many_metadata_filters"),
        ({f"metadata[{'k' * 65}]": "v"}, f"metadata[{'k' * 64}]", "invalid_metadata_filter"),
        ({"metadata[k]": "v" * 513}, "metadata[k]", "invalid_metadata_filter"),
    ],
    ids=["17_keys", "1000_keys", "long_key", "long_value"],
)
def test_metadata_filters_beyond_what_a_job_carries_are_400(
    any_db_client: TestClient, params: dict[str, str], param: str, code: str
) -> None:
    _job(user_metadata={"k0": "v"})
    assert_envelope(any_db_client.get("/v1/fine_tuning/jobs", params=params), 400, param=param, code=code)


def test_sixteen_metadata_filters_are_accepted(any_db_client: TestClient) -> None:
    metadata = {f"k{i}": "v" for i in range(16)}
    wanted = _job(user_metadata=metadata)
    params = {f"metadata[{k}]": v for k, v in metadata.items()}
    assert [j["id"] for j in any_db_client.get("/v1/fine_tuning/jobs", params=params).json()["data"]] == [wanted]


# ------------------------------------------------------------------------------------------------ limits


@pytest.mark.parametrize(
    "path", ["/v1/files", "/v1/fine_tuning/jobs", "/v1/deployments", "{job}/events", "{job}/checkpoints"]
)
def test_every_list_accepts_openai_limits_up_to_ten_thousand(any_db_client: TestClient, path: str) -> None:
    path = path.format(job=f"/v1/fine_tuning/jobs/{_job()}")
    for limit in (1, 1000, 10_000):
        response = any_db_client.get(path, params={"limit": limit})
        assert response.status_code == 200, (limit, response.text)
    for limit in (0, -1, 10_001):
        assert_envelope(any_db_client.get(path, params={"limit": limit}), 422, param="limit")


def test_default_page_sizes_are_openai_defaults(any_db_client: TestClient) -> None:
    with session_scope() as session:
        file = make_file(session)
        for _ in range(20):
            make_file(session)
        jobs = [make_job(session, file) for _ in range(21)]
        job = jobs[-1]
        for i in range(21):
            add_event(session, job.id, f"event {i}")
        for step in range(1, 12):
            make_checkpoint(session, job.id, step)
        job_id = job.public_id

    files = any_db_client.get("/v1/files").json()
    assert len(files["data"]) == 21 and files["has_more"] is False  # OpenAI's files default: 10,000
    listed = any_db_client.get("/v1/fine_tuning/jobs").json()
    assert len(listed["data"]) == 20 and listed["has_more"] is True
    events = any_db_client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()
    assert len(events["data"]) == 20 and events["has_more"] is True
    checkpoints = any_db_client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()
    assert len(checkpoints["data"]) == 10 and checkpoints["has_more"] is True
