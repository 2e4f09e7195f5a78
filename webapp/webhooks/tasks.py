"""The webhook tasks, run by the CPU worker: one try at a delivery, and the periodic send of the
deliveries that are due (retries, and messages the broker never took)."""

from __future__ import annotations

import logging

from celery import shared_task

from webapp.webhooks import sending
from webapp.webhooks.models import Delivery

log = logging.getLogger(__name__)


@shared_task(name="webapp.webhooks.deliver", ignore_result=True, acks_late=False)
def deliver(delivery_id: int) -> None:
    delivery = Delivery.claim(delivery_id)
    if delivery is not None:
        delivery.record(sending.attempt(delivery))


@shared_task(name="webapp.webhooks.send_due_deliveries", ignore_result=True, acks_late=False)
def send_due_deliveries() -> None:
    sent = Delivery.send_due()
    if sent:
        log.info("queued %d due webhook deliveries", sent)
