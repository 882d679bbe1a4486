"""The reconciler as a process of its own: ``python -m worker.reconciler``.

Every worker starts one beside itself (``worker.app``), so a dead worker's job is recovered even while the api is
down; several may run at once (workers, the api's thread, a standalone one) because each sweep runs only under a
database lock (``core.reconcile``). Started by a worker it is given ``--parent`` and ends when that worker does,
even one killed outright, so it never outlives it. Every ``JANITOR_INTERVAL_SECONDS`` (and once at start) it also
runs the janitor (``core.janitor``), under a lock of its own, which removes leftovers nothing references. Given
``--device-class``, each sweep also renews that class's report, so the api keeps checking jobs against it while
a worker of it is alive (``DEVICE_CLASS_TTL_SECONDS``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from types import FrameType

from core import janitor
from core.db import session_scope
from core.device_classes import renew
from core.logging import configure_logging
from core.reconcile import reconcile_once
from core.settings import Settings, get_settings

log = logging.getLogger("conch.worker.reconciler")

# How often, at most, the loop looks whether its parent worker is still there.
PARENT_CHECK_SECONDS = 1.0


def parent_gone(parent_pid: int | None) -> bool:
    # A process whose parent died is handed to another (init or a subreaper): its parent pid changes.
    return parent_pid is not None and os.getppid() != parent_pid


def run(
    settings: Settings, stop: threading.Event, *, parent_pid: int | None = None, device_class: str | None = None
) -> int:
    """Sweep every RECONCILE_INTERVAL_SECONDS until ``stop`` is set or the parent worker is gone; returns sweeps."""
    interval = settings.reconcile_interval_seconds
    sweeps = 0
    janitor_due = time.monotonic()
    log.info("reconciler.started", extra={"interval_seconds": interval, "pid": os.getpid()})
    while not stop.is_set() and not parent_gone(parent_pid):
        try:
            reconcile_once(settings)
        except Exception:  # the database or broker may be down; try again next round
            log.exception("reconciler.sweep_failed")
        if device_class:
            try:
                with session_scope() as session:
                    renew(session, device_class)
            except Exception:  # the database may be down; the next sweep renews it
                log.exception("reconciler.renew_failed")
        if settings.janitor_interval_seconds > 0 and time.monotonic() >= janitor_due:
            janitor_due = time.monotonic() + settings.janitor_interval_seconds
            try:
                janitor.sweep_once(settings)
            except Exception:  # a failed sweep leaves everything in place; the next one tries again
                log.exception("janitor.sweep_failed")
        sweeps += 1
        waited = 0.0
        while waited < interval and not stop.is_set() and not parent_gone(parent_pid):
            step = min(PARENT_CHECK_SECONDS, interval - waited)
            stop.wait(step)
            waited += step
    log.info("reconciler.stopped", extra={"sweeps": sweeps})
    return sweeps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.reconciler", description=__doc__)
    parser.add_argument("--parent", type=int, default=None, help="end when the process with this pid is gone")
    parser.add_argument("--device-class", default=None, help="renew this device class's report every sweep")
    args = parser.parse_args(argv)
    settings = get_settings()
    configure_logging(settings.log_level, json_lines=settings.log_json)
    if settings.reconcile_interval_seconds <= 0:
        log.info("reconciler.disabled")
        return 0
    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    run(settings, stop, parent_pid=args.parent, device_class=args.device_class)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
