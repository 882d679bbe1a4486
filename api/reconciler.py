"""The reconciler's home in the api process: a daemon thread sweeping for jobs whose enqueue was lost or whose
worker died (``core.reconcile``), started and stopped with the app. Several api processes may each run one: the
sweep locks rows with SKIP LOCKED and re-enqueueing is harmless."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("conch.api.reconciler")


class ReconcilerThread:
    def __init__(self, interval_seconds: float, sweep: Callable[[], object]) -> None:
        self.interval = interval_seconds
        self.sweep = sweep
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="conch-reconciler", daemon=True)
        self.sweeps = 0

    def start(self) -> None:
        self._thread.start()
        log.info("reconciler.started", extra={"interval_seconds": self.interval})

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        log.info("reconciler.stopped")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception:  # the database or broker may be down; try again next round
                log.exception("reconciler.sweep_failed")
            self.sweeps += 1
            self._stop.wait(self.interval)
