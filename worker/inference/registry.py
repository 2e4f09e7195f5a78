"""How the web app finds the inference servers: one Redis record per live server.

Each server keeps ``specialist:inference:<id>`` (its address, what it holds, how busy it is)
with a short expiry, renewed while it lives. The web app routes a request to a server that holds
the model, else to the least busy one (webapp/api/forward.py). Plain data and Redis; no torch,
so the web side may import it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from worker.capabilities import records_matching

KEY_PREFIX = "specialist:inference:"
TTL_SECONDS = 10
RENEW_SECONDS = 2


def key(server_id: str) -> str:
    return f"{KEY_PREFIX}{server_id}"


def publish(client: redis.Redis, server_id: str, record: dict[str, Any]) -> None:
    client.set(key(server_id), json.dumps({**record, "id": server_id, "t": round(time.time(), 3)}), ex=TTL_SECONDS)


def withdraw(client: redis.Redis, server_id: str) -> None:
    client.delete(key(server_id))


def live_servers(client: redis.Redis) -> list[dict[str, Any]]:
    """The records of the inference servers that are up (raises redis.RedisError)."""
    return records_matching(client, f"{KEY_PREFIX}*")


def choose(servers: list[dict[str, Any]], folders: list[str]) -> dict[str, Any] | None:
    """The server for a request on `folders` (its adapter, model or base): one that holds the
    first of them it can, else the least busy."""
    if not servers:
        return None
    for folder in folders:
        holding = [s for s in servers if folder in s.get("holds", ())]
        if holding:
            return min(holding, key=lambda s: s.get("in_flight", 0))
    return min(servers, key=lambda s: (s.get("in_flight", 0), s.get("used_mib", 0)))
