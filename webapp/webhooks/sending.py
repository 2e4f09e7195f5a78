"""One try at a delivery over HTTP: short timeouts, no redirects followed, the answer's head kept."""

from __future__ import annotations

import time

import httpx
from django.conf import settings
from django.utils import timezone

from webapp.webhooks.models import Delivery, Outcome

KEPT_BYTES = 1024
"""How much of the receiver's answer is kept for the account page."""


def attempt(delivery: Delivery) -> Outcome:
    """POST the event to the endpoint as it is now (its URL and secret), signed at this moment."""
    started_at, clock = timezone.now(), time.monotonic()
    headers = delivery.headers(int(time.time()))
    timeout = settings.WEBHOOK_TIMEOUT_SECONDS
    try:
        with httpx.stream("POST", delivery.endpoint.url, content=delivery.body.encode(), headers=headers,
                          timeout=timeout, follow_redirects=False) as answer:
            head = read_head(answer)
    except httpx.TimeoutException:
        return Outcome(started_at, elapsed_ms(clock), error=f"No answer within {timeout:g} s.")
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        return Outcome(started_at, elapsed_ms(clock), error=describe(exc))
    return Outcome(started_at, elapsed_ms(clock), status_code=answer.status_code, response_body=head)


def read_head(answer: httpx.Response) -> str:
    kept = b""
    for chunk in answer.iter_bytes():
        kept += chunk
        if len(kept) >= KEPT_BYTES:
            break
    return kept[:KEPT_BYTES].decode("utf-8", errors="replace")


def describe(exc: Exception) -> str:
    if isinstance(exc, httpx.ConnectError):
        return f"Could not connect: {exc}"[:500]
    return f"{type(exc).__name__}: {exc}"[:500]


def elapsed_ms(clock: float) -> int:
    return round((time.monotonic() - clock) * 1000)
