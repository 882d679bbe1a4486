"""The request's session (``api.db.request_session``) driven as FastAPI drives a dependency: it commits when the
route returns and rolls back when it raises, and the callbacks registered on it run after that outcome only."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session

from api.db import on_commit, on_rollback, request_session
from core.jobs import add_event
from tests.factories import committed_event_messages, committed_job


def _start() -> tuple[Iterator[Session], Session]:
    dependency = request_session()
    return dependency, next(dependency)


def test_a_route_that_returns_commits_then_runs_the_commit_callbacks(db: Session) -> None:
    job = committed_job(db)
    seen: list[object] = []
    dependency, session = _start()
    add_event(session, job.id, "kept")
    on_commit(session, lambda: seen.append(committed_event_messages(job)))  # sees the committed row
    on_commit(session, lambda: 1 / 0)  # a failing callback is logged and does not stop the next one
    on_commit(session, lambda: seen.append("after the failing one"))
    on_rollback(session, lambda: seen.append("rolled back"))
    assert seen == []

    with pytest.raises(StopIteration):
        next(dependency)
    assert seen == [["kept"], "after the failing one"]


def test_a_route_that_raises_rolls_back_then_runs_the_rollback_callbacks(db: Session) -> None:
    job = committed_job(db)
    seen: list[object] = []
    dependency, session = _start()
    add_event(session, job.id, "dropped")
    on_commit(session, lambda: seen.append("committed"))
    on_rollback(session, lambda: seen.append(committed_event_messages(job)))

    with pytest.raises(ValueError, match="the route failed"):
        dependency.throw(ValueError("the route failed"))
    assert seen == [[]]
