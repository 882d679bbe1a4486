"""Admission control: how many generation requests the service takes at once, in all and per tenant.

A request is admitted before its model is acquired and keeps its place until its generation is closed (answer
sent, stream ended or broken, client gone, error), so one tenant's burst cannot fill the engines' queues while
another tenant waits, and a saturated service answers at once instead of queueing without bound.
"""

from __future__ import annotations

import threading

from core.http.errors import TooManyRequests
from inference.errors import ServiceSaturated

RETRY_AFTER_SECONDS = 1  # a place frees as soon as any running generation ends: worth trying again soon


class Ticket:
    """One admitted request's place; released exactly once, from whichever thread ends the request."""

    def __init__(self, admission: Admission, tenant: str) -> None:
        self._admission = admission
        self.tenant = tenant
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._leave(self.tenant)


class Admission:
    def __init__(self, max_in_flight: int, max_per_tenant: int) -> None:
        self.max_in_flight = max_in_flight
        self.max_per_tenant = max_per_tenant
        self._lock = threading.Lock()  # released from engine-closing code that may run off the event loop
        self._total = 0
        self._per_tenant: dict[str, int] = {}

    @property
    def in_flight(self) -> int:
        return self._total

    def of(self, tenant: str) -> int:
        return self._per_tenant.get(tenant, 0)

    def admit(self, tenant: str) -> Ticket:
        """A place for one request of ``tenant``, or 429 (this tenant's limit) / 503 (the whole service's)."""
        with self._lock:
            mine = self._per_tenant.get(tenant, 0)
            if mine >= self.max_per_tenant:
                raise TooManyRequests(
                    f"Too many concurrent requests for this tenant (at most {self.max_per_tenant}); "
                    f"retry in {RETRY_AFTER_SECONDS}s.",
                    retry_after=RETRY_AFTER_SECONDS,
                )
            if self._total >= self.max_in_flight:
                raise ServiceSaturated(
                    f"The service is handling its maximum of {self.max_in_flight} requests; "
                    f"retry in {RETRY_AFTER_SECONDS}s.",
                    retry_after=RETRY_AFTER_SECONDS,
                )
            self._total += 1
            self._per_tenant[tenant] = mine + 1
        return Ticket(self, tenant)

    def _leave(self, tenant: str) -> None:
        with self._lock:
            self._total -= 1
            left = self._per_tenant.get(tenant, 1) - 1
            if left > 0:
                self._per_tenant[tenant] = left
            else:
                self._per_tenant.pop(tenant, None)
