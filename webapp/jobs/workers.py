"""The live training workers' capabilities, as they announce them (worker.announce, worker.capabilities).

A record exists only while its worker renews it, so what is read here is what the running
workers can do now. Redis being unreachable reads as "no worker has said": the form then
offers only what every worker can run.
"""

from __future__ import annotations

from typing import Any

import redis
from django.conf import settings

from worker.capabilities import live_records


def live_capabilities() -> list[dict[str, Any]]:
    """The records of the training workers that are up, one per worker."""
    try:
        client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=1)
        return live_records(client)
    except redis.RedisError:
        return []


def supported(feature: str, records: list[dict[str, Any]] | None = None) -> bool:
    """Whether a live training worker reports `feature` (e.g. "qlora", "gradient_checkpointing")."""
    records = live_capabilities() if records is None else records
    return any(record.get(feature) is True for record in records)
