"""A fixed-window request counter per caller: in Redis when configured (shared by every api process), else in
this process. A Redis outage degrades to the in-process counter rather than refusing or waving through traffic."""

from __future__ import annotations

import logging
import math
import threading
import time

import redis

log = logging.getLogger("conch.api.ratelimit")

WINDOW_SECONDS = 60


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
        now = time.time() if now is None else now
        window = int(now // WINDOW_SECONDS)
        count = self._count_redis(identity, window)
        if count is None:
            count = self._count_local(identity, window)
        if count <= self.limit:
            return None
        return max(1, math.ceil((window + 1) * WINDOW_SECONDS - now))

    def _count_redis(self, identity: str, window: int) -> int | None:
        if self.client is None:
            return None
        key = f"{self.namespace}:ratelimit:{identity}:{window}"
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
