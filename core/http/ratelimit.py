"""A fixed-window request counter per caller: in Redis when configured (shared by every process of a service), else
in this process. A Redis outage degrades to the in-process counter rather than refusing or waving through traffic.

Both services use it for failed authentications per client address (``AuthThrottle``), counted before a key is
looked up; the api also for requests per key, or per client address when AUTH_REQUIRED is off."""

from __future__ import annotations

import logging
import math
import threading
import time

import redis

log = logging.getLogger("conch.ratelimit")

WINDOW_SECONDS = 60


def _window(now: float | None) -> tuple[float, int]:
    """The time and the number of its fixed window."""
    now = time.time() if now is None else now
    return now, int(now // WINDOW_SECONDS)


def _until_next(window: int, now: float) -> int:
    """Whole seconds until ``window`` ends (at least 1: a Retry-After of 0 invites an immediate retry)."""
    return max(1, math.ceil((window + 1) * WINDOW_SECONDS - now))


class RateLimiter:
    def __init__(self, limit_per_window: int, *, client: redis.Redis | None, namespace: str) -> None:
        self.limit = limit_per_window
        self.client = client
        self.namespace = namespace
        self._lock = threading.Lock()
        self._local: dict[tuple[str, int], int] = {}

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def hit(self, identity: str, now: float | None = None) -> int | None:
        """Count one request; None if allowed, else the seconds until the window resets (for Retry-After)."""
        if not self.enabled:
            return None
        now, window = _window(now)
        count = self._count_redis(identity, window)
        if count is None:
            count = self._count_local(identity, window)
        return None if count <= self.limit else _until_next(window, now)

    def exceeded(self, identity: str, now: float | None = None) -> int | None:
        """Without counting: the seconds until the window resets if ``identity`` has used up its limit, else None."""
        if not self.enabled:
            return None
        now, window = _window(now)
        count = self._read_redis(identity, window)
        if count is None:
            with self._lock:
                count = self._local.get((identity, window), 0)
        return None if count < self.limit else _until_next(window, now)

    def _key(self, identity: str, window: int) -> str:
        return f"{self.namespace}:ratelimit:{identity}:{window}"

    def _read_redis(self, identity: str, window: int) -> int | None:
        if self.client is None:
            return None
        try:
            value = self.client.get(self._key(identity, window))
        except redis.RedisError as exc:
            log.warning("ratelimit.redis_unavailable", extra={"error_class": type(exc).__name__})
            return None
        return int(value) if value is not None else 0

    def _count_redis(self, identity: str, window: int) -> int | None:
        if self.client is None:
            return None
        key = self._key(identity, window)
        try:
            pipe = self.client.pipeline()
            pipe.incr(key)
            pipe.expire(key, WINDOW_SECONDS * 2)
            count, _ = pipe.execute()
            return int(count)
        except redis.RedisError as exc:
            log.warning("ratelimit.redis_unavailable", extra={"error_class": type(exc).__name__})
            return None

    def _count_local(self, identity: str, window: int) -> int:
        with self._lock:
            for stale in [k for k in self._local if k[1] < window]:
                del self._local[stale]
            count = self._local.get((identity, window), 0) + 1
            self._local[(identity, window)] = count
            return count


def client_address(scope_client: tuple[str, int] | None) -> str:
    """The caller's address as the server sees it. Behind a reverse proxy, run uvicorn with
    ``--forwarded-allow-ips`` so this is the client's address rather than the proxy's."""
    return scope_client[0] if scope_client else "unknown"


class AuthThrottle:
    """Failed authentications per client address: an address that sent ``limit`` bad keys within a minute gets
    429 before its next key is hashed or looked up, so guessing keys costs the database nothing."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    def check(self, address: str) -> int | None:
        """Seconds to wait when ``address`` is blocked, else None."""
        return self.limiter.exceeded(f"authfail:{address}")

    def failed(self, address: str) -> None:
        self.limiter.hit(f"authfail:{address}")
