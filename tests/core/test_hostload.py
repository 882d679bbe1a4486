"""Training on this host is seen through marker files of live processes; inference follows it with its threads."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from core.hostload import training_here, training_on_this_host
from core.settings import Settings
from inference.engine.device import Threads, generation_threads


def test_a_training_process_is_seen_while_it_runs_and_not_after(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert not training_on_this_host(settings)
    with training_here(settings):
        assert training_on_this_host(settings)
    assert not training_on_this_host(settings)


def test_a_killed_trainer_s_marker_does_not_count(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    marker = tmp_path / "run" / "training" / f"{socket.gethostname()}-{child.pid}"
    marker.parent.mkdir(parents=True)
    marker.touch()
    assert training_on_this_host(settings)
    child.kill()
    child.wait()
    assert marker.exists() and not training_on_this_host(settings)
    # Another host's marker never counts here, alive or not.
    (marker.parent / f"elsewhere-{os.getpid()}").touch()
    assert not training_on_this_host(settings)


def test_generation_takes_every_core_unless_training_runs_here() -> None:
    cores = os.cpu_count() or 2
    assert generation_threads(0, training_here=False) == Threads(decode=max(1, cores - 1), prefill=cores)
    assert generation_threads(0, training_here=True) == Threads(max(1, cores // 2), max(1, cores // 2))
    assert generation_threads(3, training_here=True) == Threads(3, 3)  # INFERENCE_THREADS fixes both


def test_the_service_retunes_its_threads_when_training_starts(tmp_path: Path) -> None:
    from inference.metrics import Metrics
    from inference.registry import Registry

    settings = Settings(data_dir=tmp_path)
    registry = Registry(settings, Metrics())
    cores = os.cpu_count() or 2
    assert registry.threads.prefill == cores
    with training_here(settings):
        registry.retune_threads()
        assert registry.threads.prefill == max(1, cores // 2)
    registry.retune_threads()
    assert registry.threads.prefill == cores
