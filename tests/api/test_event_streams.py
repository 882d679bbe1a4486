"""Live event streams (SSE): at most EVENT_STREAMS_PER_KEY open per key (429 with Retry-After beyond it, a slot
freed when a stream closes), and the database polled at most once per EVENT_STREAM_POLL_SECONDS whatever the
client asks. A real uvicorn server in this process, because the test client waits for a response to end."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import event

from core.contracts import JobStatus
from core.db import get_engine, session_scope
from tests.api.helpers import assert_envelope, bearer, create_key, settings_env
from tests.factories import make_job
from tests.processes import free_port

STREAM = "/v1/fine_tuning/jobs/{}/events/stream"


@pytest.fixture
def server(clean_db: None, queue_name: str) -> Iterator[str]:
    from api.app import create_app

    with settings_env(AUTH_REQUIRED="true", EVENT_STREAMS_PER_KEY="2", EVENT_STREAM_POLL_SECONDS="0.5"):
        port = free_port()
        config = uvicorn.Config(create_app(run_reconciler=False), host="127.0.0.1", port=port, log_level="warning")
        uv = uvicorn.Server(config)
        thread = threading.Thread(target=uv.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not uv.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the api did not start"
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            uv.should_exit = True
            thread.join(timeout=10)


def _running_job(tenant: str) -> str:
    with session_scope() as session:
        return make_job(session, tenant_id=tenant, status=JobStatus.RUNNING).public_id


def test_streams_per_key_are_capped_with_429_and_freed_on_close(server: str) -> None:
    key, other = create_key("acme"), create_key("acme", "other")
    job_id = _running_job("acme")
    with httpx.Client(base_url=server, timeout=10) as http, ExitStack() as stack:
        held = [stack.enter_context(http.stream("GET", STREAM.format(job_id), headers=bearer(key))) for _ in range(2)]
        assert all(r.status_code == 200 for r in held)

        refused = http.get(STREAM.format(job_id), headers=bearer(key))
        error = assert_envelope(refused, 429)
        assert error["type"] == "rate_limit_error" and "2 live event streams" in error["message"]
        assert int(refused.headers["Retry-After"]) > 0

        # Another key has its own allowance.
        with http.stream("GET", STREAM.format(job_id), headers=bearer(other)) as third:
            assert third.status_code == 200

        # Closing a stream gives its slot back (once the server sees the disconnect).
        held[0].close()
        deadline = time.monotonic() + 10
        while True:
            with http.stream("GET", STREAM.format(job_id), headers=bearer(key)) as again:
                if again.status_code == 200:
                    break
            assert time.monotonic() < deadline, "the closed stream's slot was never given back"
            time.sleep(0.2)


def test_client_cannot_poll_faster_than_the_setting(server: str) -> None:
    key = create_key("acme")
    job_id = _running_job("acme")
    polls: list[float] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "FROM job_events" in statement:
            polls.append(time.monotonic())

    engine = get_engine()
    event.listen(engine, "before_cursor_execute", count)
    try:
        with (
            httpx.Client(base_url=server, timeout=10) as http,
            http.stream("GET", STREAM.format(job_id), params={"poll_seconds": 0.1}, headers=bearer(key)) as r,
        ):
            assert r.status_code == 200
            time.sleep(2.0)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    # 2 s at one poll per 0.5 s is about 4 polls; at the 0.1 s the client asked for it would be about 20.
    assert 2 <= len(polls) <= 6, polls
