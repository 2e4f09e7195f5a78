"""Forwarding a checked request to an inference server, streaming passed through.

The servers register in Redis (worker.inference.registry); a request goes to one that already
holds its adapter or model, else to the least busy. No server, or one that does not answer, is
a 503 in OpenAI's shape, which the official client retries and the playground shows.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import httpx
import redis
from django.conf import settings
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse

from worker.inference import registry

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 600.0  # a long reply streams for minutes; each chunk resets the clock
SERVERS_CACHE_SECONDS = 1.0
_servers: tuple[float, list[dict[str, Any]]] = (0.0, [])


def unavailable(message: str) -> JsonResponse:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": "inference_unavailable"}}
    return JsonResponse(body, status=503, headers={"Retry-After": "5"})


def live_servers() -> list[dict[str, Any]]:
    """The registered servers, read from Redis at most once a second per web process."""
    global _servers
    checked, servers = _servers
    if time.monotonic() - checked > SERVERS_CACHE_SECONDS:
        client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=1, socket_connect_timeout=1)
        servers = registry.live_servers(client)
        _servers = (time.monotonic(), servers)
    return servers


def _headers() -> dict[str, str]:
    token = os.environ.get("SPECIALIST_INFERENCE_TOKEN")
    return {"X-Specialist-Token": token} if token else {}


async def forward(endpoint: str, body: dict[str, Any], target: dict[str, Any]) -> HttpResponse:
    """POST `body` with `target` to `endpoint` of the chosen server; its answer, as is."""
    try:
        servers = live_servers()
    except redis.RedisError:
        return unavailable("The inference server cannot be reached (the registry in Redis is down); try again soon.")
    folders = [target[k] for k in ("adapter", "model") if target.get(k)] or [target["base"]]
    server = registry.choose(servers, folders)
    if server is None:
        return unavailable("No inference server is running. It starts with `make run` (or "
                           "`python -m worker.inference.server`); try again once it is up.")
    payload = {**{k: v for k, v in body.items() if k != "target"}, "target": target}
    client = httpx.AsyncClient(base_url=server["url"], headers=_headers(),
                               timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT))
    try:
        upstream = await client.send(client.build_request("POST", endpoint, json=payload), stream=True)
    except httpx.HTTPError as exc:
        await client.aclose()
        log.warning("inference server %s did not answer: %s", server.get("url"), exc)
        return unavailable(f"The inference server did not answer ({type(exc).__name__}); try again soon.")
    content_type = upstream.headers.get("content-type", "application/json")
    if not content_type.startswith("text/event-stream"):
        try:
            content = await upstream.aread()
        finally:
            await upstream.aclose()
            await client.aclose()
        response = HttpResponse(content, status=upstream.status_code, content_type=content_type)
        if "retry-after" in upstream.headers:
            response["Retry-After"] = upstream.headers["retry-after"]
        return response
    return StreamingHttpResponse(_relay(client, upstream), content_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _relay(client: httpx.AsyncClient, upstream: httpx.Response):
    """The server's events as they come; closing (a client that went away) closes the upstream
    connection, and the server frees the reply's row."""
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    except httpx.HTTPError as exc:
        error = {"error": {"message": f"The inference server stopped answering ({type(exc).__name__}).",
                           "type": "server_error", "param": None, "code": "inference_unavailable"}}
        yield f"data: {json.dumps(error)}\n\n".encode()
    finally:
        await upstream.aclose()
        await client.aclose()
