"""Redis stopped under the real server: sign-in still works (and still limits guessing), a
quality report waits for the queue instead of failing, and is sent once Redis is back."""

from __future__ import annotations

import json

import pytest
import redis
import requests

from tests.support.model_fixtures import write_jsonl
from tests.support.stack import PASSWORD, running_stack

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def down_stack(tmp_path_factory, private_redis):
    with running_stack(tmp_path_factory.mktemp("redis-down"), private_redis.url, workers=()) as stack:
        stack.create_user("carol")
        stack.create_user("dave")
        yield stack


def sign_in(stack, username: str, password: str) -> requests.Response:
    http = requests.Session()
    form = {"username": username, "password": password, "csrfmiddlewaretoken": stack.csrf(http, "/login/")}
    return http.post(f"{stack.base_url}/login/", data=form, allow_redirects=False)


def test_with_redis_down_sign_in_works_and_still_limits_guessing(down_stack, private_redis):
    private_redis.stop()
    try:
        reply = sign_in(down_stack, "carol", PASSWORD)
        assert reply.status_code == 302 and reply.headers["Location"] == "/"
        assert [sign_in(down_stack, "dave", "wrong").status_code for _ in range(5)] == [200] * 5
        assert sign_in(down_stack, "dave", PASSWORD).status_code == 429
        assert "Redis is unreachable" in down_stack.log_tail("web")
    finally:
        private_redis.start()


def test_a_quality_report_asked_for_with_redis_down_waits_and_is_sent_when_it_is_back(
    down_stack, private_redis, tmp_path
):
    http = down_stack.session("carol")
    rows = [{"instruction": f"Question {n}?", "response": f"Answer {n}."} for n in range(10)]
    dataset_id = down_stack.upload_dataset(http, write_jsonl(tmp_path / "quality.jsonl", rows))
    url = f"{down_stack.base_url}/datasets/{dataset_id}/quality/?base_model=smollm2-135m-instruct&max_length=24"
    private_redis.stop()
    try:
        for _ in range(2):  # asked again while it waits: the same answer
            reply = http.get(url)
            assert reply.status_code == 200
            assert reply.json() == {
                "state": "waiting",
                "message": "The queue is unreachable (is Redis running?); the report is computed once it is back.",
            }
    finally:
        private_redis.start()
    down_stack.manage("shell", "-c", "from webapp.datasets.tasks import resend_quality_reports as r; r()")
    (message,) = redis.Redis.from_url(private_redis.url).lrange("cpu", 0, -1)
    message = json.loads(message)
    assert message["headers"]["task"] == "webapp.datasets.quality_report"
    assert message["headers"]["argsrepr"] == f"[{dataset_id}, 'smollm2-135m-instruct', 24]"
    assert http.get(url).json() == {"state": "computing"}
