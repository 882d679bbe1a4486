"""The worker's transactions (``worker.db.transact``) on the real Postgres and on a server that is not there:
connection failures are tried again on a fresh session, errors of the work itself are not, nothing half-done is
committed."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core.db import SessionFactory, get_sessionmaker, make_engine
from core.jobs import LeaseLost, add_event, update_owned
from tests.factories import committed_event_messages, committed_job
from worker.db import is_transient, transact, with_retries


@pytest.fixture
def unreachable() -> Iterator[sessionmaker[Session]]:
    """Sessions on a Postgres that is down (nothing listens on port 1): connecting fails as in an outage."""
    engine = make_engine("postgresql://postgres@127.0.0.1:1/conch")
    yield sessionmaker(bind=engine)
    engine.dispose()


def _down_then_up(down: SessionFactory, failures: int) -> SessionFactory:
    opened = 0

    def sessions() -> Session:
        nonlocal opened
        opened += 1
        return down() if opened <= failures else get_sessionmaker()()

    return sessions


def test_an_outage_is_waited_out_and_the_write_committed_once(
    db: Session, unreachable: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    job = committed_job(db)
    caplog.set_level(logging.WARNING, logger="conch.worker.db")

    def write(session: Session) -> str:
        add_event(session, job.id, "written through an outage")
        return "done"

    assert transact(_down_then_up(unreachable, failures=2), write, what="test.write") == "done"
    assert committed_event_messages(job) == ["written through an outage"]
    retries = [r for r in caplog.records if r.getMessage() == "db.retry"]
    assert [getattr(r, "operation", None) for r in retries] == ["test.write", "test.write"]


def test_an_outage_longer_than_the_patience_raises_the_database_error(unreachable: sessionmaker[Session]) -> None:
    def probe() -> None:
        with unreachable() as session:
            session.execute(text("select 1"))

    started = time.monotonic()
    with pytest.raises(OperationalError) as raised:
        with_retries(probe, what="test.probe", patience_seconds=0.5)
    assert is_transient(raised.value)  # the error itself, not a wrapper around it
    assert 0.5 <= time.monotonic() - started < 5  # tried again 0.25 s, then 0.5 s later, then gave up


def test_an_error_of_the_work_rolls_back_and_is_not_retried(db: Session) -> None:
    job = committed_job(db)
    attempts = 0

    def write_under_a_lease_we_do_not_hold(session: Session) -> None:
        nonlocal attempts
        attempts += 1
        add_event(session, job.id, "never committed")
        update_owned(session, job.id, "not-the-owner")

    with pytest.raises(LeaseLost):
        transact(get_sessionmaker(), write_under_a_lease_we_do_not_hold, what="test.lease")
    assert attempts == 1 and committed_event_messages(job) == []


def test_a_constraint_violation_is_not_transient(db: Session) -> None:
    job = committed_job(db)
    attempts = 0

    def write_an_event_of_no_job(session: Session) -> None:
        nonlocal attempts
        attempts += 1
        add_event(session, job.id, "never committed")
        add_event(session, uuid.uuid4(), "an event of no job")  # the foreign key refuses it

    with pytest.raises(IntegrityError) as raised:
        transact(get_sessionmaker(), write_an_event_of_no_job, what="test.constraint")
    assert attempts == 1 and not is_transient(raised.value) and committed_event_messages(job) == []
