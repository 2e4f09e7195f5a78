"""Webhooks: a user's endpoint, and the deliveries of their jobs' outcomes to it.

Events and signatures follow Standard Webhooks (what OpenAI's fine-tuning webhooks use): the body
is `{"id": "evt_…", "object": "event", "created_at": …, "type": …, "data": {"id": "ftjob-…"}}`,
signed with HMAC-SHA256 over "{webhook-id}.{webhook-timestamp}.{body}" keyed with the secret's
base64-decoded part after "whsec_". A delivery is a row before it is queued (the task carries only
its id); each try is an Attempt. A 2xx answer delivers it; anything else is tried again with the
backoff of WEBHOOK_RETRY_SECONDS until WEBHOOK_GIVE_UP_SECONDS after the event.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.core.validators import URLValidator
from django.db import models
from django.db.models import F, Q
from django.utils import timezone

from webapp.api.models_api import api_job_id

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
SHOWN_CHARS = 12
"""How much of a secret the account page shows once it has been made ("whsec_AbCdEf…")."""
EVENT_TYPES = {"succeeded": "fine_tuning.job.succeeded", "failed": "fine_tuning.job.failed",
               "cancelled": "fine_tuning.job.cancelled"}
TEST_EVENT_TYPE = "webhook.test"
RECENT_DELIVERIES = 20
"""How many of the last deliveries the account page lists."""
SCHEMES = ["http", "https"]


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def signature(secret: str, event_id: str, timestamp: int, body: str) -> str:
    """The `webhook-signature` header's value (Standard Webhooks, version 1)."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    digest = hmac.new(key, f"{event_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class Endpoint(models.Model):
    """Where a user's events go (one per user), and the secret that signs them."""

    owner = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="webhook")
    url = models.URLField(max_length=2000, validators=[URLValidator(schemes=SCHEMES)])
    secret = models.CharField(max_length=100, default=new_secret)
    created_at = models.DateTimeField(auto_now_add=True)

    def regenerate_secret(self) -> str:
        self.secret = new_secret()
        self.save(update_fields=["secret"])
        return self.secret

    @property
    def secret_hint(self) -> str:
        return self.secret[:SHOWN_CHARS]

    def recent_deliveries(self):
        return self.deliveries.select_related("job").prefetch_related("attempts")[:RECENT_DELIVERIES]


@dataclass
class Outcome:
    """What one try at a delivery got: the answer's status and first bytes, or why there was none."""

    started_at: datetime
    duration_ms: int
    status_code: int | None = None
    response_body: str = ""
    error: str = ""

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class Delivery(models.Model):
    PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
    STATES = [(PENDING, "pending"), (DELIVERED, "delivered"), (FAILED, "failed")]

    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="deliveries")
    job = models.ForeignKey("jobs.Job", on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    event_id = models.CharField(max_length=40, unique=True)
    event_type = models.CharField(max_length=40)
    body = models.TextField(help_text="The JSON body exactly as it is signed and sent.")
    created_at = models.DateTimeField(default=timezone.now)
    state = models.CharField(max_length=12, choices=STATES, default=PENDING)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    queued_at = models.DateTimeField(null=True, blank=True, help_text="When its message last reached the queue.")
    attempt_count = models.PositiveIntegerField(default=0)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["state", "next_attempt_at"])]

    @classmethod
    def create_event(cls, endpoint: Endpoint, event_type: str, data: dict, job=None) -> Delivery:
        event_id = "evt_" + secrets.token_hex(16)
        now = timezone.now()
        body = json.dumps({"id": event_id, "object": "event", "created_at": int(now.timestamp()),
                           "type": event_type, "data": data}, separators=(",", ":"))
        return cls.objects.create(endpoint=endpoint, job=job, event_id=event_id, event_type=event_type, body=body,
                                  created_at=now, next_attempt_at=now)

    @classmethod
    def for_job(cls, endpoint: Endpoint, job) -> Delivery:
        return cls.create_event(endpoint, EVENT_TYPES[job.state], {"id": api_job_id(job)}, job=job)

    @classmethod
    def test_event(cls, endpoint: Endpoint) -> Delivery:
        return cls.create_event(endpoint, TEST_EVENT_TYPE, {})

    def send(self) -> bool:
        """Queue this delivery's next try on the CPU worker; False when the broker is down (the
        periodic send_due sends it later)."""
        from webapp.celery import send

        if not send("webapp.webhooks.deliver", [self.id], queue="cpu"):
            return False
        self.queued_at = timezone.now()
        Delivery.objects.filter(id=self.id).update(queued_at=self.queued_at)
        return True

    def try_again(self) -> bool:
        """Give a delivery that was given up one more try now; False if it was not given up."""
        rows = Delivery.objects.filter(id=self.id, state=self.FAILED)
        if rows.update(state=self.PENDING, next_attempt_at=timezone.now(), finished_at=None) != 1:
            return False
        self.send()
        return True

    @classmethod
    def send_due(cls) -> int:
        """Queue the pending deliveries whose next try is due and not yet queued for it (a retry, a
        message the broker never took or lost, a worker that died mid-try); how many were sent."""
        now = timezone.now()
        lost = now - timedelta(seconds=claim_seconds())
        due = cls.objects.filter(state=cls.PENDING, next_attempt_at__lte=now).filter(
            Q(queued_at__isnull=True) | Q(queued_at__lt=F("next_attempt_at")) | Q(queued_at__lt=lost)
        )
        return sum(delivery.send() for delivery in due)

    @classmethod
    def claim(cls, delivery_id: int) -> Delivery | None:
        """Take a due delivery for one try, or None (not due, done, or another worker has it). The
        claim pushes the next try past the longest a try can take: a worker that dies mid-try
        leaves the delivery due again."""
        now = timezone.now()
        held_until = now + timedelta(seconds=claim_seconds())
        rows = cls.objects.filter(id=delivery_id, state=cls.PENDING, next_attempt_at__lte=now)
        if rows.update(next_attempt_at=held_until) != 1:
            return None
        return cls.objects.select_related("endpoint").get(id=delivery_id)

    def headers(self, timestamp: int) -> dict[str, str]:
        return {
            "content-type": "application/json", "user-agent": "Specialist-Webhooks/1",
            "webhook-id": self.event_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(self.endpoint.secret, self.event_id, timestamp, self.body),
        }

    def record(self, outcome: Outcome) -> None:
        """Keep one try's outcome, then mark the delivery delivered, due again, or given up."""
        Attempt.objects.create(delivery=self, url=self.endpoint.url, started_at=outcome.started_at,
                               duration_ms=outcome.duration_ms, status_code=outcome.status_code,
                               response_body=outcome.response_body, error=outcome.error)
        self.attempt_count += 1
        now = timezone.now()
        retry_at = now + timedelta(seconds=self.retry_delay())
        if outcome.delivered:
            changes = {"state": self.DELIVERED, "next_attempt_at": None, "finished_at": now}
        elif retry_at > self.created_at + timedelta(seconds=settings.WEBHOOK_GIVE_UP_SECONDS):
            changes = {"state": self.FAILED, "next_attempt_at": None, "finished_at": now}
        else:
            changes = {"next_attempt_at": retry_at}
        Delivery.objects.filter(id=self.id).update(attempt_count=F("attempt_count") + 1, **changes)
        for name, value in changes.items():
            setattr(self, name, value)

    def retry_delay(self) -> float:
        """Seconds from the try just made to the next: the backoff's step for this many tries (its
        last step again once they run out)."""
        steps = settings.WEBHOOK_RETRY_SECONDS
        return steps[min(self.attempt_count, len(steps)) - 1]

    @property
    def last_attempt(self) -> Attempt | None:
        attempts = list(self.attempts.all())
        return attempts[-1] if attempts else None


def claim_seconds() -> float:
    """The longest one try can take (connect, send, read the answer's head), with a margin."""
    return 3 * settings.WEBHOOK_TIMEOUT_SECONDS + 30


class Attempt(models.Model):
    """One try at a delivery: what the receiver answered (status, the body's first bytes), or why
    nothing came back."""

    delivery = models.ForeignKey(Delivery, on_delete=models.CASCADE, related_name="attempts")
    url = models.CharField(max_length=2000)
    started_at = models.DateTimeField()
    duration_ms = models.PositiveIntegerField()
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    response_body = models.TextField(blank=True)
    error = models.CharField(max_length=500, blank=True)

    class Meta:
        ordering = ["started_at", "id"]

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300
