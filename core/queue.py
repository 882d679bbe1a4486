"""The Celery client side: one app object configured from settings, and enqueueing by task name.

The api never imports worker code; it rings the broker with a job id. The worker builds its app from the same
function and adds worker-only options.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from celery import Celery

from core.contracts import TASK_FINE_TUNE, FineTuneTask
from core.device_classes import class_queue
from core.settings import Settings

log = logging.getLogger("conch.queue")


def celery_config(settings: Settings) -> dict[str, Any]:
    config: dict[str, Any] = {
        "broker_url": settings.celery_broker_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_default_queue": settings.training_queue,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # Training outlives the default one-hour visibility timeout; the database claim refuses copies anyway.
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout_seconds},
        "worker_hijack_root_logger": False,
        "task_send_sent_event": True,
    }
    if settings.uses_filesystem_broker:
        folder = str(settings.broker_folder)
        settings.broker_folder.mkdir(parents=True, exist_ok=True)
        # Both directions name the same absolute folder so separate processes see each other's messages.
        config["broker_transport_options"] = {
            "data_folder_in": folder,
            "data_folder_out": folder,
            # kombu otherwise writes broadcast (control) exchanges to ./control in the working directory.
            "control_folder": str(settings.broker_folder / "control"),
        }
    return config


def make_celery(settings: Settings) -> Celery:
    app = Celery("conch")
    app.conf.update(celery_config(settings))
    return app


_clients: dict[str, Celery] = {}
_clients_lock = threading.Lock()


def get_celery(settings: Settings) -> Celery:
    """The client app for this broker (one per process and broker: it holds the connection pool)."""
    key = json.dumps(celery_config(settings), sort_keys=True, default=str)
    with _clients_lock:
        app = _clients.get(key)
        if app is None:
            app = _clients[key] = make_celery(settings)
        return app


def close_clients() -> None:
    """Close and forget every client app (tests that change the broker settings within one process)."""
    with _clients_lock:
        apps = list(_clients.values())
        _clients.clear()
    for app in apps:
        app.close()


def enqueue_fine_tune(job_id: str, settings: Settings, device_class: str | None = None) -> None:
    """Ring the doorbell for a committed job. Raises if the broker cannot be reached (the reconciler retries).

    The message is ``FineTuneTask``: the job id and nothing else; the worker re-reads the rest from the database.
    It goes to the queue of the job's device class, or to the shared queue when it has none."""
    app = get_celery(settings)
    queue = class_queue(device_class, settings)
    app.send_task(
        TASK_FINE_TUNE,
        kwargs=FineTuneTask(job_id=job_id).model_dump(),
        queue=queue,
        retry=True,
        retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0},
    )
    log.info("job.enqueued", extra={"job_id": job_id, "queue": queue})
