"""Holding a claimed job: a heartbeat thread renews the lease and reads the cancel flag; SIGTERM asks to stop.

The training loop never waits on the database to learn whether it should stop: it reads the flags this thread
keeps (the latest cancel reading, a lost lease) and the shutdown flag the signal handler sets.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable
from types import FrameType

from core.db import SessionFactory, transaction
from core.jobs import LeaseLost, renew_lease
from worker.db import is_transient

log = logging.getLogger("conch.worker.heartbeat")


class JobControl:
    """The lease and the stop flags of one claimed job."""

    def __init__(
        self,
        job_id: uuid.UUID,
        owner: str,
        *,
        lease_seconds: float,
        interval_seconds: float,
        session_factory: SessionFactory,
    ) -> None:
        self.job_id = job_id
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.interval_seconds = interval_seconds
        self.session_factory = session_factory
        self.cancel_requested = False
        self.lease_lost = threading.Event()
        self.shutdown_requested = threading.Event()
        # Set just before the worker writes the job's final state: a heartbeat that then finds the job no
        # longer running is seeing that write, not a takeover.
        self.finishing = threading.Event()
        self.last_renewed = time.monotonic()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id.hex[:8]}", daemon=True)

    # -------------------------------------------------------------------------------------------- flags

    def stop_reason(self) -> str | None:
        """Why training must stop now, most binding first: lost lease, then cancel, then shutdown."""
        if self.lease_lost.is_set():
            return "lease_lost"
        if self.cancel_requested:
            return "cancel"
        if self.shutdown_requested.is_set():
            return "shutdown"
        return None

    def request_shutdown(self) -> None:
        self.shutdown_requested.set()

    # -------------------------------------------------------------------------------------------- thread

    def start(self) -> JobControl:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval_seconds + 10)

    def renew_once(self) -> None:
        """One heartbeat: extend the lease and read the cancel flag (LeaseLost if the job is not ours)."""
        # Not retried here: the beat itself comes again in ``interval_seconds`` (see ``_beat``).
        with transaction(self.session_factory) as session:
            cancel = renew_lease(session, self.job_id, self.owner, self.lease_seconds)
        self.last_renewed = time.monotonic()
        if cancel and not self.cancel_requested:
            log.info("job.cancel_seen", extra={"job_id": self.job_id.hex})
        self.cancel_requested = cancel

    def _beat(self) -> None:
        while not self._closing.wait(self.interval_seconds):
            try:
                self.renew_once()
            except LeaseLost:
                if self.finishing.is_set():
                    return
                log.warning("job.lease_lost", extra={"job_id": self.job_id.hex, "owner": self.owner})
                self.lease_lost.set()
                return
            except Exception as exc:
                # A database outage: keep training and keep trying. If another worker took the job meanwhile,
                # the next successful round trip says so (LeaseLost), and every write names our lease anyway.
                level = logging.WARNING if is_transient(exc) else logging.ERROR
                log.log(level, "job.heartbeat_failed", extra={"job_id": self.job_id.hex, "error": str(exc)[:200]})


def install_sigterm_handler(control: JobControl) -> Callable[[], None]:
    """Turn SIGTERM into a graceful stop of the running job; returns a function restoring the old handler.

    Celery's prefork children get SIGTERM's default action (die at once); a worker shutting down should
    instead checkpoint and hand the job back. Signal handlers can only be set from the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("job.shutdown_requested", extra={"job_id": control.job_id.hex, "signal": signum})
        control.request_shutdown()

    previous = signal.signal(signal.SIGTERM, handler)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore
