"""This worker's device class, and its report of what the device can do (core.device_classes).

The class is known without torch (the worker's parent never touches an accelerator): WORKER_DEVICE_CLASS, else
``gpu-any`` where an NVIDIA device node is visible and ``cpu`` otherwise. The report itself is probed in a short
child process started when the worker is ready (``python -m worker.capabilities --device-class C --worker W``),
which imports torch, writes the class's row and exits.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from core.db import session_scope
from core.device_classes import publish
from core.logging import configure_logging
from core.settings import Settings, get_settings

log = logging.getLogger("conch.worker.capabilities")


def nvidia_visible(dev: Path = Path("/dev"), environ: dict[str, str] | None = None) -> bool:
    """Whether this process may see an NVIDIA GPU: a device node exists and CUDA_VISIBLE_DEVICES hides none."""
    visible = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return any(dev.glob("nvidia[0-9]*"))


def worker_device_class(settings: Settings) -> str:
    return settings.worker_device_class or ("gpu-any" if nvidia_visible() else "cpu")


def probe_and_publish(device_class: str, worker: str) -> None:
    from worker.pipeline.device import device_capabilities

    capabilities = device_capabilities()
    with session_scope() as session:
        publish(session, device_class, capabilities, worker)
    if device_class.startswith("gpu") and capabilities.device != "cuda":
        log.warning("worker.device_class_without_gpu", extra={"device_class": device_class})
    log.info(
        "worker.capabilities_published",
        extra={"device_class": device_class, "worker": worker, **capabilities.model_dump(mode="json")},
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Probe this host's training device and report it")
    parser.add_argument("--device-class", required=True)
    parser.add_argument("--worker", required=True)
    args = parser.parse_args(argv)
    settings = get_settings()
    configure_logging(settings.log_level, json_lines=settings.log_json)
    probe_and_publish(args.device_class, args.worker)


if __name__ == "__main__":
    main()
