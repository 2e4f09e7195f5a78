"""Server-Sent Events: a job's events, live, resumable by sequence number.

The client names the last event it has (the `Last-Event-ID` header on a reconnect, or
`?after=` on the first connection of a page that drew the history itself). We replay from
the database, then follow the Redis stream. Sequence numbers are gap-free per job, so a
jump in the stream (Redis restarted, or lost a write) is filled from the database, and
while Redis is away the database is polled: no event is lost or sent twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import redis
from asgiref.sync import sync_to_async
from django.db import connection
from django.http import Http404, HttpRequest, StreamingHttpResponse

from webapp.jobs import stream
from webapp.jobs.models import FINAL_STATES, Job, JobEvent
from webapp.jobs.views import _jobs_for_user

log = logging.getLogger(__name__)

BLOCK_MS = 5000
KEEPALIVE_SECONDS = 15


async def job_events(request: HttpRequest, job_id: int) -> StreamingHttpResponse:
    user = await request.auser()
    job = await _jobs_for_user(user).filter(id=job_id).afirst()
    if job is None:
        raise Http404("No such job.")
    after = _resume_point(request)
    response = StreamingHttpResponse(follow(job.id, after), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


def _resume_point(request: HttpRequest) -> int:
    raw = request.headers.get("Last-Event-ID") or request.GET.get("after") or "0"
    try:
        return max(0, int(raw))
    except ValueError:
        return 0


def format_event(event: dict[str, Any]) -> str:
    return f"id: {event['seq']}\ndata: {json.dumps(event)}\n\n"


@sync_to_async
def _release_database() -> None:
    """Close this request's database connection until the stream needs it again.

    A stream lives as long as its job, and Django keeps a request's connection open until the
    response ends: 200 followers would hold 200 connections (PostgreSQL allows 100 by default).
    The stream reads the database only to replay, fill a gap or poll while Redis is quiet.
    """
    connection.close()


async def _from_database(job_id: int, after: int, before: int | None = None) -> list[dict[str, Any]]:
    rows = JobEvent.objects.filter(job_id=job_id, seq__gt=after)
    if before is not None:
        rows = rows.filter(seq__lt=before)
    try:
        return [row.payload async for row in rows.order_by("seq")]
    finally:
        await _release_database()


async def follow(job_id: int, after: int) -> AsyncIterator[str]:
    last = after
    client = stream.async_client()
    idle = 0.0
    await _release_database()  # the sign-in and job lookups of the request are done
    try:
        while True:
            events = await _next_events(client, job_id, last)
            for event in events:
                yield format_event(event)
                last = event["seq"]
                if event["kind"] == "state" and event["state"] in FINAL_STATES:
                    yield "event: end\ndata: {}\n\n"
                    return
            if events:
                idle = 0.0
                continue
            idle += BLOCK_MS / 1000
            if idle >= KEEPALIVE_SECONDS:
                idle = 0.0
                yield ": keepalive\n\n"
            if await _job_is_final_and_drained(job_id, last):
                yield "event: end\ndata: {}\n\n"
                return
    finally:
        await client.aclose()


async def _next_events(client, job_id: int, last: int) -> list[dict[str, Any]]:
    """The events after `last`, in order and without gaps; empty after a quiet wait."""
    try:
        reply = await client.xread({stream.key(job_id): f"0-{last}"}, block=BLOCK_MS, count=500)
    except redis.RedisError:
        await asyncio.sleep(1)
        return await _from_database(job_id, last)
    if not reply:
        # Quiet, or the stream is gone (Redis restarted): the database has the last word.
        return await _from_database(job_id, last)
    events: list[dict[str, Any]] = []
    for entry_id, fields in reply[0][1]:
        seq = int(entry_id.decode().split("-")[1])
        if seq > last + 1:
            events += await _from_database(job_id, last, before=seq)
        events.append(json.loads(fields[b"data"]))
        last = seq
    return events


async def _job_is_final_and_drained(job_id: int, last: int) -> bool:
    try:
        job = await Job.objects.filter(id=job_id).only("state", "event_seq").afirst()
    finally:
        await _release_database()
    return job is None or (job.state in FINAL_STATES and job.event_seq <= last)
