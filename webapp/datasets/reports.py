"""Quality reports: where they are kept, and the "cpu" task that computes one.

A report is computed for one (base model, max length) and kept as JSON beside the dataset's
files, under a name that also depends on the rows files' size and time, so a dataset read
again (new mapping, replaced file, a validation file) gets a fresh report. While a report is
computed a `.pending` marker stands in its place; a marker older than PENDING_SECONDS (a lost
message, a worker that died) no longer counts and the report is queued again.

The web process imports this module; the computing modules (tokenizers, and torch for the
pre-flight) are imported inside the task only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from celery import shared_task

from webapp.datasets.models import Dataset
from webapp.datasets.tasks import TASKS
from webapp.jobs.forms import SUGGESTED
from worker.catalog import CATALOG, catalog_for
from worker.spec import TrainSpec

log = logging.getLogger(__name__)

PENDING_SECONDS = 30 * 60
_LOADING = threading.Lock()
"""transformers' lazy imports are not thread-safe, and the cpu worker runs its tasks on threads:
two reports started together failed with "cannot import name 'AutoTokenizer'" (and their pending
markers then stood for half an hour). Importing, resolving the model and the pre-flight take
turns; the statistics themselves run side by side."""
MIN_LENGTH, MAX_LENGTH = 8, 32768
PREFLIGHT_TASKS = ("sft", "dpo")


def base_model_choices(task: str) -> list[tuple[str, str]]:
    """The catalog models that can serve `task` (the only ones a report may name)."""
    kinds = TASKS[task].base_kinds
    return [(m.key, m.name) for kind in kinds for m in catalog_for(kind)]


def defaults(task: str) -> tuple[str, int]:
    """(base model, max length) a new job on this task starts with."""
    suggested = SUGGESTED[task]
    return suggested["base_model"], suggested["max_seq_length"]


def choice_problem(task: str, base_model: str, max_length: int) -> str | None:
    if base_model not in dict(base_model_choices(task)):
        return f"Choose one of the base models for {TASKS[task].name.lower()}."
    if not MIN_LENGTH <= max_length <= MAX_LENGTH:
        return f"The max length must be between {MIN_LENGTH} and {MAX_LENGTH} tokens."
    return None


def report_path(dataset: Dataset, base_model: str, max_length: int) -> Path:
    files = [dataset.rows_path, dataset.validation_rows_path]
    stamps = [[f.stat().st_size, f.stat().st_mtime_ns] if f.is_file() else None for f in files]
    key = hashlib.sha256(json.dumps([base_model, max_length, stamps]).encode()).hexdigest()[:32]
    return dataset.rows_path.parent / "quality" / f"{key}.json"


def request_report(dataset: Dataset, base_model: str, max_length: int) -> dict[str, Any]:
    """The report if it is ready (state "done" or "failed"), else {"state": "computing"} after
    queueing it unless it is already on its way."""
    path = report_path(dataset, base_model, max_length)
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    pending = path.with_suffix(".pending")
    try:
        if time.time() - pending.stat().st_mtime < PENDING_SECONDS:
            return {"state": "computing"}
        pending.unlink()
    except FileNotFoundError:
        pass
    pending.parent.mkdir(parents=True, exist_ok=True)
    try:
        pending.open("x").close()  # only one request queues it
    except FileExistsError:
        return {"state": "computing"}
    quality_report_task.apply_async(args=[dataset.id, base_model, max_length], queue="cpu")
    return {"state": "computing"}


@shared_task(name="webapp.datasets.quality_report", acks_late=True, ignore_result=True)
def quality_report_task(dataset_id: int, base_model: str, max_length: int) -> None:
    dataset = Dataset.objects.filter(id=dataset_id).first()
    if dataset is None:
        log.info("dataset %s no longer exists; no quality report", dataset_id)
        return
    build_report(dataset, base_model, max_length)


def build_report(dataset: Dataset, base_model: str, max_length: int) -> dict[str, Any]:
    """Compute the report (and the pre-flight for chat tasks) and keep it beside the dataset."""
    from worker.errors import UserError

    path = report_path(dataset, base_model, max_length)
    validation = dataset.validation_rows_path if dataset.validation_rows_path.is_file() else None
    try:
        with _LOADING:
            from webapp.datasets.preflight import preflight_examples
            from webapp.datasets.quality import compute_report
            from worker.models import resolve_base

            model_dir = resolve_base(base_model)
        report = compute_report(
            dataset.rows_path,
            dataset.task,
            model_dir,
            max_length,
            validation,
            validation_fraction=_DEFAULT_SPEC["validation_fraction"],
            seed=_DEFAULT_SPEC["seed"],
        )
        if dataset.task in PREFLIGHT_TASKS:
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
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(report), encoding="utf-8")
    os.replace(partial, path)
    path.with_suffix(".pending").unlink(missing_ok=True)
    return report


_DEFAULT_SPEC = {name: TrainSpec.__dataclass_fields__[name].default for name in ("validation_fraction", "seed")}
