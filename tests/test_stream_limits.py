"""Live streams are limited per user and web process: past the limit a stream is refused with
429, a closed one frees its place, and the job page says why its chart stopped and retries
slowly. The real server (uvicorn) with a limit of 3."""

import gc
import time

import pytest
import requests
from asgiref.sync import async_to_sync
from django.test import AsyncClient, AsyncRequestFactory

from tests.support.stack import PASSWORD, running_stack
from webapp.datasets.models import Dataset
from webapp.jobs import sse
from webapp.jobs.models import Job

LIMIT = 3


def create_queued_job(stack, username: str) -> int:
    """A job that stays queued (no worker): its stream stays open until the client leaves."""
    return stack.create_job(username)


@pytest.fixture(scope="module")
def limited_stack(tmp_path_factory, private_redis):
    # A Redis of its own: its streams' readers stay open while the module's other tests run.
    tmp = tmp_path_factory.mktemp("streams")
    with running_stack(tmp, private_redis.url, workers=(), SPECIALIST_MAX_STREAMS_PER_USER=str(LIMIT)) as stack:
        for name in ("viewer", "another-viewer", "browser-viewer"):
            stack.create_user(name)
        yield stack


def events_url(stack, username: str) -> str:
    return f"{stack.base_url}/jobs/{create_queued_job(stack, username)}/events/"


def open_stream(http: requests.Session, url: str) -> requests.Response:
    return http.get(url, stream=True, timeout=30, headers={"Accept": "text/event-stream"})


def wait_for_a_stream(http: requests.Session, url: str) -> requests.Response:
    """The server frees a place when it notices the client left: until then, 429."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        reply = open_stream(http, url)
        if reply.status_code == 200:
            return reply
        reply.close()
        time.sleep(0.2)
    raise AssertionError("no place was freed")


@pytest.mark.slow
def test_a_user_past_the_limit_is_refused_until_a_stream_closes(limited_stack):
    http, other = limited_stack.session("viewer"), limited_stack.session("another-viewer")
    first_job, second_job = events_url(limited_stack, "viewer"), events_url(limited_stack, "viewer")
    streams = [open_stream(http, url) for url in (first_job, first_job, second_job)]  # all jobs count
    assert [s.status_code for s in streams] == [200] * LIMIT

    refused = open_stream(http, second_job)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == str(sse.STREAM_RETRY_SECONDS)
    assert refused.headers["Content-Type"].startswith("text/plain") and "close some tabs" in refused.text
    another = open_stream(other, events_url(limited_stack, "another-viewer"))
    assert another.status_code == 200  # the limit is the user's, not the server's

    streams.pop().close()
    streams.append(wait_for_a_stream(http, second_job))
    assert open_stream(http, first_job).status_code == 429  # the freed place was taken again
    for stream in [*streams, another]:
        stream.close()
    assert "Traceback" not in limited_stack.log_tail("web", lines=400)


@pytest.mark.slow
def test_the_job_page_says_why_its_stream_stopped_and_retries_slowly(limited_stack):
    playwright = pytest.importorskip("playwright.sync_api")
    from tests.test_browser import CHROMIUM, FLAGS

    http = limited_stack.session("browser-viewer")
    url = events_url(limited_stack, "browser-viewer")
    streams = [open_stream(http, url) for _ in range(LIMIT)]
    job_page = url.removesuffix("events/")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.set_default_timeout(20_000)
        page.clock.install()
        page.goto(f"{limited_stack.base_url}/login/")
        page.fill("input[name=username]", "browser-viewer")
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(f"{limited_stack.base_url}/")
        tries = []
        page.on("request", lambda request: tries.append(request.url) if "/events/" in request.url else None)
        page.goto(job_page)
        page.wait_for_selector("#stream-note:not(.hidden)")
        assert "close some tabs" in page.inner_text("#stream-note")
        assert len(tries) == 1  # the browser itself does not retry a refused stream

        streams.pop().close()
        statuses = []  # one try per retry interval: refused until the server notices the close
        while len(statuses) < 20 and statuses[-1:] != [200]:
            with page.expect_response(lambda response: "/events/" in response.url) as retry:
                page.clock.run_for(sse.STREAM_RETRY_SECONDS * 1000)
            statuses.append(retry.value.status)
        assert statuses[-1] == 200 and len(tries) == 1 + len(statuses)
        page.wait_for_selector("#stream-note.hidden", state="attached")
        browser.close()
    for stream in streams:
        stream.close()


@pytest.mark.django_db
def test_a_stream_dropped_before_it_starts_gives_its_place_back(owner):
    dataset = Dataset.objects.create(owner=owner, name="d", original_name="d.jsonl", format="jsonl")
    job = Job.objects.create(owner=owner, dataset=dataset, name="j", spec={"base_model": "x", "method": "lora"})

    async def respond_and_drop() -> int:
        request = AsyncRequestFactory().get(f"/jobs/{job.id}/events/")

        async def auser():
            return owner

        request.auser = auser
        response = await sse.job_events(request, job.id)  # as when the client leaves during middleware
        taken = sse._open_streams[owner.id]
        del response
        gc.collect()
        return taken

    assert async_to_sync(respond_and_drop)() == 1
    assert sse._open_streams[owner.id] == 0


@pytest.mark.django_db(transaction=True)
def test_a_stream_that_ends_gives_its_place_back(owner):
    dataset = Dataset.objects.create(owner=owner, name="d", original_name="d.jsonl", format="jsonl")
    job = Job.objects.create(owner=owner, dataset=dataset, name="j", spec={"base_model": "x", "method": "lora"})
    job.transition("cancelled", message="Cancelled by the user.")

    async def read_to_the_end() -> str:
        http = AsyncClient()
        await http.aforce_login(owner)
        response = await http.get(f"/jobs/{job.id}/events/")
        return b"".join([chunk async for chunk in response.streaming_content]).decode()

    assert async_to_sync(read_to_the_end)().endswith(sse.END)
    assert sse._open_streams[owner.id] == 0
