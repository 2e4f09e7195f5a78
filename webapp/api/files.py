"""OpenAI's Files API for fine-tuning: a file is a dataset, read by the same reader as the upload
form, so the file object's `status` and `status_details` are that reader's verdict.

A file does not say what it is for: its task is proposed from its columns (chat `messages`:
instruction tuning; `input` + `preferred_output` + `non_preferred_output`: DPO; `text` + `label`:
classification, ...), or named with the Specialist field `task` (the official client sends it
with `extra_body={"task": "classify"}`). Ids are `file-<dataset id>`; a job's step metrics are
the result file `file-results-<job id>` (CSV), as OpenAI hands them over.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from django.conf import settings
from django.http import FileResponse, HttpRequest, HttpResponse, JsonResponse
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods

from webapp.api.auth import api_key_required, error
from webapp.api.paging import PagingError, page_of
from webapp.datasets.models import BUSY_STATUSES, REJECTED, REVIEW, Dataset, DatasetRejected
from webapp.jobs.models import Job
from worker.families import FAMILIES

FILE_PREFIX = "file-"
RESULTS_PREFIX = "file-results-"
PURPOSES = ("fine-tune",)
SHOWN_ERRORS = 5
"""Row problems a file's status_details lists (the dataset page has them all)."""


class FileProblem(Exception):
    """A request about files that cannot be answered; rendered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JsonResponse:
        return error(self.status, self.message, param=self.param, code=self.code)


def file_id(dataset: Dataset) -> str:
    return f"{FILE_PREFIX}{dataset.id}"


def dataset_of(user, value: Any, param: str) -> Dataset:
    """The user's dataset that a file id names; FileProblem 404 (400 for a job's field) otherwise.
    Another user's file is not found, exactly like one that does not exist."""
    status = 404 if param == "file_id" else 400
    text = value if isinstance(value, str) else ""
    number = text.removeprefix(FILE_PREFIX)
    dataset = Dataset.objects.filter(owner=user, id=int(number)).first() if text.startswith(FILE_PREFIX) and \
        number.isdigit() else None
    if dataset is None:
        shown = repr(value) if not isinstance(value, str) else f"'{value[:80]}'"
        raise FileProblem(status, f"No such file: {shown}. Upload one with POST /v1/files (purpose=fine-tune) "
                                  "and pass its id (file-...).", param=param, code="invalid_file")
    return dataset


def status_of(dataset: Dataset) -> tuple[str, str | None]:
    """OpenAI's (status, status_details) for the dataset's reading."""
    if dataset.status in BUSY_STATUSES:
        return "uploaded", None
    if dataset.status == REJECTED:
        return "error", _with_rows(dataset.message, dataset)
    if dataset.status == REVIEW:
        rejected = dataset.rows_total - dataset.rows_ok
        return "processed", _with_rows(
            f"{dataset.rows_ok} of {dataset.rows_total} rows can be trained on; {rejected} could not be read. A job "
            "trains on this file only once you accept leaving them out (the dataset's page, or "
            '"accept_rejected_rows": true in the job\'s "specialist" settings), or fix the file.', dataset)
    return "processed", None


def _with_rows(message: str, dataset: Dataset) -> str:
    rows = [f"line {e['line']}" + (f", column '{e['column']}'" if e.get("column") else "") + f": {e['problem']}"
            for e in dataset.errors[:SHOWN_ERRORS]]
    more = len(dataset.errors) - SHOWN_ERRORS
    listed = " ".join(f"{row}." if not row.endswith(".") else row for row in rows)
    return " ".join(part for part in (message, listed, f"(and {more} more)" if more > 0 else "") if part)


def file_object(dataset: Dataset) -> dict[str, Any]:
    status, details = status_of(dataset)
    return {
        "id": file_id(dataset), "object": "file", "bytes": dataset.size_bytes,
        "created_at": int(dataset.created_at.timestamp()), "filename": dataset.original_name,
        "purpose": "fine-tune", "status": status, "status_details": details, "expires_at": None,
        "specialist": {
            "task": dataset.task, "task_name": FAMILIES[dataset.task].name, "state": dataset.status,
            "rows_total": dataset.rows_total, "rows_ok": dataset.rows_ok, "chat_format": dataset.chat_format or None,
            "errors": dataset.errors[:SHOWN_ERRORS], "url": reverse("dataset", args=[dataset.id]),
        },
    }


@require_http_methods(["GET", "POST"])
@api_key_required
def files(request: HttpRequest) -> HttpResponse:
    try:
        return _upload(request) if request.method == "POST" else _list(request)
    except (FileProblem, PagingError) as problem:
        return problem.response()


def _upload(request: HttpRequest) -> JsonResponse:
    if getattr(request, "upload_too_large", False):
        raise FileProblem(413, f"The file is larger than the upload limit of {settings.MAX_UPLOAD_BYTES} bytes.",
                          param="file", code="file_too_large")
    purpose = request.POST.get("purpose")
    if purpose not in PURPOSES:
        raise FileProblem(400, f"purpose must be 'fine-tune' (got {purpose!r}): this server keeps files for "
                               "fine-tuning only.", param="purpose")
    upload = request.FILES.get("file")
    if upload is None:
        raise FileProblem(400, "Send the file as the multipart field 'file'.", param="file")
    task = request.POST.get("task") or None
    if task is not None and task not in FAMILIES:
        raise FileProblem(400, f"task must be one of {', '.join(FAMILIES)} (got '{task[:40]}').", param="task")
    try:
        dataset = Dataset.from_upload(request.user, task, request.POST.get("name", "")[:200], upload)
    except DatasetRejected as rejected:
        where = "; ".join(f"line {e['line']}: {e['problem']}" for e in rejected.errors[:SHOWN_ERRORS])
        raise FileProblem(400, f"{rejected}{' ' + where if where else ''}", param="file",
                          code="invalid_file_format") from None
    return JsonResponse(file_object(dataset))


def _list(request: HttpRequest) -> JsonResponse:
    purpose = request.GET.get("purpose")
    datasets = Dataset.objects.filter(owner=request.user)
    if purpose and purpose not in PURPOSES:
        datasets = datasets.none()
    page = page_of(request, datasets, prefix=FILE_PREFIX, order_param=True, default_limit=10000, max_limit=10000)
    return JsonResponse(page.body([file_object(d) for d in page.items]))


@require_http_methods(["GET", "DELETE"])
@api_key_required
def one_file(request: HttpRequest, file: str) -> HttpResponse:
    try:
        if file.startswith(RESULTS_PREFIX):
            if request.method != "GET":
                raise FileProblem(400, "A job's result file goes with its job; it cannot be deleted.", param="file_id")
            return JsonResponse(_results_object(_results_job(request.user, file)))
        dataset = dataset_of(request.user, file, "file_id")
        if request.method == "DELETE":
            return _delete(dataset)
        return JsonResponse(file_object(dataset))
    except FileProblem as problem:
        return problem.response()


def _delete(dataset: Dataset) -> JsonResponse:
    if dataset.in_use:
        raise FileProblem(400, f"{file_id(dataset)} is used by a fine-tuning job and is kept with it.",
                          param="file_id", code="file_in_use")
    if dataset.is_busy:
        raise FileProblem(400, f"{file_id(dataset)} is being read; delete it once its status is processed or error.",
                          param="file_id", code="file_in_use")
    name = file_id(dataset)
    dataset.delete_files()
    dataset.delete()
    return JsonResponse({"id": name, "object": "file", "deleted": True})


@require_GET
@api_key_required
def file_content(request: HttpRequest, file: str) -> HttpResponse:
    """The file as it was uploaded, byte for byte (a job's result file: its step metrics as CSV)."""
    try:
        if file.startswith(RESULTS_PREFIX):
            body = _results_csv(_results_job(request.user, file))
            return HttpResponse(body, content_type="text/csv; charset=utf-8")
        dataset = dataset_of(request.user, file, "file_id")
    except FileProblem as problem:
        return problem.response()
    return FileResponse(dataset.original.open("rb"), as_attachment=True, filename=dataset.original_name,
                        content_type="application/octet-stream")


# A job's result file -----------------------------------------------------------------------

RESULT_COLUMNS = ("step", "train_loss", "valid_loss", "learning_rate", "tokens")


def results_file_id(job: Job) -> str:
    return f"{RESULTS_PREFIX}{job.id}"


def _results_job(user, value: str) -> Job:
    number = value.removeprefix(RESULTS_PREFIX)
    job = Job.objects.filter(owner=user, id=int(number), state="succeeded").first() if number.isdigit() else None
    if job is None:
        raise FileProblem(404, f"No such file: '{value[:80]}'.", param="file_id", code="invalid_file")
    return job


def _results_csv(job: Job) -> str:
    """One row per step: the training loss, and the held-out loss at the steps it was measured.
    Only numbers: nothing in it can run as a spreadsheet formula."""
    rows: dict[int, dict[str, Any]] = {}
    for event in job.events.filter(kind__in=("metric", "eval")).order_by("seq"):
        data, row = event.data, rows.setdefault(event.step, {"step": event.step})
        if event.kind == "metric":
            row.update(train_loss=data.get("loss"), learning_rate=data.get("learning_rate"), tokens=data.get("tokens"))
        elif "eval_loss" in data:
            row["valid_loss"] = data["eval_loss"]
    out = io.StringIO()
    writer = csv.DictWriter(out, RESULT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for step in sorted(rows):
        writer.writerow({k: v for k, v in rows[step].items() if isinstance(v, int | float)})
    return out.getvalue()


def _results_object(job: Job) -> dict[str, Any]:
    return {"id": results_file_id(job), "object": "file", "bytes": len(_results_csv(job).encode()),
            "created_at": int((job.finished_at or job.created_at).timestamp()), "filename": "step_metrics.csv",
            "purpose": "fine-tune-results", "status": "processed", "status_details": None, "expires_at": None}


def result_files(job: Job) -> list[str]:
    return [results_file_id(job)] if job.state == "succeeded" else []

