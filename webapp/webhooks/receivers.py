"""What the webhooks app does when a job ends: record the delivery and queue it, nothing more (this
runs in the process that finished the job)."""

from __future__ import annotations

import logging

from django.dispatch import receiver

from webapp.jobs.models import FINAL_STATES, Job
from webapp.jobs.signals import job_finished
from webapp.webhooks.models import Delivery, Endpoint

log = logging.getLogger(__name__)


@receiver(job_finished, sender=Job, dispatch_uid="webapp.webhooks.queue_job_event")
def queue_job_event(sender, job: Job, **kwargs) -> None:
    # The job has ended and is recorded; a webhook that cannot be queued must not look like the
    # job's failure to the runner that finished it.
    try:
        endpoint = Endpoint.objects.filter(owner_id=job.owner_id).first()
        job.refresh_from_db(fields=["state"])  # the sender's copy may predate the committed move
        if endpoint is not None and job.state in FINAL_STATES and not job.is_evaluation:
            Delivery.for_job(endpoint, job).send()
    except Exception:
        log.exception("job %s ended but its webhook event could not be recorded", job.id)
