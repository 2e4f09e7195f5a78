"""The serving API's web side, without an inference server: what it refuses before forwarding
(JSON, model, owner, state, kind, CSRF, the per-minute limit) and the 503 when no inference
server runs or the one registered does not answer. And the request checks the server applies."""

import json

import pytest
import redis
from django.conf import settings
from django.test import Client, override_settings

from webapp.accounts.models import ApiKey
from webapp.api import forward
from webapp.jobs.management.commands.serve import free_port
from worker.inference import registry
from worker.inference import requests as checks

from .test_api_keys import make_job

pytestmark = pytest.mark.django_db
CHAT = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(autouse=True)
def no_servers():
    client = redis.Redis.from_url(settings.REDIS_URL)
    for key in client.scan_iter(match=f"{registry.KEY_PREFIX}*"):
        client.delete(key)
    for key in client.scan_iter(match="specialist:api-rate:*"):
        client.delete(key)
    forward._servers = (0.0, [])
    yield client
    forward._servers = (0.0, [])


@pytest.fixture
def key_client(owner):
    _, secret = ApiKey.issue(owner, "script")
    return Client(HTTP_AUTHORIZATION=f"Bearer {secret}")


def post(client, path, body):
    return client.post(path, data=json.dumps(body) if not isinstance(body, str) else body,
                       content_type="application/json")


def test_no_inference_server_is_a_503_that_says_so(key_client):
    reply = post(key_client, "/v1/chat/completions", CHAT)
    assert reply.status_code == 503 and reply["Retry-After"]
    assert "No inference server is running" in reply.json()["error"]["message"]


def test_a_registered_server_that_does_not_answer_is_a_503(key_client, no_servers):
    registry.publish(no_servers, "gone", {"url": f"http://127.0.0.1:{free_port()}", "holds": [], "in_flight": 0})
    reply = post(key_client, "/v1/embeddings", {"model": "all-minilm-l6-v2", "input": "x"})
    assert reply.status_code == 503 and "did not answer" in reply.json()["error"]["message"]


def test_what_is_refused_before_forwarding(key_client, owner, other_user):
    assert post(key_client, "/v1/chat/completions", "{oops").status_code == 400
    assert post(key_client, "/v1/chat/completions", [1, 2]).json()["error"]["message"].startswith("The request body")
    missing = post(key_client, "/v1/chat/completions", {"messages": []})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"
    theirs = make_job(other_user)
    reply = post(key_client, "/v1/chat/completions", {**CHAT, "model": f"ft:smollm2-135m-instruct:{other_user.username}:{theirs.id}"})
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"
    running = make_job(owner, state="running")
    reply = post(key_client, "/v1/chat/completions", {**CHAT, "model": f"ft:smollm2-135m-instruct:{owner.username}:{running.id}"})
    assert reply.status_code == 400 and "running" in reply.json()["error"]["message"]
    reply = post(key_client, "/v1/classify", {"model": "smollm2-135m-instruct", "input": "x"})
    assert reply.status_code == 400 and "chat model" in reply.json()["error"]["message"]
    assert post(Client(), "/v1/chat/completions", CHAT).status_code == 401
    assert Client().get("/v1/chat/completions").status_code == 405


def test_a_session_call_needs_the_csrf_token(owner):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(owner)
    reply = post(browser, "/v1/chat/completions", CHAT)
    assert reply.status_code == 403 and reply.json()["error"]["code"] == "csrf_failed"
    job = make_job(owner)
    assert post(browser, f"/jobs/{job.id}/try/tuned/", {"messages": CHAT["messages"]}).status_code == 403
    browser.get(f"/jobs/{job.id}/")
    token = browser.cookies["csrftoken"].value
    reply = browser.post(f"/jobs/{job.id}/try/tuned/", data=json.dumps({"messages": CHAT["messages"]}),
                         content_type="application/json", HTTP_X_CSRFTOKEN=token)
    assert reply.status_code in (503, 400)  # past the checks: no server, or the job's files are missing


def test_the_playground_is_only_for_the_owners_jobs(owner_client, other_user):
    theirs = make_job(other_user)
    assert post(owner_client, f"/jobs/{theirs.id}/try/tuned/", {"messages": CHAT["messages"]}).status_code == 404
    assert post(owner_client, "/jobs/999999/try/base/", {}).status_code == 404


@override_settings(API_REQUESTS_PER_MINUTE=2)
def test_over_the_per_minute_limit_is_a_429_with_retry_after(key_client, owner):
    assert [post(key_client, "/v1/chat/completions", CHAT).status_code for _ in range(2)] == [503, 503]
    reply = post(key_client, "/v1/chat/completions", CHAT)
    assert reply.status_code == 429 and 1 <= int(reply["Retry-After"]) <= 60
    assert reply.json()["error"]["type"] == "rate_limit_error"
    _, another = ApiKey.issue(owner, "second key")  # the limit is per key
    assert post(Client(HTTP_AUTHORIZATION=f"Bearer {another}"), "/v1/chat/completions", CHAT).status_code == 503


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "  "}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": True}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools[0].function.name"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": "all"}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}, {"role": "tool", "content": "1"}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]}, "functions"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "messages[1].role"),
])
def test_a_bad_chat_parameter_is_named(body, param):
    with pytest.raises(checks.BadRequest) as refused:
        checks.chat_request(body)
    assert refused.value.param == param and refused.value.status == 400


def test_good_requests_are_read_as_openai_documents_them():
    chat = checks.chat_request({"messages": [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                                             {"role": "user", "content": "hi"}],
                                "max_completion_tokens": 5, "max_tokens": 9, "stop": "\n", "stream": True,
                                "stream_options": {"include_usage": True}, "seed": 3})
    assert chat.messages[0] == {"role": "system", "content": "Be brief."}
    assert (chat.max_tokens, chat.max_tokens_param, chat.stop, chat.include_usage, chat.temperature) == (
        5, "max_completion_tokens", ("\n",), True, 1.0)
    assert checks.embeddings_request({"input": "x"}).texts == ["x"]
    with pytest.raises(checks.BadRequest) as refused:
        checks.embeddings_request({"input": [[1, 2, 3]]})
    assert refused.value.param == "input[0]" and "token ids" in refused.value.message
    rerank = checks.rerank_request({"query": "q", "documents": ["a", {"text": "b"}], "top_n": 1})
    assert rerank.documents == ["a", "b"] and rerank.top_n == 1
    assert checks.classify_request({"input": [["a", "b"], {"text": "c", "text_pair": "d"}]}).inputs == [
        ("a", "b"), ("c", "d")]
    assert checks.classify_request({"input": ["a", "b"]}).inputs == ["a", "b"]
