"""A file above the inline-read size is read by the real "cpu" Celery worker, never in the
request; its page says so and updates itself (a real browser) until the dataset is ready."""

from __future__ import annotations

import json
import time

import pytest

from tests.support.stack import running_stack
from tests.test_browser import browser, signed_in_page  # noqa: F401 (browser is a fixture)

pytestmark = pytest.mark.slow

INLINE_LIMIT = 4096


@pytest.fixture(scope="module")
def parse_stack(tmp_path_factory, private_redis):
    """The web server with no worker at first, reading inline only up to INLINE_LIMIT bytes."""
    with running_stack(
        tmp_path_factory.mktemp("parse"), private_redis.url, workers=(), SPECIALIST_INLINE_PARSE_BYTES=str(INLINE_LIMIT)
    ) as stack:
        stack.create_user("dana")
        yield stack


def write_rows(path, count: int, bad_lines: tuple[int, ...] = ()):
    lines = [
        '{"instruction": "cut short' if number in bad_lines else json.dumps({"instruction": f"say {number}",
                                                                              "response": f"{number}"})
        for number in range(1, count + 1)
    ]
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size > INLINE_LIMIT
    return path


def status(stack, http, dataset_id: int) -> dict:
    return http.get(f"{stack.base_url}/datasets/{dataset_id}/status/").json()


def wait_until_read(stack, http, dataset_id: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while (reply := status(stack, http, dataset_id))["busy"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not reply["busy"], stack.all_logs()
    return reply


def test_a_large_upload_is_read_by_the_cpu_worker_and_its_page_updates_until_ready(parse_stack, browser, tmp_path):  # noqa: F811
    page = signed_in_page(parse_stack, browser, "erin")
    http = parse_stack.session("erin")
    dataset_id = parse_stack.upload_dataset(http, write_rows(tmp_path / "big.jsonl", 400))
    assert status(parse_stack, http, dataset_id) == {"status": "uploaded", "label": "waiting to be read", "busy": True}
    page.goto(f"{parse_stack.base_url}/datasets/{dataset_id}/")
    assert page.text_content("#dataset-status") == "waiting to be read"
    assert "Waiting for a CPU worker" in page.text_content("#busy")

    parse_stack.start_cpu_worker()
    page.wait_for_function("() => document.getElementById('dataset-status').textContent === 'ready'", timeout=120_000)
    assert "400 usable" in page.text_content("#row-count")
    assert "webapp.datasets.parse_dataset" in parse_stack.log_tail("cpu", 200)
    assert f'<option value="{dataset_id}"' in http.get(f"{parse_stack.base_url}/jobs/new/").text


def test_a_large_upload_with_bad_rows_waits_for_review_with_their_lines(parse_stack, tmp_path):
    if "cpu" not in parse_stack.processes:
        parse_stack.start_cpu_worker()
    http = parse_stack.session("dana")
    dataset_id = parse_stack.upload_dataset(http, write_rows(tmp_path / "mixed.jsonl", 300, bad_lines=(7, 250)))
    assert wait_until_read(parse_stack, http, dataset_id)["status"] == "review"
    page = http.get(f"{parse_stack.base_url}/datasets/{dataset_id}/").text
    assert "Train on the 298 usable rows (2 dropped)" in page
    assert "<td>7</td><td>—</td>" in page and "<td>250</td><td>—</td>" in page


def test_a_new_mapping_for_a_large_file_is_read_in_the_background_too(parse_stack, tmp_path):
    if "cpu" not in parse_stack.processes:
        parse_stack.start_cpu_worker()
    http = parse_stack.session("dana")
    path = tmp_path / "odd.csv"
    path.write_text("prompt_text,reply\n" + "".join(f"question {i},answer {i}\n" for i in range(400)))
    dataset_id = parse_stack.upload_dataset(http, path)
    reply = wait_until_read(parse_stack, http, dataset_id)
    assert reply["status"] == "rejected"
    page = http.get(f"{parse_stack.base_url}/datasets/{dataset_id}/").text
    assert "Missing the required column for &#x27;instruction&#x27;" in page
    url = f"{parse_stack.base_url}/datasets/{dataset_id}/mapping/"
    token = parse_stack.csrf(http, f"/datasets/{dataset_id}/")
    http.post(url, data={"csrfmiddlewaretoken": token, "instruction": "prompt_text", "response": "reply"},
              headers={"Referer": url})
    assert wait_until_read(parse_stack, http, dataset_id)["status"] == "ready"
    assert "400 usable" in http.get(f"{parse_stack.base_url}/datasets/{dataset_id}/").text
