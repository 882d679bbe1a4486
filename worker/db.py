"""The worker's database writes: each is one transaction, tried again while the database is briefly away, so a
Postgres restart does not fail a long training run.

Call sites say only what they write (``transact(sessions, work, what=...)``); the session, the commit or rollback
and the retry are here. Only connection-level failures are retried: an exception raised by the work itself
(``LeaseLost``, a constraint violation) rolls the transaction back and reaches the caller at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_delay, wait_exponential

from core.db import SessionFactory, transaction

log = logging.getLogger("conch.worker.db")
T = TypeVar("T")

# Waits between tries: 0.25 s doubling up to 5 s; given up once the outage has lasted this long.
PATIENCE_SECONDS = 120.0


def is_transient(exc: BaseException) -> bool:
    """Connection-level failures (server restarting, network blip), not constraint or programming errors."""
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def with_retries(operation: Callable[[], T], *, what: str, patience_seconds: float = PATIENCE_SECONDS) -> T:
    """Run ``operation`` (which opens its own session) until it succeeds or the outage outlasts our patience;
    the last error is raised as it was."""

    def log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        first_line = (str(exc).splitlines() or [""])[0]
        log.warning("db.retry", extra={"operation": what, "error": first_line[:200]})

    retrying = Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_delay(patience_seconds),
        wait=wait_exponential(multiplier=0.25, max=5.0),
        before_sleep=log_retry,
        reraise=True,
    )
    return retrying(operation)


def transact(sessions: SessionFactory, work: Callable[[Session], T], *, what: str) -> T:
    """Run ``work`` in one transaction on a fresh session and commit what it wrote; on a transient failure the
    whole transaction is tried again from the start. ``what`` names the write in the retry log."""

    def attempt() -> T:
        with transaction(sessions) as session:
            return work(session)

    return with_retries(attempt, what=what)
