"""The worker's Celery app: the shared client configuration plus worker-only options.

Start it with ``celery -A worker.app:celery_app worker -Q <TRAINING_QUEUE> -c 1 --pool prefork``; it also
consumes ``<TRAINING_QUEUE>.<device class>`` (WORKER_DEVICE_CLASS, see worker.capabilities). Nothing here
imports torch: the parent process stays small and never touches an accelerator; each training task runs in a
fresh child (``worker_max_tasks_per_child=1``) that gives all its memory back when the task ends.

Each worker also runs the reconciler (``worker.reconciler``) as a small process beside it, so jobs whose worker
died are recovered even while the api is down (WORKER_RECONCILER=false turns it off).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from typing import Any

from celery import Celery, signals

from core.db import reset_engine_cache
from core.device_classes import class_queue
from core.logging import configure_logging
from core.queue import make_celery
from core.settings import get_settings
from worker.capabilities import worker_device_class

log = logging.getLogger("conch.worker")


def create_celery_app() -> Celery:
    app = make_celery(get_settings())
    app.conf.update(
        include=["worker.tasks"],
        # One training task per child process and no prefetching: a second message waits in the broker for a
        # free worker instead of sitting behind a run that may take hours.
        worker_concurrency=1,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=1,
        worker_send_task_events=True,
        # A broker blip must not kill a training run; the database lease is what guards the job.
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


celery_app = create_celery_app()


@signals.setup_logging.connect
def _configure_logging(**_: Any) -> None:
    settings = get_settings()
    configure_logging(settings.log_level, json_lines=settings.log_json)


@signals.worker_process_init.connect
def _fresh_child(**_: Any) -> None:
    # A forked child must not share the parent's database connections.
    reset_engine_cache()


@signals.worker_shutting_down.connect
def _stop_running_training(sig: str = "", how: str = "", **_: Any) -> None:
    """Warm shutdown of the parent (``docker stop`` signals only the parent): tell the child running a job to
    checkpoint and hand the job back, instead of waiting for a run that may last hours."""
    if how not in ("Warm", "Soft"):
        return
    from billiard.process import active_children

    for child in active_children():
        if child.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)


_node_name = ""
_probe: subprocess.Popen[bytes] | None = None


@signals.celeryd_after_setup.connect
def _consume_device_class_queue(sender: str = "", instance: Any = None, **_: Any) -> None:
    """Besides the shared queue (``-Q``), take the jobs routed to this worker's device class."""
    global _node_name
    _node_name = sender
    settings = get_settings()
    device_class = worker_device_class(settings)
    queue = class_queue(device_class, settings)
    if instance is not None:
        instance.app.amqp.queues.select_add(queue)
    log.info("worker.device_class", extra={"device_class": device_class, "queue": queue})


@signals.worker_ready.connect
def _report_capabilities(**_: Any) -> None:
    """Probe the device in a child process (torch and CUDA stay out of this parent, which forks the training
    children) and record it for the api's checks at job creation."""
    global _probe
    settings = get_settings()
    argv = [sys.executable, "-m", "worker.capabilities", "--device-class", worker_device_class(settings)]
    _probe = subprocess.Popen([*argv, "--worker", _node_name or socket.gethostname()])


_reconciler: subprocess.Popen[bytes] | None = None


@signals.worker_ready.connect
def _start_reconciler(**_: Any) -> None:
    """A separate process, not a thread: the pool forks children from this process, and forking while another
    thread holds a lock (a database pool's, say) can leave the child stuck on it."""
    global _reconciler
    settings = get_settings()
    if not settings.worker_reconciler or settings.reconcile_interval_seconds <= 0 or _reconciler is not None:
        return
    argv = [sys.executable, "-m", "worker.reconciler", "--parent", str(os.getpid())]
    argv += ["--device-class", worker_device_class(settings)]
    _reconciler = subprocess.Popen(argv)
    log.info("worker.reconciler_started", extra={"pid": _reconciler.pid})


@signals.worker_shutdown.connect
def _stop_reconciler(**_: Any) -> None:
    global _reconciler, _probe
    if _probe is not None and _probe.poll() is None:
        _probe.kill()
    _probe = None
    process, _reconciler = _reconciler, None
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)
