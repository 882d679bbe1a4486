"""The request's unit of work: one Session that commits when the route succeeds and rolls back when it fails.

Side effects outside the database (ringing the broker, announcing a deployment, deleting bytes on disk) must
happen only once the rows they refer to are committed, and cleanups of files written for a request must happen
when its rows are rolled back. Services register such callbacks on the session; the dependency runs them.
The commit or rollback itself is ``core.db.transaction``, the same unit of work every process uses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from sqlalchemy.orm import Session

from core.db import get_sessionmaker, transaction

log = logging.getLogger("conch.api")

Callback = Callable[[], None]
_AFTER_COMMIT = "conch_after_commit"
_AFTER_ROLLBACK = "conch_after_rollback"


def on_commit(session: Session, callback: Callback) -> None:
    """Run ``callback`` after the request's transaction commits (never if it rolls back)."""
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)


def on_rollback(session: Session, callback: Callback) -> None:
    """Run ``callback`` if the request's transaction rolls back (for example to delete a stored upload)."""
    session.info.setdefault(_AFTER_ROLLBACK, []).append(callback)


def _run(callbacks: list[Callback], event: str) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception:  # one failed side effect must not hide the others; the reconciler covers enqueues
            log.exception(event)


def request_session() -> Iterator[Session]:
    """FastAPI dependency (use with ``scope="function"`` so the commit happens before the response is sent)."""
    session = get_sessionmaker()()
    try:
        with transaction(lambda: session):
            yield session
    except BaseException:
        _run(session.info.pop(_AFTER_ROLLBACK, []), "session.rollback_hook_failed")
        raise
    # The session is closed by now; its info dict, which holds the callbacks, outlives the close.
    _run(session.info.pop(_AFTER_COMMIT, []), "session.commit_hook_failed")
