"""Webhooks for jobs' outcomes: recorded and queued when a job ends, signed as Standard Webhooks say
(checked with the `standardwebhooks` package), tried again with backoff until a 2xx answer, and
the endpoint, its secret and the deliveries on the account page."""

import base64
import json
import time
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone
from standardwebhooks import Webhook

from tests.support.webhook_receiver import free_port, running_receiver
from webapp.api.models_api import api_job_id
from webapp.datasets.models import Dataset
from webapp.jobs.models import Job
from webapp.webhooks import tasks
from webapp.webhooks.models import Delivery, Endpoint, Outcome

pytestmark = pytest.mark.django_db


@pytest.fixture
def job(owner):
    dataset = Dataset.objects.create(owner=owner, name="d", original_name="d.jsonl", format="jsonl")
    return Job.objects.create(owner=owner, dataset=dataset, name="j", spec={"base_model": "x", "method": "lora"})


@pytest.fixture
def queued(monkeypatch):
    """What was put on the queue, instead of the broker: (task, args, queue)."""
    sent = []
    monkeypatch.setattr("webapp.celery.send", lambda task, args, queue: sent.append((task, args, queue)) or True)
    return sent


@pytest.fixture
def receiver():
    with running_receiver() as receiver:
        yield receiver


@pytest.fixture
def endpoint(owner, receiver):
    return Endpoint.objects.create(owner=owner, url=receiver.url)


@pytest.fixture
def fast_retries(settings):
    settings.WEBHOOK_RETRY_SECONDS = [0.2]
    settings.WEBHOOK_TIMEOUT_SECONDS = 0.5


def finish(job, state: str, capture) -> bool:
    if state == "succeeded":
        Job.objects.filter(id=job.id).update(state="exporting")
    with capture(execute=True):
        return job.transition(state, message="the end")


def verified(endpoint: Endpoint, received) -> dict:
    return Webhook(endpoint.secret).verify(received.body, received.headers)


# When a job ends --------------------------------------------------------------------------------
@pytest.mark.parametrize("state", ["succeeded", "failed", "cancelled"])
def test_a_job_reaching_a_final_state_records_its_event_and_queues_it_on_the_cpu_queue(
        job, endpoint, queued, state, django_capture_on_commit_callbacks):
    assert finish(job, state, django_capture_on_commit_callbacks)
    delivery = Delivery.objects.get(job=job)
    body = json.loads(delivery.body)
    assert body == {"id": delivery.event_id, "object": "event", "created_at": body["created_at"],
                    "type": f"fine_tuning.job.{state}", "data": {"id": f"ftjob-{job.id}"}}
    assert body["id"].startswith("evt_") and abs(body["created_at"] - time.time()) < 60
    assert queued == [("webapp.webhooks.deliver", [delivery.id], "cpu")]
    assert delivery.state == "pending" and delivery.queued_at is not None and api_job_id(job) == f"ftjob-{job.id}"


def test_the_event_reaches_the_real_brokers_cpu_queue(job, endpoint, cpu_queue, django_capture_on_commit_callbacks):
    assert finish(job, "failed", django_capture_on_commit_callbacks)
    delivery = Delivery.objects.get(job=job)
    [message] = cpu_queue()
    assert message["task"] == "webapp.webhooks.deliver" and message["argsrepr"] == f"[{delivery.id}]"


def test_a_user_without_a_webhook_gets_no_delivery(job, queued, django_capture_on_commit_callbacks):
    assert finish(job, "failed", django_capture_on_commit_callbacks)
    assert not Delivery.objects.exists() and queued == []


def test_with_the_queue_down_the_job_ends_and_the_periodic_send_queues_its_event_later(
        job, endpoint, monkeypatch, django_capture_on_commit_callbacks):
    monkeypatch.setattr("webapp.celery.send", lambda task, args, queue: False)
    assert finish(job, "cancelled", django_capture_on_commit_callbacks)
    delivery = Delivery.objects.get(job=job)
    assert Job.objects.get(id=job.id).state == "cancelled" and delivery.queued_at is None
    sent = []
    monkeypatch.setattr("webapp.celery.send", lambda task, args, queue: sent.append(args) or True)
    assert Delivery.send_due() == 1 and sent == [[delivery.id]]
    assert Delivery.send_due() == 0


def test_a_webhook_that_cannot_be_recorded_does_not_stop_the_job_ending(
        job, endpoint, monkeypatch, django_capture_on_commit_callbacks):
    def broken(*args, **kwargs):
        raise RuntimeError("the database went away")

    monkeypatch.setattr(Delivery, "for_job", broken)
    assert finish(job, "succeeded", django_capture_on_commit_callbacks)
    assert Job.objects.get(id=job.id).state == "succeeded"


# Sending ---------------------------------------------------------------------------------------
def test_an_event_reaches_a_real_server_signed_as_standard_webhooks_say(job, endpoint, receiver):
    Job.objects.filter(id=job.id).update(state="succeeded")
    job.refresh_from_db()
    delivery = Delivery.for_job(endpoint, job)
    tasks.deliver(delivery.id)
    [received] = receiver.received
    assert verified(endpoint, received)["data"] == {"id": f"ftjob-{job.id}"}
    assert received.headers["webhook-id"] == delivery.event_id
    assert abs(int(received.headers["webhook-timestamp"]) - time.time()) < 60
    assert received.headers["content-type"] == "application/json" and received.body == delivery.body.encode()
    other = Webhook("whsec_" + base64.b64encode(b"x" * 32).decode())
    with pytest.raises(Exception, match="No matching signature"):
        other.verify(received.body, received.headers)
    delivery.refresh_from_db()
    [attempt] = delivery.attempts.all()
    assert delivery.state == "delivered" and delivery.next_attempt_at is None and delivery.attempt_count == 1
    assert attempt.status_code == 200 and attempt.response_body == '{"ok": true}' and attempt.url == receiver.url


def test_a_receiver_answering_500_is_tried_again_after_the_backoff_until_it_answers_2xx(
        endpoint, receiver, fast_retries, queued):
    receiver.status, receiver.answer = 500, b"x" * 5000
    delivery = Delivery.test_event(endpoint)
    tasks.deliver(delivery.id)
    delivery.refresh_from_db()
    assert delivery.state == "pending" and delivery.next_attempt_at > timezone.now()
    assert delivery.attempts.get().response_body == "x" * 1024
    tasks.deliver(delivery.id)  # a duplicate message before the next try is due: nothing is sent
    assert len(receiver.received) == 1 and Delivery.send_due() == 0
    time.sleep(0.25)
    assert Delivery.send_due() == 1 and queued == [("webapp.webhooks.deliver", [delivery.id], "cpu")]
    receiver.status = 204
    tasks.deliver(delivery.id)
    delivery.refresh_from_db()
    assert delivery.state == "delivered" and [a.status_code for a in delivery.attempts.all()] == [500, 204]
    first, second = receiver.received
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == delivery.event_id
    assert verified(endpoint, first) == verified(endpoint, second)


def test_a_receiver_that_is_down_is_tried_again_and_delivered_once_it_is_up(owner, fast_retries):
    port = free_port()
    endpoint = Endpoint.objects.create(owner=owner, url=f"http://127.0.0.1:{port}/hooks")
    delivery = Delivery.test_event(endpoint)
    tasks.deliver(delivery.id)
    delivery.refresh_from_db()
    assert delivery.state == "pending" and "Could not connect" in delivery.attempts.get().error
    time.sleep(0.25)
    with running_receiver(port) as receiver:
        tasks.deliver(delivery.id)
    delivery.refresh_from_db()
    assert delivery.state == "delivered" and len(receiver.received) == 1
    assert [a.status_code for a in delivery.attempts.all()] == [None, 200]


def test_a_slow_receiver_fails_that_try_without_hanging(endpoint, receiver, fast_retries):
    receiver.sleep_seconds = 3
    delivery = Delivery.test_event(endpoint)
    started = time.monotonic()
    tasks.deliver(delivery.id)
    assert time.monotonic() - started < 2
    delivery.refresh_from_db()
    attempt = delivery.attempts.get()
    assert delivery.state == "pending" and attempt.status_code is None and attempt.error == "No answer within 0.5 s."
    assert attempt.duration_ms < 2000


def test_a_redirect_is_not_followed_and_not_a_delivery(endpoint, receiver, fast_retries):
    receiver.status = 302
    delivery = Delivery.test_event(endpoint)
    tasks.deliver(delivery.id)
    delivery.refresh_from_db()
    assert delivery.state == "pending" and delivery.attempts.get().status_code == 302


def test_the_backoff_grows_from_a_minute_and_gives_up_a_day_after_the_event(owner):
    delivery = Delivery.test_event(Endpoint.objects.create(owner=owner, url="https://example.com/hook"))
    gaps = []
    while delivery.state == "pending":
        before = timezone.now()
        delivery.record(Outcome(before, 5, status_code=503))
        if delivery.next_attempt_at:
            gaps.append(round((delivery.next_attempt_at - before).total_seconds()))
            Delivery.objects.filter(id=delivery.id).update(created_at=delivery.created_at - timedelta(seconds=gaps[-1]))
            delivery.created_at -= timedelta(seconds=gaps[-1])
    assert gaps == [60, 300, 1800, 7200, 18000, 36000]
    assert delivery.state == "failed" and Delivery.objects.get(id=delivery.id).attempt_count == 7
    assert Delivery.objects.get(id=delivery.id).attempts.count() == 7


def test_a_delivery_is_tried_by_one_worker_at_a_time(endpoint):
    delivery = Delivery.test_event(endpoint)
    assert Delivery.claim(delivery.id) is not None
    assert Delivery.claim(delivery.id) is None


# The account page ------------------------------------------------------------------------------
def test_the_account_page_sets_a_webhook_and_shows_its_secret_once(owner_client, owner):
    page = owner_client.post("/account/webhook/", {"url": "https://example.com/hooks/specialist"})
    assert page.status_code == 200 and "no-store" in page["Cache-Control"]
    secret = page.context["webhook_secret"]
    assert secret.startswith("whsec_") and len(base64.b64decode(secret.removeprefix("whsec_"))) >= 24
    assert secret in page.content.decode() and Endpoint.objects.get(owner=owner).secret == secret
    again = owner_client.get("/account/").content.decode()
    assert secret not in again and secret[:12] in again and "https://example.com/hooks/specialist" in again
    changed = owner_client.post("/account/webhook/", {"url": "http://127.0.0.1:9999/hook"}, follow=True)
    assert secret not in changed.content.decode() and Endpoint.objects.get(owner=owner).secret == secret
    assert Endpoint.objects.get(owner=owner).url == "http://127.0.0.1:9999/hook"


def test_the_api_key_section_still_works_beside_it(owner_client, owner):
    Endpoint.objects.create(owner=owner, url="https://example.com/hook")
    page = owner_client.post("/account/", {"name": "nightly"})
    assert page.status_code == 200 and page.context["secret"].startswith("sk-spec-")
    assert "Webhook" in page.content.decode()


@pytest.mark.parametrize("url", ["ftp://example.com/hook", "javascript:alert(1)", "file:///etc/passwd", "not a url"])
def test_an_address_that_is_not_http_or_https_gets_a_clear_form_error(owner_client, url):
    page = owner_client.post("/account/webhook/", {"url": url})
    assert page.status_code == 400 and "http:// or https://" in page.context["webhook_form"].errors["url"][0]
    assert "http:// or https://" in page.content.decode() and not Endpoint.objects.exists()


def test_a_new_secret_replaces_the_old_one_and_is_shown_once(owner_client, owner):
    old = Endpoint.objects.create(owner=owner, url="https://example.com/hook").secret
    page = owner_client.post("/account/webhook/secret/")
    new = page.context["webhook_secret"]
    assert new != old and new in page.content.decode() and Endpoint.objects.get(owner=owner).secret == new


def test_the_test_event_button_sends_an_event_whose_answer_the_page_shows(owner_client, endpoint, receiver, queued):
    assert owner_client.post("/account/webhook/test/").status_code == 302
    delivery = Delivery.objects.get(endpoint=endpoint)
    assert queued == [("webapp.webhooks.deliver", [delivery.id], "cpu")] and delivery.event_type == "webhook.test"
    tasks.deliver(delivery.id)
    assert verified(endpoint, receiver.received[0])["type"] == "webhook.test"
    page = owner_client.get("/account/").content.decode()
    assert "webhook.test" in page and "HTTP 200" in page
    detail = owner_client.get(f"/account/webhook/deliveries/{delivery.id}/").content.decode()
    assert delivery.event_id in detail and "{&quot;ok&quot;: true}" in detail


def test_a_given_up_delivery_can_be_tried_once_more(owner_client, endpoint, queued):
    delivery = Delivery.test_event(endpoint)
    Delivery.objects.filter(id=delivery.id).update(state="failed", next_attempt_at=None)
    assert owner_client.post(f"/account/webhook/deliveries/{delivery.id}/retry/").status_code == 302
    assert Delivery.objects.get(id=delivery.id).state == "pending" and queued[-1][1] == [delivery.id]


def test_another_users_deliveries_and_webhook_are_404(other_client, endpoint):
    delivery = Delivery.test_event(endpoint)
    assert other_client.get(f"/account/webhook/deliveries/{delivery.id}/").status_code == 404
    assert other_client.post(f"/account/webhook/deliveries/{delivery.id}/retry/").status_code == 404
    for action in ("secret", "test", "remove"):
        assert other_client.post(f"/account/webhook/{action}/").status_code == 404
    assert "webhook.test" not in other_client.get("/account/").content.decode()
    assert Endpoint.objects.filter(id=endpoint.id).exists()


def test_removing_the_webhook_stops_its_events(owner_client, owner, job, endpoint, queued,
                                                 django_capture_on_commit_callbacks):
    assert owner_client.post("/account/webhook/remove/").status_code == 302
    assert finish(job, "cancelled", django_capture_on_commit_callbacks) and not Delivery.objects.exists()


def test_the_forms_need_a_sign_in_and_a_csrf_token(anon_client, owner):
    reply = anon_client.post("/account/webhook/", {"url": "https://example.com/hook"})
    assert reply.status_code == 302 and reply.url.startswith("/login/")
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(owner)
    assert strict.post("/account/webhook/", {"url": "https://example.com/hook"}).status_code == 403
    assert not Endpoint.objects.exists()
