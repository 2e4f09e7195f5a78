"""Server-Sent Events: a job's events, live, resumable by sequence number.

The client names the last event it has (the `Last-Event-ID` header on a reconnect, or
`?after=` on the first connection of a page that drew the history itself). Every client of a
job in this process shares one `JobFeed`: a single reader of the job's Redis stream that keeps
the recent events, already formatted, and wakes its clients when more arrive. A client behind
what the feed holds replays from the database first. Sequence numbers are gap-free per job, so
a jump in the stream (Redis restarted, or lost a write) is filled from the database, and while
Redis is away the database is polled: no event is lost or sent twice.

One reader per job, not one per client: 200 people watching one job cost Redis one blocking
read, and each event is serialised once (docs/performance.md, "200 clients"). A user holds at
most SPECIALIST_MAX_STREAMS_PER_USER live streams in a web process; past that, 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse

from webapp.jobs import stream
from webapp.jobs.models import FINAL_STATES, Job, JobEvent
from webapp.jobs.views import _jobs_for_user

log = logging.getLogger(__name__)

BLOCK_MS = 5000
KEEPALIVE_SECONDS = 15
FEED_EVENTS = 2000  # kept per job for clients that fall behind; older ones come from the database
END = "event: end\ndata: {}\n\n"
STREAM_RETRY_SECONDS = 30  # Retry-After of a refused stream; static/job.js waits as long


async def job_events(request: HttpRequest, job_id: int) -> HttpResponse:
    user = await request.auser()
    job = await _jobs_for_user(user).filter(id=job_id).afirst()
    if job is None:
        raise Http404("No such job.")
    release = _take_stream_place(user.id)
    if release is None:
        return _too_many_streams()
    # No client has seen past the job's last event: a larger number (a stale tab of a database
    # that was reset, a hand-made URL) would start the shared feed where nothing ever arrives.
    after = min(_resume_point(request), job.event_seq)
    events = _releasing(follow(job.id, after), release)
    # A response dropped before it streams (the client left while the middleware ran) never
    # starts its generator, so the generator's `finally` never runs: release on collection too.
    weakref.finalize(events, release)
    response = StreamingHttpResponse(events, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


def _resume_point(request: HttpRequest) -> int:
    raw = request.headers.get("Last-Event-ID") or request.GET.get("after") or "0"
    try:
        return max(0, int(raw))
    except ValueError:
        return 0


# Live streams per user in this process. A lock, not the event loop's turn-taking: a place can
# also be given back by the garbage collector (weakref.finalize), on whichever thread it runs.
_open_streams: Counter[int] = Counter()
_open_streams_lock = threading.Lock()


def _take_stream_place(user_id: int) -> Callable[[], None] | None:
    """One of the user's live-stream places and the function that gives it back (safe to call
    again), or None when all of them are taken."""
    with _open_streams_lock:
        if _open_streams[user_id] >= settings.MAX_STREAMS_PER_USER:
            return None
        _open_streams[user_id] += 1
    given_back = False

    def release() -> None:
        nonlocal given_back
        with _open_streams_lock:
            if not given_back:
                given_back = True
                _open_streams[user_id] -= 1
                if not _open_streams[user_id]:
                    del _open_streams[user_id]

    return release


def _too_many_streams() -> HttpResponse:
    response = HttpResponse("Too many live views open; close some tabs.\n", status=429, content_type="text/plain")
    response["Retry-After"] = str(STREAM_RETRY_SECONDS)
    return response


async def _releasing(events: AsyncIterator[str], release: Callable[[], None]) -> AsyncIterator[str]:
    """`events`, giving the stream's place back when they end or the client goes away (the
    server cancels the stream: the cancel lands in `follow` and comes out through here)."""
    try:
        async for text in events:
            yield text
    finally:
        release()


def format_event(event: dict[str, Any]) -> str:
    return f"id: {event['seq']}\ndata: {json.dumps(event)}\n\n"


def is_final(event: dict[str, Any]) -> bool:
    return event["kind"] == "state" and event["state"] in FINAL_STATES


def _entries(events: list[dict[str, Any]]) -> list[tuple[int, str, bool]]:
    """Events as a feed holds them: (seq, SSE text, is final)."""
    return [(event["seq"], format_event(event), is_final(event)) for event in events]


# One client ------------------------------------------------------------------------------------


async def follow(job_id: int, after: int) -> AsyncIterator[str]:
    """The job's events after `after` as SSE text, then `end` once the job is final.

    Events that are ready together go out as one chunk. If the feed fails, the stream ends
    without `end`: the browser reconnects with its Last-Event-ID and gets a new feed.
    """
    last = after
    await _release_database()  # the sign-in and job lookups of the request are done
    async with _subscription(job_id, after) as feed:
        while True:
            arrival = feed.arrival()  # taken before looking, so nothing lands unseen in between
            ready = await feed.after(last)
            if ready:
                chunk = []
                for seq, text, final in ready:
                    chunk.append(text)
                    last = seq
                    if final:
                        yield "".join(chunk) + END
                        return
                yield "".join(chunk)
                continue
            if feed.ended:
                yield END
                return
            if feed.failed:
                return
            try:
                # Not wait_for: before Python 3.12 it can swallow a cancel (the client went
                # away) that lands as the event is set, and the stream would outlive its client.
                async with asyncio.timeout(KEEPALIVE_SECONDS):
                    await arrival.wait()
            except TimeoutError:
                yield ": keepalive\n\n"


_feeds: dict[tuple[asyncio.AbstractEventLoop, int], JobFeed] = {}


@contextlib.asynccontextmanager
async def _subscription(job_id: int, after: int) -> AsyncIterator[JobFeed]:
    """This process's feed of the job (started for the first client, stopped after the last)."""
    key = (asyncio.get_running_loop(), job_id)
    feed = _feeds.get(key)
    if feed is None or feed.failed:
        feed = _feeds[key] = JobFeed(job_id, after)
    feed.clients += 1
    try:
        yield feed
    finally:
        feed.clients -= 1
        if feed.clients == 0:
            if _feeds.get(key) is feed:
                del _feeds[key]
            feed.stop()


# One reader per job ----------------------------------------------------------------------------


class JobFeed:
    """A job's events from `first` on, read once for every client of the job in this process.

    `events[i]` is the event with sequence number `first + i`, as (seq, SSE text, is final):
    gap-free, because the reader fills jumps from the database. The reader stops at the job's
    final state, or when the job is final and the database has nothing after `last`.
    """

    def __init__(self, job_id: int, after: int) -> None:
        self.job_id = job_id
        self.first = after + 1
        self.events: list[tuple[int, str, bool]] = []
        self.clients = 0
        self.ended = False  # every event of the job is in hand
        self.failed = False  # the reader died; its clients end their streams and reconnect
        self.stopped = False  # no client is left; the reader ends after its current read
        self._arrived = asyncio.Event()
        self._reader = asyncio.create_task(self._read(), name=f"sse feed of job {job_id}")

    @property
    def last(self) -> int:
        return self.first + len(self.events) - 1

    def arrival(self) -> asyncio.Event:
        """Set when the feed next changes (new events, the end, a failure)."""
        return self._arrived

    async def after(self, seq: int) -> list[tuple[int, str, bool]]:
        """The events after `seq` that are ready: from the database while `seq` is behind the feed."""
        if seq + 1 < self.first:
            return _entries(await _from_database(self.job_id, seq, self.first))
        return self.events[max(0, seq + 1 - self.first):]

    def _add(self, events: list[dict[str, Any]]) -> None:
        added = _entries(events)
        self.ended = any(final for _, _, final in added)
        self.events += added
        if len(self.events) > FEED_EVENTS:
            dropped = len(self.events) - FEED_EVENTS // 2
            self.first += dropped
            del self.events[:dropped]
        self._notify()

    def _notify(self) -> None:
        self._arrived.set()
        self._arrived = asyncio.Event()

    async def _read(self) -> None:
        client = stream.async_client()
        try:
            while not (self.ended or self.stopped):
                events = await _next_events(client, self.job_id, self.last)
                if events:
                    self._add(events)
                elif await _job_is_final_and_drained(self.job_id, self.last):
                    self.ended = True
                    self._notify()
        except Exception:
            log.exception("the event feed of job %s failed; its clients will reconnect", self.job_id)
            self.failed = True
            self._notify()
        finally:
            await client.aclose()

    def stop(self) -> None:
        """Let the reader end after its current read (at most BLOCK_MS).

        Not Task.cancel: in tests/test_sse_feed.py a cancel of the reader's blocked XREAD came
        back, in most runs, as redis-py's TimeoutError when the block ran out (redis 8.1), and
        the reader read on; the last client's close then waited on it.
        """
        self.stopped = True


# Redis and the database ------------------------------------------------------------------------


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
