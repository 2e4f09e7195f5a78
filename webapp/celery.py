"""The Celery app. Queues: "train" (GPU workers, one job at a time) and "cpu" (dataset work)."""

import logging
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")

log = logging.getLogger(__name__)

app = Celery("specialist")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["webapp.jobs", "webapp.datasets", "webapp.webhooks", "webapp.exports"])  # each app's tasks.py


def send(task: str, args: list, queue: str) -> bool:
    """Put `task` (by name: the web side never imports the worker's torch code) on `queue`;
    False, logged, when the broker (Redis) is unreachable. Few retries: a page must not hang
    while the broker is down, and the periodic resends send the work again once it is back."""
    from kombu.exceptions import OperationalError

    try:
        app.send_task(task, args=args, queue=queue, retry_policy={"max_retries": 1})
    except (OperationalError, OSError) as exc:
        log.warning("%s%s: the queue is unreachable (%s); it will be sent again", task, args, exc)
        return False
    return True
