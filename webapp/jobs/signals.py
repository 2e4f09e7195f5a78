"""What other apps can listen to without the jobs app importing them."""

from django.dispatch import Signal

job_finished = Signal()
"""Sent (sender=Job, job=the job) once a job's move into succeeded, failed or cancelled has
committed: the webhooks listen. A receiver must be quick (queue work, do not do it): it runs in
the process that finished the job."""
