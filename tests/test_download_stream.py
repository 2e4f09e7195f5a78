"""Downloads stream from disk on the real server: a large artifact costs the web process no
memory while a slow client reads it, and HTTP Range serves exactly the bytes asked for."""

import os
from pathlib import Path

import pytest

from tests.support.stack import running_stack

pytestmark = pytest.mark.slow

LARGE = 1024**3  # sparse: no disk used
MARKER = b"the last sixteen"
MiB = 1024**2


def create_succeeded_job(stack, username: str, artifact: Path) -> int:
    return stack.create_job(username, "succeeded", {"artifact_zip": str(artifact)})


@pytest.fixture(scope="module")
def download_stack(tmp_path_factory, private_redis):
    tmp = tmp_path_factory.mktemp("downloads")
    with running_stack(tmp, private_redis.url, workers=()) as stack:
        stack.create_user("downloader")
        stack.create_user("someone-else")
        yield stack


@pytest.fixture(scope="module")
def http(download_stack):
    return download_stack.session("downloader")


@pytest.fixture(scope="module")
def small(download_stack, tmp_path_factory):
    """A 2.5 MiB artifact of random bytes (more than two of the server's read chunks)."""
    path = tmp_path_factory.mktemp("small") / "specialist-job-adapter.zip"
    path.write_bytes(os.urandom(5 * MiB // 2))
    return path, f"{download_stack.base_url}/jobs/{create_succeeded_job(download_stack, 'downloader', path)}/download/"


@pytest.fixture(scope="module")
def large(download_stack, tmp_path_factory):
    """A 1 GiB sparse artifact whose last 16 bytes are a marker."""
    path = tmp_path_factory.mktemp("large") / "specialist-job-model.zip"
    with path.open("wb") as f:
        f.truncate(LARGE - len(MARKER))
        f.seek(LARGE - len(MARKER))
        f.write(MARKER)
    return path, f"{download_stack.base_url}/jobs/{create_succeeded_job(download_stack, 'downloader', path)}/download/"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_slow_client_of_a_large_download_costs_the_web_server_no_memory(download_stack, http, large):
    _, url = large
    web = download_stack.processes["web"].pid
    assert http.get(url, headers={"Range": "bytes=0-0"}).status_code == 206  # the code path is loaded
    before = rss_bytes(web)
    peak = before
    with http.get(url, stream=True) as reply:
        assert reply.status_code == 200 and reply.headers["Content-Length"] == str(LARGE)
        for _ in range(16):
            assert len(reply.raw.read(64 * 1024)) == 64 * 1024
            peak = max(peak, rss_bytes(web))
    assert peak - before < 64 * MiB, f"the web server grew by {(peak - before) // MiB} MiB mid-download"


def test_a_range_at_the_end_of_a_large_download_is_served_without_reading_the_rest(http, large):
    _, url = large
    reply = http.get(url, headers={"Range": "bytes=-16"})
    assert reply.status_code == 206 and reply.content == MARKER
    assert reply.headers["Content-Range"] == f"bytes {LARGE - 16}-{LARGE - 1}/{LARGE}"


def test_the_whole_file_comes_as_an_attachment_that_accepts_ranges(http, small):
    path, url = small
    reply = http.get(url)
    assert reply.status_code == 200 and reply.content == path.read_bytes()
    assert reply.headers["Content-Length"] == str(path.stat().st_size)
    assert reply.headers["Content-Disposition"] == 'attachment; filename="specialist-job-adapter.zip"'
    assert reply.headers["Accept-Ranges"] == "bytes"
    assert reply.headers["Content-Type"] == "application/zip"


@pytest.mark.parametrize("header, first, last", [
    ("bytes=100-199", 100, 199),
    ("bytes=1048000-2097999", 1048000, 2097999),  # across the server's read chunks
    ("bytes=2000000-", 2000000, 5 * MiB // 2 - 1),
    ("bytes=2000000-99999999", 2000000, 5 * MiB // 2 - 1),  # the end clipped to the file
    ("bytes=-5", 5 * MiB // 2 - 5, 5 * MiB // 2 - 1),
    ("bytes=-99999999", 0, 5 * MiB // 2 - 1),  # a suffix longer than the file: all of it
    ("bytes=0-0", 0, 0),
])
def test_a_single_range_gets_exactly_its_bytes(http, small, header, first, last):
    path, url = small
    size = path.stat().st_size
    reply = http.get(url, headers={"Range": header})
    assert reply.status_code == 206
    assert reply.content == path.read_bytes()[first:last + 1]
    assert reply.headers["Content-Range"] == f"bytes {first}-{last}/{size}"
    assert reply.headers["Content-Length"] == str(last - first + 1)
    assert reply.headers["Content-Disposition"].startswith("attachment")


@pytest.mark.parametrize("header", ["bytes=2621440-", "bytes=9999999-10000000", "bytes=-0"])
def test_a_range_past_the_end_is_refused_with_the_size(http, small, header):
    path, url = small
    reply = http.get(url, headers={"Range": header})
    assert reply.status_code == 416
    assert reply.headers["Content-Range"] == f"bytes */{path.stat().st_size}"


@pytest.mark.parametrize("header", ["bytes=abc", "bytes=5-1", "items=0-10", "bytes=0-1,5-6", "bytes=", "bytes=--1"])
def test_a_malformed_or_multiple_range_gets_the_whole_file(http, small, header):
    path, url = small
    reply = http.get(url, headers={"Range": header})
    assert reply.status_code == 200 and reply.content == path.read_bytes()
    assert "Content-Range" not in reply.headers


def test_another_user_cannot_download_it(download_stack, small):
    _, url = small
    assert download_stack.session("someone-else").get(url, headers={"Range": "bytes=0-10"}).status_code == 404


def test_a_job_whose_artifact_is_gone_answers_404(download_stack, http, tmp_path):
    job_id = create_succeeded_job(download_stack, "downloader", tmp_path / "deleted.zip")
    assert http.get(f"{download_stack.base_url}/jobs/{job_id}/download/").status_code == 404


def test_a_client_that_leaves_mid_download_leaves_no_error_behind(download_stack, http, large, small):
    with http.get(large[1], stream=True) as reply:
        reply.raw.read(64 * 1024)
    path, url = small
    assert http.get(url).content == path.read_bytes()
    assert "Traceback" not in download_stack.log_tail("web", lines=400)
