"""The live stream's fan-out: every client of a job in a process shares one Redis reader.

Real Redis and the real database; the SSE generators run on one event loop, as in the web
server, and the events are written with `Job.append_events`, as the worker writes them.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from django.test import AsyncClient

from webapp.datasets.models import Dataset
from webapp.jobs import sse, stream
from webapp.jobs.models import Job

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def job(owner):
    dataset = Dataset.objects.create(owner=owner, name="d", original_name="d.jsonl", format="jsonl")
    job = Job.objects.create(owner=owner, dataset=dataset, name="j", spec={"base_model": "x", "method": "lora"})
    redis.Redis.from_url(settings.REDIS_URL).delete(stream.key(job.id))
    return job


def blocked_readers() -> int:
    """Connections of the tests' Redis database waiting in XREAD."""
    db = redis.Redis.from_url(settings.REDIS_URL).connection_pool.connection_kwargs.get("db", 0)
    return sum(c["cmd"] == "xread" and int(c["db"]) == db for c in redis.Redis.from_url(settings.REDIS_URL).client_list())


async def read(job_id: int, after: int = 0) -> tuple[list[int], bool]:
    """The sequence numbers a client following the job receives, and whether it got `end`."""
    text = "".join([chunk async for chunk in sse.follow(job_id, after)])
    seqs = [json.loads(line[5:])["seq"] for line in text.splitlines() if line.startswith("data:") and line != "data: {}"]
    return seqs, text.endswith(sse.END)


async def until(condition, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


def feed_of(job_id: int) -> sse.JobFeed | None:
    return next((feed for (_, jid), feed in sse._feeds.items() if jid == job_id), None)


@sync_to_async
def write(method, *args, **kwargs):
    """A write as the worker makes it, off the event loop (its connection closed after)."""
    try:
        return method(*args, **kwargs)
    finally:
        connection.close()


async def steps(job: Job, first: int, last: int) -> None:
    for step in range(first, last + 1):
        await write(job.append_events, [{"kind": "metric", "step": step, "loss": 1.0 / step}])


def test_two_hundred_clients_get_every_event_once_from_one_redis_reader(job):
    async def scenario():
        clients = [asyncio.create_task(read(job.id)) for _ in range(200)]
        await until(lambda: feed_of(job.id) is not None and feed_of(job.id).clients == 200)
        await steps(job, 1, 20)
        await until(lambda: feed_of(job.id).last == 20)
        readers = blocked_readers()
        await write(job.transition, "cancelled")
        return readers, await asyncio.gather(*clients)

    readers, received = asyncio.run(scenario())
    history = [event["seq"] for event in Job.objects.get(id=job.id).history()]
    assert history == list(range(1, 22))
    assert readers == 1
    assert all(result == (history, True) for result in received)
    assert sse._feeds == {}


def test_a_client_behind_the_feed_replays_from_the_database_without_gaps(job, monkeypatch):
    monkeypatch.setattr(sse, "FEED_EVENTS", 6)  # the feed keeps 3 to 6 events

    async def scenario():
        early = asyncio.create_task(read(job.id))
        await until(lambda: feed_of(job.id) is not None)
        await steps(job, 1, 12)
        await until(lambda: feed_of(job.id).last == 12)
        assert feed_of(job.id).first > 6
        late = [asyncio.create_task(read(job.id, after)) for after in (0, 5, 12)]
        await until(lambda: feed_of(job.id).clients == 4)
        await steps(job, 13, 14)
        await write(job.transition, "failed", message="stopped by the test")
        return await asyncio.gather(early, *late)

    early, from_start, from_five, from_twelve = asyncio.run(scenario())
    assert early == from_start == (list(range(1, 16)), True)
    assert from_five == (list(range(6, 16)), True)
    assert from_twelve == ([13, 14, 15], True)


def test_events_missing_from_redis_are_filled_from_the_database(job, monkeypatch):
    publish = stream.publish
    monkeypatch.setattr(stream, "publish", lambda job_id, events: publish(job_id, [e for e in events if e["seq"] not in (3, 4)]))

    async def scenario():
        client = asyncio.create_task(read(job.id))
        await until(lambda: feed_of(job.id) is not None)
        await steps(job, 1, 6)
        await write(job.transition, "cancelled")
        return await client

    assert asyncio.run(scenario()) == (list(range(1, 8)), True)


def test_the_reader_stops_with_its_last_client(job, monkeypatch):
    monkeypatch.setattr(sse, "BLOCK_MS", 300)  # it stops after its current read

    async def scenario():
        clients = [asyncio.create_task(read(job.id)) for _ in range(3)]
        await until(lambda: feed_of(job.id) is not None and feed_of(job.id).clients == 3)
        await steps(job, 1, 2)
        await until(blocked_readers)
        for client in clients:  # the browsers go away mid-job
            client.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        await until(lambda: not blocked_readers())

    asyncio.run(scenario())
    assert sse._feeds == {}


def test_a_failed_feed_ends_its_streams_for_a_reconnect(job, monkeypatch):
    next_events = sse._next_events

    async def broken(*args):
        raise RuntimeError("the database went away")

    monkeypatch.setattr(sse, "_next_events", broken)

    async def scenario():
        dropped = await read(job.id)
        monkeypatch.setattr(sse, "_next_events", next_events)
        reconnected = asyncio.create_task(read(job.id, after=dropped[0][-1] if dropped[0] else 0))
        await until(lambda: feed_of(job.id) is not None)
        await steps(job, 1, 2)
        await write(job.transition, "cancelled")
        return dropped, await reconnected

    dropped, reconnected = asyncio.run(scenario())
    assert dropped == ([], False)  # no `end`: the browser's EventSource reconnects by itself
    assert reconnected == ([1, 2, 3], True)



def test_a_resume_point_past_the_last_event_does_not_stall_the_job_s_other_clients(job, owner):
    async def until_event_3(content) -> str:
        text = ""
        async for chunk in content:
            text += chunk.decode() if isinstance(chunk, bytes) else chunk
            if "id: 3\n" in text:
                return text

    async def scenario():
        http = AsyncClient()
        await http.aforce_login(owner)
        await steps(job, 1, 2)
        ahead = await http.get(f"/jobs/{job.id}/events/", query_params={"after": 999})
        behind = await http.get(f"/jobs/{job.id}/events/", headers={"Last-Event-ID": "1"})
        readers = [asyncio.create_task(until_event_3(r.streaming_content)) for r in (ahead, behind)]
        await until(lambda: feed_of(job.id) is not None and feed_of(job.id).clients == 2)
        await steps(job, 3, 3)
        async with asyncio.timeout(3):  # well before a keepalive (15 s) would poll the database
            texts = await asyncio.gather(*readers)
        for response in (ahead, behind):
            await response.streaming_content.aclose()
        return texts

    ahead, behind = asyncio.run(scenario())
    assert [line for line in ahead.splitlines() if line.startswith("id:")] == ["id: 3"]
    assert [line for line in behind.splitlines() if line.startswith("id:")] == ["id: 2", "id: 3"]
