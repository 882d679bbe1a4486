"""Database writes that survive a short outage: a Postgres restart must not fail a long training run."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError

log = logging.getLogger("conch.worker.db")
T = TypeVar("T")


def is_transient(exc: BaseException) -> bool:
    """Connection-level failures (server restarting, network blip), not constraint or programming errors."""
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def with_retries(operation: Callable[[], T], *, what: str, patience_seconds: float = 120.0) -> T:
    """Run ``operation`` (which opens its own session) until it succeeds or the outage outlasts our patience."""
    delay = 0.25
    started = time.monotonic()
    while True:
        try:
            return operation()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() - started > patience_seconds:
                raise
            log.warning("db.retry", extra={"operation": what, "error": str(exc).splitlines()[0][:200]})
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
