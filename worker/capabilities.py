"""What a training worker can do, as records in Redis: the contract between the worker that
writes them (worker/announce.py) and the new-job form that reads them (webapp.jobs.workers).

Each live training worker keeps one JSON record under ``specialist:worker:<name>:capabilities``
with a short expiry, renewed while the worker lives: a record that exists belongs to a live
worker. Plain data and Redis; no torch, so the web side may import it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

KEY_PREFIX = "specialist:worker:"
TTL_SECONDS = 60
RENEW_SECONDS = 20


def key(worker_name: str) -> str:
    return f"{KEY_PREFIX}{worker_name}:capabilities"


def publish(client: redis.Redis, worker_name: str, capabilities: dict[str, Any]) -> None:
    record = {**capabilities, "worker": worker_name, "t": round(time.time(), 3)}
    client.set(key(worker_name), json.dumps(record), ex=TTL_SECONDS)


def live_records(client: redis.Redis) -> list[dict[str, Any]]:
    """The records of the training workers that are up, one per worker (raises redis.RedisError)."""
    return records_matching(client, f"{KEY_PREFIX}*:capabilities")


def records_matching(client: redis.Redis, pattern: str) -> list[dict[str, Any]]:
    """The JSON records under the keys matching `pattern` (also the inference servers' registry)."""
    keys = list(client.scan_iter(match=pattern, count=100))
    records = []
    for value in client.mget(keys) if keys else []:
        try:
            records.append(json.loads(value))
        except (TypeError, ValueError):
            continue  # expired between SCAN and MGET, or not ours
    return records
