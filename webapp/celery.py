"""The Celery app. Queues: "train" (GPU workers, one job at a time) and "cpu" (dataset work)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")

app = Celery("specialist")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["worker"])
app.autodiscover_tasks(["webapp.datasets"], related_name="background")
app.autodiscover_tasks(["webapp.datasets"], related_name="reports")
