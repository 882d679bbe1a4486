"""Whether a training job runs on this host right now, so inference can take every core when none does.

A training process leaves a marker file (``DATA_DIR/run/training/<host>-<pid>``) for as long as it trains. A
reader counts the markers of its own host whose process is still alive, so a worker killed mid-job (its marker
left behind) stops counting at once. Hosts are told apart by name: processes in separate containers share no
cores anyway as far as this is concerned (each sees its own CPU quota).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from core.settings import Settings


def _markers(settings: Settings) -> Path:
    return settings.data_dir / "run" / "training"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host (or container) still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process, alive
        return True
    return True


@contextlib.contextmanager
def training_here(settings: Settings) -> Iterator[None]:
    """Mark this process as training on this host until the block ends."""
    folder = _markers(settings)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f"{socket.gethostname()}-{os.getpid()}"
    marker.touch()
    try:
        yield
    finally:
        marker.unlink(missing_ok=True)


def training_on_this_host(settings: Settings) -> bool:
    host = socket.gethostname()
    try:
        names = [p.name for p in _markers(settings).iterdir()]
    except OSError:
        return False
    for name in names:
        marker_host, _, pid = name.rpartition("-")
        if marker_host == host and pid.isdigit() and process_alive(int(pid)):
            return True
    return False
