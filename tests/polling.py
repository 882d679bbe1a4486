"""Waiting for something another process or thread will make true, with a message that says what never came."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    check: Callable[[], T | None],
    what: str,
    *,
    timeout: float = 60.0,
    interval: float = 0.05,
    logs: Callable[[], str] | None = None,
) -> T:
    """Poll ``check`` until it returns something truthy and return that; fail after ``timeout`` seconds with the
    last value and, when given, the tail of the logs that explain it."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = f"\n{logs()}" if logs else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value {value!r}){tail}")
        time.sleep(interval)
