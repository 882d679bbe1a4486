"""The vLLM server's watchdog (``inference.vllm.server.WATCHDOG``): should the inference service die without
stopping its server (SIGKILL, OOM), the whole server process group goes too, so no orphan keeps its memory and
port. Real processes; a sleeping Python stands for the server, so this runs without vLLM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from inference.vllm.server import WATCHDOG
from tests.polling import wait_until

SERVICE = """
import os, subprocess, sys
watchdog = sys.argv[1]
head = subprocess.Popen(
    [sys.executable, "-c", watchdog, str(os.getpid()), "-c", "import time; time.sleep(600)"], start_new_session=True
)
print(head.pid, flush=True)
head.wait()
"""


def _live_members(group: int) -> list[int]:
    """Processes of ``group`` that are still running (zombies waiting for a reaper do not count)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == group and state != "Z":
            members.append(int(entry.name))
    return members


def test_the_server_group_goes_when_the_service_is_killed() -> None:
    service = subprocess.Popen([sys.executable, "-c", SERVICE, WATCHDOG], stdout=subprocess.PIPE, text=True)
    assert service.stdout is not None
    head = int(service.stdout.readline())
    try:
        wait_until(lambda: len(_live_members(head)) == 2, what="watchdog and server running")
        os.kill(service.pid, signal.SIGKILL)
        service.wait()
        wait_until(lambda: not _live_members(head), timeout=30, what="the server group gone")
    finally:
        for pid in _live_members(head):
            os.kill(pid, signal.SIGKILL)


def test_a_stopped_server_takes_its_watchdog_along() -> None:
    head = subprocess.Popen(
        [sys.executable, "-c", WATCHDOG, str(os.getpid()), "-c", "import time; time.sleep(600)"],
        start_new_session=True,
    )
    try:
        wait_until(lambda: len(_live_members(head.pid)) == 2, what="watchdog and server running")
        os.killpg(head.pid, signal.SIGTERM)  # what VllmServer.stop sends
        head.wait(30)
        wait_until(lambda: not _live_members(head.pid), timeout=30, what="the server group gone")
    finally:
        for pid in _live_members(head.pid):
            os.kill(pid, signal.SIGKILL)
