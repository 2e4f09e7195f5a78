import uuid
from pathlib import Path

from django.conf import settings
from django.core.files import File
from django.db import models

from webapp.datasets import tasks
from webapp.datasets.parsing import parse_dataset


def _storage_dir(dataset: "Dataset") -> str:
    return f"datasets/{dataset.storage_key}"


def original_upload_to(dataset: "Dataset", filename: str) -> str:
    # The user's file name is shown, never used on disk.
    return f"{_storage_dir(dataset)}/original{Path(filename).suffix.lower()}"


class DatasetRejected(Exception):
    """The upload cannot be trained on; the message says why and where."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class Dataset(models.Model):
    TASKS = tasks.choices()

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    name = models.CharField(max_length=200)
    task = models.CharField(max_length=20, choices=TASKS, default="sft")
    storage_key = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    original_name = models.CharField(max_length=255)
    original = models.FileField(upload_to=original_upload_to, max_length=500)
    size_bytes = models.BigIntegerField(default=0)
    format = models.CharField(max_length=20)
    chat_format = models.CharField(max_length=20, blank=True)
    columns = models.JSONField(default=list)
    mapping = models.JSONField(default=dict)
    rows_total = models.IntegerField(default=0)
    rows_ok = models.IntegerField(default=0)
    error_counts = models.JSONField(default=dict)
    errors = models.JSONField(default=list)
    preview_rows = models.JSONField(default=list)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.name

    @property
    def rows_path(self) -> Path:
        """The normalised rows (canonical JSONL) that training reads."""
        return Path(settings.MEDIA_ROOT) / _storage_dir(self) / "rows.jsonl"

    @property
    def rows_rejected(self) -> int:
        return self.rows_total - self.rows_ok

    @classmethod
    def from_upload(cls, owner, task: str, name: str, upload: File) -> "Dataset":
        """Store, parse and check an upload; keep it only if it can be trained on.

        Raises DatasetRejected (and keeps nothing) when the file or its rows are unusable.
        """
        dataset = cls(owner=owner, task=task, original_name=upload.name[:255], name=name or upload.name[:200],
                      size_bytes=upload.size)
        dataset.original.save(upload.name, upload, save=False)
        dataset.rows_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            report = parse_dataset(dataset.original.path, upload.name, task=task, out_path=dataset.rows_path)
            if not report.usable:
                raise DatasetRejected(report.fatal or _no_usable_rows(report), report)
            problems = tasks.problems(task, dataset.rows_path)
            if problems:
                raise DatasetRejected(" ".join(problems), report)
        except BaseException:
            dataset.delete_files()
            raise
        dataset.format, dataset.chat_format = report.format, report.chat_format or ""
        dataset.columns, dataset.mapping = report.columns, report.mapping
        dataset.rows_total, dataset.rows_ok = report.rows_total, report.rows_ok
        dataset.error_counts = report.error_counts
        dataset.errors = [{"line": e.line, "column": e.column, "problem": e.problem} for e in report.errors]
        dataset.preview_rows = report.preview
        dataset.save()
        return dataset

    def active_jobs(self):
        from webapp.jobs.models import Job

        return self.job_set.filter(state__in=Job.ACTIVE_STATES)

    def delete_files(self) -> None:
        self.original.delete(save=False)
        self.rows_path.unlink(missing_ok=True)
        if self.rows_path.parent.is_dir() and not any(self.rows_path.parent.iterdir()):
            self.rows_path.parent.rmdir()


def _no_usable_rows(report) -> str:
    first = report.errors[0] if report.errors else None
    where = f" First problem: line {first.line}, {first.column or 'row'}: {first.problem}." if first else ""
    return f"None of the {report.rows_total} rows can be used.{where}"
