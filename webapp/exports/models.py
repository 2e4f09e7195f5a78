"""Exports: a succeeded generative job's model in a format people serve from, built once on the
cpu worker and kept beside the job.

`Export.request(job, kind)` is the one way in (the job page's form, the API): it refuses what
cannot be exported, returns the export already made or under way, and queues a new one. The
row exists before the task is queued; the task (webapp/exports/tasks.py) carries only its id
and claims it with a conditional UPDATE, so a duplicate delivery builds nothing twice.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from django.db import IntegrityError, models, transaction
from django.urls import reverse
from django.utils import timezone

from webapp.celery import send
from webapp.jobs.models import SUCCEEDED, Job
from worker.families import FAMILIES

QUEUED = "queued"
BUILDING = "building"
READY = "ready"
FAILED = "failed"
STATES = [(QUEUED, "queued"), (BUILDING, "building"), (READY, "ready"), (FAILED, "failed")]

KINDS = {
    "merged": "Merged model (transformers, safetensors)",
    "gguf-f16": "GGUF f16 (llama.cpp, Ollama)",
    "gguf-q8_0": "GGUF Q8_0, about half the size (llama.cpp, Ollama)",
}
STALE_AFTER = timedelta(hours=1)
"""A build that started this long ago and never finished lost its worker: asking again restarts it."""


class ExportRefused(ValueError):
    """This job cannot be exported so; the message is for the user."""


class Export(models.Model):
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="exports")
    kind = models.CharField(max_length=16, choices=list(KINDS.items()))
    state = models.CharField(max_length=16, choices=STATES, default=QUEUED)
    message = models.TextField(blank=True, help_text="Why it failed, for the user.")
    path = models.CharField(max_length=1000, blank=True, help_text="The file to download, once ready.")
    size_bytes = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["job", "kind"], name="one_export_per_job_and_kind")]
        ordering = ["job", "kind"]

    def __str__(self) -> str:
        return f"job {self.job_id} {self.kind} ({self.state})"

    # Asking ------------------------------------------------------------------------------
    @classmethod
    def refusal(cls, job: Job, kind: str) -> str | None:
        """Why `job` cannot be exported as `kind`, or None."""
        if kind not in KINDS:
            return f"Unknown export {kind!r}: choose one of {', '.join(KINDS)}."
        if job.is_evaluation:
            return "An evaluation has no model of its own to export."
        if job.state != SUCCEEDED:
            return f"The job is {job.state}: only a succeeded job's model can be exported."
        family = FAMILIES.get(job.spec.get("task", "sft"))
        if family is None or not family.generative:
            return "Only text-generating models (instruction tuning, preferences, domain adaptation) are exported so."
        if not job.final_dir.is_dir():
            return "The job's model is no longer on the server."
        return None

    @classmethod
    def request(cls, job: Job, kind: str) -> Export:
        """The export of `job` as `kind`: the one made or under way, else a new one, queued."""
        if reason := cls.refusal(job, kind):
            raise ExportRefused(reason)
        try:
            with transaction.atomic():
                export, _ = cls.objects.get_or_create(job=job, kind=kind)
        except IntegrityError:  # asked twice at once: the other request made it
            export = cls.objects.get(job=job, kind=kind)
        if export.needs_rebuild():
            export.restart()
        if export.state == QUEUED:
            transaction.on_commit(export.send)
        return export

    def needs_rebuild(self) -> bool:
        if self.state == FAILED:
            return True
        if self.state == READY:
            return self.file is None  # deleted from the disk since
        return self.state == BUILDING and self.started_at is not None and self.started_at < timezone.now() - STALE_AFTER

    def restart(self) -> bool:
        fields = {"state": QUEUED, "message": "", "path": "", "size_bytes": None, "started_at": None, "finished_at": None}
        return self._move(fields, from_state=self.state)

    def send(self) -> bool:
        """Queue the build on the cpu worker; False when the broker is down (asking again resends)."""
        sent = send("webapp.exports.build_export", [self.id], queue="cpu")
        if sent:
            Export.objects.filter(id=self.id).update(sent_at=timezone.now())
        return sent

    # The build (called by the task) --------------------------------------------------------
    def claim(self) -> bool:
        return self._move({"state": BUILDING, "started_at": timezone.now()}, from_state=QUEUED)

    def finish(self, file: Path) -> bool:
        fields = {"state": READY, "path": str(file), "size_bytes": file.stat().st_size, "finished_at": timezone.now()}
        return self._move(fields, from_state=BUILDING)

    def fail(self, message: str) -> bool:
        return self._move({"state": FAILED, "message": message, "finished_at": timezone.now()}, from_state=BUILDING)

    def _move(self, fields: dict[str, Any], from_state: str) -> bool:
        moved = Export.objects.filter(id=self.id, state=from_state).update(**fields) == 1
        if moved:
            for name, value in fields.items():
                setattr(self, name, value)
        return moved

    # Reading -----------------------------------------------------------------------------
    @property
    def label(self) -> str:
        return KINDS[self.kind]

    @property
    def file(self) -> Path | None:
        return Path(self.path) if self.state == READY and self.path and Path(self.path).is_file() else None

    @property
    def folder(self) -> Path:
        """Where the job's exports are built and kept."""
        return self.job.output_dir / "exports"

    @property
    def name(self) -> str:
        """The download's name without its extension, also the folder inside the zip."""
        return f"specialist-job-{self.job_id}-{self.kind}"

    def get_download_url(self) -> str:
        return reverse("download_export", args=[self.id])

    def as_dict(self) -> dict[str, Any]:
        """What the API returns for an export."""
        when = {name: getattr(self, name).isoformat() if getattr(self, name) else None
                for name in ("created_at", "started_at", "finished_at")}
        return {
            "id": self.id, "object": "export", "job_id": self.job_id, "kind": self.kind, "state": self.state,
            "message": self.message, "size_bytes": self.size_bytes,
            "filename": self.file.name if self.file else None,
            "download_url": self.get_download_url() if self.file else None, **when,
        }

    @classmethod
    def offers_for(cls, job: Job) -> list[tuple[str, str, Export | None]]:
        """(kind, label, the export if asked for) of each kind, for the job page."""
        made = {export.kind: export for export in job.exports.all()}
        return [(kind, label, made.get(kind)) for kind, label in KINDS.items()]
