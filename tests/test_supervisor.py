"""``conch up``'s supervisor: a service that dies (a native crash) is started again; one that keeps dying is
given up on, so a crash loop does not spin forever."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from cli.stack import Child, Stack
from tests.polling import wait_until


def _child(tmp_path: Path, name: str, code: str) -> Child:
    return Child(name, [sys.executable, "-c", code], tmp_path / f"{name}.log")


def test_a_crashed_service_is_restarted_and_a_crash_loop_is_given_up(tmp_path: Path) -> None:
    steady = _child(tmp_path, "steady", "import time; time.sleep(60)")
    crashing = _child(tmp_path, "crashing", "import ctypes; ctypes.string_at(0)")  # a segfault, as in native code
    stack = Stack([steady, crashing], env={})
    stack.start(timeout=10)
    try:
        wait_until(lambda: not crashing.alive(), what="the crash")
        restarted, given_up = stack.restart_dead(limit=2)
        assert restarted == [f"crashing (killed by SIGSEGV, log {crashing.log_path})"] and given_up == []
        assert steady.alive()
        wait_until(lambda: not crashing.alive(), what="the second crash")
        assert stack.restart_dead(limit=2)[0]
        wait_until(lambda: not crashing.alive(), what="the third crash")
        restarted, given_up = stack.restart_dead(limit=2)
        assert restarted == [] and given_up == [f"crashing (killed by SIGSEGV, log {crashing.log_path})"]
        assert steady.alive()  # the others keep running until the caller stops the stack
    finally:
        stack.stop()
    assert steady.proc is not None and steady.proc.returncode == -signal.SIGTERM
