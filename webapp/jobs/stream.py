"""The live side of a job's events: a Redis stream per job.

The database holds every event (the durable history); the stream carries the same events
to SSE clients with low latency. A stream entry's id is `0-<seq>`, the event's per-job
sequence number, so a client resuming from a sequence number can read from either source.
Redis being down never fails the writer: the reader falls back to the database.
"""

from __future__ import annotations

import json
import logging
from functools import cache
from typing import Any

import redis
from django.conf import settings

log = logging.getLogger(__name__)

STREAM_TTL_SECONDS = 24 * 3600


def key(job_id: int) -> str:
    return f"specialist:job:{job_id}:events"


@cache
def _client() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=2)


def publish(job_id: int, events: list[dict[str, Any]]) -> None:
    try:
        pipe = _client().pipeline(transaction=False)
        for event in events:
            pipe.xadd(key(job_id), {"data": json.dumps(event)}, id=f"0-{event['seq']}")
        pipe.expire(key(job_id), STREAM_TTL_SECONDS)
        pipe.execute(raise_on_error=False)
    except redis.RedisError as exc:
        # The events are already in the database; readers fill gaps from there.
        log.warning("could not publish %d events of job %s to Redis: %s", len(events), job_id, exc)


def async_client():
    import redis.asyncio

    return redis.asyncio.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2)
