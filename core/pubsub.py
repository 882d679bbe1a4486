"""Deployment announcements over Redis pub/sub. The database stays the truth: a missed message loses nothing,
because inference services also poll the deployments table."""

from __future__ import annotations

import logging

import redis

from core.contracts import DeploymentAnnouncement
from core.settings import Settings

log = logging.getLogger("conch.pubsub")


def redis_client(settings: Settings) -> redis.Redis | None:
    url = settings.redis_url or (settings.broker_url if (settings.broker_url or "").startswith("redis") else None)
    if not url:
        return None
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def announce_deployment(announcement: DeploymentAnnouncement, settings: Settings) -> bool:
    client = redis_client(settings)
    if client is None:
        return False
    try:
        client.publish(settings.deployments_channel, announcement.model_dump_json())
        return True
    except redis.RedisError as exc:  # the poller picks the deployment up from the database
        log.warning("deployment.announce_failed", extra={"error": str(exc)})
        return False
    finally:
        client.close()
