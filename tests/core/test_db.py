"""The unit of work every process uses (``core.db.transaction``) on the real Postgres: what it commits, what it
rolls back, and that it always hands its connection back."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db import get_engine, get_sessionmaker, session_scope, transaction
from core.jobs import add_event
from tests.factories import committed_event_messages, committed_job


def _connections_in_use() -> int:
    return get_engine().pool.checkedout()  # type: ignore[attr-defined]


def test_the_work_is_committed_and_the_connection_returned(db: Session) -> None:
    job = committed_job(db)
    before = _connections_in_use()
    with transaction(get_sessionmaker()) as session:
        add_event(session, job.id, "kept")
    assert committed_event_messages(job) == ["kept"]
    assert _connections_in_use() == before


@pytest.mark.parametrize("error", [ValueError("the work failed"), KeyboardInterrupt()])
def test_any_error_rolls_the_work_back_and_reaches_the_caller(db: Session, error: BaseException) -> None:
    job = committed_job(db)
    before = _connections_in_use()
    with pytest.raises(type(error)), transaction(get_sessionmaker()) as session:
        add_event(session, job.id, "dropped")
        session.flush()  # written to the server, then rolled back
        raise error
    assert committed_event_messages(job) == []
    assert _connections_in_use() == before


def test_a_failing_commit_is_rolled_back_and_raised(db: Session) -> None:
    before = _connections_in_use()
    with pytest.raises(IntegrityError), session_scope() as session:
        add_event(session, uuid.uuid4(), "an event of no job")  # the foreign key refuses it at commit
    assert _connections_in_use() == before


def test_each_transaction_gets_a_fresh_session_from_the_factory(db: Session) -> None:
    opened: list[Session] = []

    def sessions() -> Session:
        opened.append(get_sessionmaker()())
        return opened[-1]

    with transaction(sessions) as first:
        pass
    with transaction(sessions) as second:
        pass
    assert opened == [first, second] and first is not second
