"""The datasets' Celery tasks, on the "cpu" queue: reading a large upload, computing a quality
report, and sending again the work whose message never reached the broker.

Glue between the Dataset model (with its reports' markers, reports.py) and the worker's modules
that compute (worker.quality, worker.preflight, worker.models), run only inside Celery worker
processes (found by autodiscover_tasks); nothing else in the app imports it. The web side queues
these tasks by name (webapp.celery.send) and reads the JSON they keep.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Any

from celery import shared_task
from django.conf import settings

from webapp.datasets import reports
from webapp.datasets.models import Dataset
from worker.catalog import CATALOG
from worker.errors import UserError
from worker.families import FAMILIES
from worker.spec import TrainChoices

log = logging.getLogger(__name__)

DEFAULTS = TrainChoices.defaults()
"""The split a job makes unless the user changes it: the report measures overlap on that split."""
_LOADING = threading.Lock()
"""transformers' lazy imports are not thread-safe, and the cpu worker runs its tasks on threads:
two reports started together failed with "cannot import name 'AutoTokenizer'" (and their pending
markers then stood for half an hour). Importing, resolving the model and the pre-flight take
turns; the statistics themselves run side by side."""


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


# The periodic tasks are acknowledged on receipt, like the jobs' (webapp/jobs/tasks.py): a missed
# run is redone by the next one.
@shared_task(name="webapp.datasets.resend_waiting_datasets", ignore_result=True, acks_late=False)
def resend_waiting_datasets() -> None:
    """Send the datasets waiting to be read whose message never reached the broker (it was down) or was lost."""
    sent = Dataset.resend_waiting(unclaimed_for=timedelta(seconds=settings.JOB_RESEND_SECONDS))
    if sent:
        log.info("sent %d waiting datasets to the cpu queue again", sent)


@shared_task(name="webapp.datasets.resend_quality_reports", ignore_result=True, acks_late=False)
def resend_quality_reports() -> None:
    """Send the reports whose request never reached the queue (it was down), and again those
    sent JOB_RESEND_SECONDS ago that never started (the broker may have lost the message)."""
    sent = reports.resend_waiting()
    if sent:
        log.info("sent %d quality reports to the cpu queue again", sent)


@shared_task(name="webapp.datasets.quality_report", acks_late=True, ignore_result=True)
def quality_report_task(dataset_id: int, base_model: str, max_length: int) -> None:
    dataset = Dataset.objects.filter(id=dataset_id).first()
    if dataset is None:
        log.info("dataset %s no longer exists; no quality report", dataset_id)
        return
    if reports.mark_started(dataset, base_model, max_length):
        build_report(dataset, base_model, max_length)


def build_report(dataset: Dataset, base_model: str, max_length: int) -> dict[str, Any]:
    """Compute the report (and the pre-flight for chat tasks) and keep it beside the dataset."""
    validation = dataset.validation_rows_path if dataset.validation_rows_path.is_file() else None
    try:
        with _LOADING:
            from worker.models import resolve_base
            from worker.preflight import preflight_examples
            from worker.quality import compute_report

            model_dir = resolve_base(base_model)
        report = compute_report(
            dataset.rows_path,
            dataset.task,
            model_dir,
            max_length,
            validation,
            validation_fraction=DEFAULTS["validation_fraction"],
            seed=DEFAULTS["seed"],
        )
        if FAMILIES[dataset.task].generative:  # the pre-flight shows the chat template's tokens
            with _LOADING:  # it loads a transformers tokenizer
                report["preflight"] = preflight_examples(
                    dataset.rows_path, dataset.task, model_dir, max_length, report["longest_row"]
                )
        report["state"] = "done"
    except (UserError, ValueError, OSError) as exc:
        report = {"state": "failed", "message": f"The report could not be computed: {exc}"}
    except Exception:
        log.exception("quality report of dataset %s failed", dataset.id)
        report = {
            "state": "failed",
            "message": "The report could not be computed (an internal error; see the worker log).",
        }
    report.update(base_model=base_model, base_model_name=CATALOG[base_model].name, max_length=max_length)
    reports.keep(dataset, base_model, max_length, report)
    return report

