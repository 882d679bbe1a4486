"""How many live event streams (SSE) each caller holds: a stream keeps a connection open and polls the database
for as long as its job runs, so one key opening hundreds would tie up the api. Counted per api process, in memory:
a slot is taken before the stream starts and given back when it ends, however it ends."""

from __future__ import annotations

import threading
from collections import Counter

from starlette.applications import Starlette

from core.http.errors import TooManyRequests

# How long a refused client is told to wait: streams last as long as their jobs, so there is no exact time.
RETRY_AFTER_SECONDS = 5


class StreamSlot:
    """One held stream; ``release`` is safe to call more than once (the stream's end and its cleanup both do)."""

    def __init__(self, registry: StreamRegistry, identity: str) -> None:
        self._registry = registry
        self._identity = identity
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._registry._give_back(self._identity)


class StreamRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: Counter[str] = Counter()

    def acquire(self, identity: str, limit: int) -> StreamSlot:
        """A slot for ``identity``, or 429 (with Retry-After) when it already holds ``limit`` streams."""
        with self._lock:
            if self._held[identity] >= limit:
                raise TooManyRequests(
                    f"At most {limit} live event streams may be open per API key; close one or retry in "
                    f"{RETRY_AFTER_SECONDS}s.",
                    retry_after=RETRY_AFTER_SECONDS,
                )
            self._held[identity] += 1
        return StreamSlot(self, identity)

    def held(self, identity: str) -> int:
        with self._lock:
            return self._held[identity]

    def _give_back(self, identity: str) -> None:
        with self._lock:
            self._held[identity] -= 1
            if self._held[identity] <= 0:
                del self._held[identity]


_CREATE_LOCK = threading.Lock()


def registry_for(app: Starlette) -> StreamRegistry:
    """The app's registry, made on first use (one per app, so test apps in one process do not share counts)."""
    with _CREATE_LOCK:
        registry: StreamRegistry | None = getattr(app.state, "event_streams", None)
        if registry is None:
            registry = StreamRegistry()
            app.state.event_streams = registry
        return registry
