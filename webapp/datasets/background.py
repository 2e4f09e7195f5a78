"""The dataset work that runs on the "cpu" Celery queue: reading a large upload, and sending
again those whose message never reached the broker."""

import logging
from datetime import timedelta

from celery import shared_task
from django.conf import settings

from webapp.datasets.models import Dataset

log = logging.getLogger(__name__)


@shared_task(name="webapp.datasets.parse_dataset", acks_late=True, ignore_result=True)
def parse_dataset_task(dataset_id: int) -> None:
    """Read a dataset that waits to be read; a deleted one, or one already read, is left alone."""
    dataset = Dataset.objects.filter(id=dataset_id).first()
    if dataset is None or not dataset.claim_parse():
        log.info("dataset %s no longer waits to be read; nothing to do", dataset_id)
        return
    dataset.refresh_from_db()
    dataset.parse()
    log.info(
        "dataset %s read: %s, %s of %s rows usable", dataset_id, dataset.status, dataset.rows_ok, dataset.rows_total
    )


# Acknowledged on receipt, like the jobs' periodic tasks (webapp/jobs/tasks.py): a missed run is redone by
# the next one.
@shared_task(name="webapp.datasets.resend_waiting_datasets", ignore_result=True, acks_late=False)
def resend_waiting_datasets() -> None:
    """Send the datasets waiting to be read whose message never reached the broker (it was down) or was lost."""
    sent = Dataset.resend_waiting(unclaimed_for=timedelta(seconds=settings.JOB_RESEND_SECONDS))
    if sent:
        log.info("sent %d waiting datasets to the cpu queue again", sent)
