import uuid
from pathlib import Path

from django.conf import settings
from django.db import models


def _storage_dir(dataset: "Dataset") -> str:
    return f"datasets/{dataset.storage_key}"


def original_upload_to(dataset: "Dataset", filename: str) -> str:
    # The user's file name is shown, never used on disk.
    return f"{_storage_dir(dataset)}/original{Path(filename).suffix.lower()}"


class Dataset(models.Model):
    TASKS = [("sft", "Instruction tuning (instruction → response)")]

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

    def active_jobs(self):
        from webapp.jobs.models import Job

        return self.job_set.filter(state__in=Job.ACTIVE_STATES)

    def delete_files(self) -> None:
        self.original.delete(save=False)
        self.rows_path.unlink(missing_ok=True)
