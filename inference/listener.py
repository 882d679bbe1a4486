"""Three threads: one runs ``Deployer.reconcile`` every ``DEPLOYMENT_POLL_SECONDS`` or as soon as it is woken, one
subscribes to the deployments channel and wakes it (pub/sub is only a doorbell; the poll is the guarantee), and one
renews this replica's heartbeat on the deployments it loads or serves, also while a long load blocks the first
(a replica whose heartbeat stops no longer keeps a deployment from failing)."""

from __future__ import annotations

import logging
import threading

import redis

from core.contracts import DeploymentAnnouncement
from core.pubsub import redis_client
from core.settings import Settings
from inference.deployer import Deployer

log = logging.getLogger("conch.inference.listener")


class Listener:
    def __init__(self, settings: Settings, deployer: Deployer) -> None:
        self.settings = settings
        self.deployer = deployer
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.passes = 0

    def start(self) -> None:
        """Start both threads (again, after a stop: an app's lifespan may run more than once)."""
        self.stop()
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._reconcile_loop, name="deployments-reconcile", daemon=True),
            threading.Thread(target=self._subscribe_loop, name="deployments-subscribe", daemon=True),
            threading.Thread(target=self._heartbeat_loop, name="deployments-heartbeat", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        running = [thread for thread in self._threads if thread.is_alive()]
        for thread in running:
            thread.join(timeout)
        if running:
            try:
                self.deployer.leave()
            except Exception:  # the database may be down: the heartbeat then simply goes stale
                log.warning("deployments.leave_failed", exc_info=True)

    def wake(self) -> None:
        self._wake.set()

    def _reconcile_loop(self) -> None:
        while not self._stop.is_set():
            # Cleared before the pass: a message that arrives during it triggers another pass right away.
            self._wake.clear()
            try:
                self.deployer.reconcile()
            except Exception:  # the database may be down for a while; keep serving what is loaded and retry
                log.exception("deployments.reconcile_failed")
                self.deployer.metrics.failures.labels("reconcile").inc()
            self.passes += 1
            self._wake.wait(self.settings.deployment_poll_seconds)

    def _heartbeat_loop(self) -> None:
        interval = max(0.2, min(self.settings.deployment_poll_seconds, self.settings.replica_stale_seconds / 3))
        while not self._stop.wait(interval):
            try:
                self.deployer.heartbeat()
            except Exception:  # the database may be down for a while; the next beat tries again
                log.warning("deployments.heartbeat_failed", exc_info=True)

    def _subscribe_loop(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            client = redis_client(self.settings)
            if client is None:
                return  # no Redis configured: polling alone drives deployments
            try:
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.settings.deployments_channel)
                backoff = 0.5
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        self._on_message(message.get("data"))
            except (redis.RedisError, OSError) as exc:
                log.warning("deployments.subscribe_failed", extra={"error": str(exc)})
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                client.close()

    def _on_message(self, data: object) -> None:
        try:
            raw = data.decode() if isinstance(data, bytes) else str(data)
            announcement = DeploymentAnnouncement.model_validate_json(raw)
            log.info("deployment.announced", extra={"deployment_id": announcement.deployment_id})
        except ValueError:
            log.warning("deployments.bad_message")
        self._wake.set()
