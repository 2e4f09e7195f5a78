"""Datasets: an upload, what reading it found, and what the user decided about it.

A dataset moves through `uploaded → parsing → ready | review | rejected`. `Dataset.parse()`
is the one place that reads the files; a small upload is read in the request, a large one by
the "cpu" Celery queue (webapp/datasets/tasks.py), both through that method. Nothing the
user uploaded is dropped when reading finds problems: the file stays with its message, so the
user can change the column mapping, upload a corrected file in its place, or delete it. Once a
job uses a dataset it never changes again.
"""

import logging
import shutil
import uuid
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.core.files import File
from django.db import models, transaction
from django.db.models import Q
from django.utils import timezone

from webapp.datasets import checks, conversations
from webapp.datasets.parsing import TASK_FIELDS, ParseReport, parse_dataset, peek_columns, propose_task, unpacked_size
from worker.conversations import CONVERSATION_FIELDS, transcript
from worker.families import FAMILIES
from worker.rows import validation_rows_in_training

log = logging.getLogger(__name__)

UPLOADED = "uploaded"
PARSING = "parsing"
READY = "ready"
REVIEW = "review"
REJECTED = "rejected"
BUSY_STATUSES = (UPLOADED, PARSING)
TRANSITIONS = {
    UPLOADED: {UPLOADED, PARSING},
    PARSING: {PARSING, READY, REVIEW, REJECTED},  # PARSING again: a reader that died is replaced
    READY: {UPLOADED, PARSING},  # read again: a new column mapping or validation file
    REVIEW: {READY, UPLOADED, PARSING},  # READY: the user accepts dropping the rejected rows
    REJECTED: {UPLOADED, PARSING},
}
"""Which status a dataset may move to from each; every change goes through Dataset.transition."""
STATUSES = [
    (UPLOADED, "waiting to be read"),
    (PARSING, "being read"),
    (READY, "ready"),
    (REVIEW, "needs review"),
    (REJECTED, "rejected"),
]


def _storage_dir(dataset: "Dataset") -> str:
    return f"datasets/{dataset.storage_key}"


def original_upload_to(dataset: "Dataset", filename: str) -> str:
    # The user's file name is shown, never used on disk.
    return f"{_storage_dir(dataset)}/original{Path(filename).suffix.lower()}"


def validation_upload_to(dataset: "Dataset", filename: str) -> str:
    return f"{_storage_dir(dataset)}/validation-original{Path(filename).suffix.lower()}"


class DatasetRejected(Exception):
    """An upload that cannot be read as a dataset at all; the message says why and where."""

    def __init__(self, message: str, errors: list[dict] | None = None, field: str = "file"):
        super().__init__(message)
        self.errors = errors or []
        """Examples of unreadable rows: {"line", "column", "problem"}."""
        self.field = field
        """The upload form's field that holds the file."""


class DatasetLocked(Exception):
    """The dataset cannot change now: a job uses it, or it is being read."""


def task_choices() -> list[tuple[str, str]]:
    """The task families (worker.families), read when asked: a new family needs no migration."""
    return [(f.key, f.label) for f in FAMILIES.values()]


class Dataset(models.Model):
    TASKS = task_choices()
    STATUSES = STATUSES

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    name = models.CharField(max_length=200)
    task = models.CharField(max_length=20, choices=task_choices, default="sft")
    status = models.CharField(max_length=20, choices=STATUSES, default=UPLOADED)
    message = models.TextField(blank=True, help_text="Why the dataset was rejected, written for the user.")
    storage_key = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    original_name = models.CharField(max_length=255)
    original = models.FileField(upload_to=original_upload_to, max_length=500)
    size_bytes = models.BigIntegerField(default=0)
    format = models.CharField(max_length=20)
    chat_format = models.CharField(max_length=20, blank=True)
    columns = models.JSONField(default=list)
    user_mapping = models.JSONField(null=True, blank=True, help_text="The user's column choice; null: detect.")
    column_choices = models.JSONField(
        default=dict, blank=True,
        help_text="Instruction tuning: what a column that judges its rows means (column -> desirable | ignore).",
    )
    meaning_columns = models.JSONField(
        default=list, blank=True, help_text="The file's columns that judge its rows and that the task does not read.")
    drop_media = models.BooleanField(
        default=False, help_text="The user chose to read conversations without their images, audio and video.")
    media_dropped = models.JSONField(
        default=dict, blank=True, help_text="With drop_media: {items, rows} the training file's reading left out.")
    mapping = models.JSONField(default=dict)
    rows_total = models.IntegerField(default=0)
    rows_ok = models.IntegerField(default=0)
    error_counts = models.JSONField(default=dict)
    errors = models.JSONField(default=list)
    preview_rows = models.JSONField(default=list)
    validation = models.FileField(upload_to=validation_upload_to, max_length=500, blank=True)
    validation_name = models.CharField(max_length=255, blank=True)
    validation_size_bytes = models.BigIntegerField(default=0)
    validation_report = models.JSONField(default=dict, blank=True)
    """What reading the validation file found: format, rows_total, rows_ok, error_counts, errors, fatal."""
    parse_sent_at = models.DateTimeField(
        null=True, blank=True, help_text="When the dataset's id last reached the cpu queue to be read."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.name

    # Files ------------------------------------------------------------------------------
    @property
    def rows_path(self) -> Path:
        """The normalised rows (canonical JSONL) that training reads."""
        return Path(settings.MEDIA_ROOT) / _storage_dir(self) / "rows.jsonl"

    @property
    def validation_rows_path(self) -> Path:
        """The normalised rows of the uploaded validation file, when there is one."""
        return Path(settings.MEDIA_ROOT) / _storage_dir(self) / "validation.jsonl"

    @property
    def has_validation(self) -> bool:
        return bool(self.validation)

    def delete_files(self) -> None:
        self.original.delete(save=False)
        self.validation.delete(save=False)
        for path in (self.rows_path, self.validation_rows_path):
            path.unlink(missing_ok=True)
            Path(f"{path}.partial").unlink(missing_ok=True)
        folder = self.rows_path.parent
        shutil.rmtree(folder / "quality", ignore_errors=True)  # quality reports (reports.py)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()

    # Rows -------------------------------------------------------------------------------
    @property
    def rows_rejected(self) -> int:
        return self.rows_total - self.rows_ok

    @property
    def mapping_in_field_order(self) -> list[tuple[str, str]]:
        """(field, column) in the task's field order (the database may keep JSON keys in any order)."""
        names = self.fields["required"] + self.fields["optional"]
        return [(name, self.mapping[name]) for name in names if name in self.mapping]

    @property
    def suggested_family(self):
        """The task family the file's columns look made for, when it is not the dataset's (None otherwise)."""
        task = propose_task(self.columns) if self.columns else None
        return FAMILIES[task] if task and task != self.task else None

    @property
    def preview_columns(self) -> list[str]:
        """The preview's fields: the task's, in their order."""
        present = {name for row in self.preview_rows for name in row}
        conversation = ["conversation"] if present & CONVERSATION_FIELDS else []
        return conversation + [name for name in self.fields["required"] + self.fields["optional"] if name in present]

    @property
    def preview_table(self) -> list[list[str]]:
        """The preview rows as text; a conversation (several exchanges, tools) as a short transcript."""
        def value(row: dict, name: str) -> str:
            if name == "conversation":
                return transcript(row) if row.keys() & CONVERSATION_FIELDS else ""
            return row.get(name, "")

        return [[value(row, name) for name in self.preview_columns] for row in self.preview_rows]

    @property
    def error_summary(self) -> list[tuple[str, int]]:
        """(kind, count) of the rejected rows, the most common first."""
        return _most_common_first(self.error_counts)

    @property
    def validation_error_summary(self) -> list[tuple[str, int]]:
        return _most_common_first(self.validation_report.get("error_counts", {}))

    @property
    def validation_rows_ok(self) -> int:
        return self.validation_report.get("rows_ok", 0)

    @property
    def validation_overlap(self) -> int:
        """Validation rows whose input is also a training row's (counted when the files are read)."""
        return self.validation_report.get("in_training", 0)

    @property
    def validation_rows_rejected(self) -> int:
        return self.validation_report.get("rows_total", 0) - self.validation_rows_ok

    @property
    def fields(self) -> dict[str, list[str]]:
        """The task's canonical fields: {"required": [...], "optional": [...]}."""
        return TASK_FIELDS[self.task]

    def held_out_rows(self, fraction: float) -> int:
        """About how many rows a job holds out for validation at `fraction` (the recipes' seeded
        split: at least one row, at least one left to train; rows with the same input stay on one
        side, classification splits by label and reranking by query, so theirs can differ by a few
        rows)."""
        if fraction <= 0 or self.rows_ok < 2:
            return 0
        return min(max(1, round(fraction * self.rows_ok)), self.rows_ok - 1)

    # Status -----------------------------------------------------------------------------
    @property
    def is_busy(self) -> bool:
        return self.status in BUSY_STATUSES

    @property
    def is_ready(self) -> bool:
        return self.status == READY

    @property
    def in_use(self) -> bool:
        """A job trains on it, or holds it out (the fine-tuning API's validation_file)."""
        return self.job_set.exists() or self.validation_jobs.exists()

    def check_can_change(self) -> None:
        """Raise DatasetLocked, with the reason, unless the user may change the dataset now."""
        if self.in_use:
            raise DatasetLocked(
                "A job has used this dataset, so it can no longer change. Upload a new dataset instead."
            )
        if self.is_busy:
            raise DatasetLocked("The dataset is being read; wait until it is done.")

    def transition(self, to: str, *, from_states=None, **fields) -> bool:
        """Move to status `to` if the current one allows it (TRANSITIONS); True if this call moved it.

        One conditional UPDATE: of two readers only one claims a dataset, and a result is stored
        only while the dataset is still being read (a dataset deleted meanwhile stays deleted).
        """
        allowed_from = [s for s, targets in TRANSITIONS.items() if to in targets]
        if from_states is not None:
            allowed_from = [s for s in allowed_from if s in from_states]
        moved = Dataset.objects.filter(id=self.id, status__in=allowed_from).update(status=to, **fields) == 1
        if moved:
            self.status = to
            for name, value in fields.items():
                setattr(self, name, value)
        return moved

    def accept_dropped_rows(self) -> bool:
        """The user chose to train on the usable rows and drop the rejected ones."""
        return self.transition(READY, from_states=[REVIEW])

    # Uploads ----------------------------------------------------------------------------
    @classmethod
    def from_upload(
        cls, owner, task: str | None, name: str, upload: File, validation: File | None = None, read_now: bool = False
    ) -> "Dataset":
        """Store an upload (and an optional validation file) and read it: now when small, on the
        "cpu" queue when large. A `task` of None is proposed from the file's columns (the
        fine-tuning API's files do not say what they are for), instruction tuning if none fits.

        Raises DatasetRejected, keeping nothing, when a file read now cannot be read as a
        dataset at all (binary, empty, broken from its first rows). Every other problem is kept
        on the dataset's page, where the user can change the mapping or replace the file.
        """
        dataset = cls(owner=owner, task=task or "sft", original_name=upload.name[:255], name=name or upload.name[:200])
        dataset._store_original(upload)
        if task is None:
            columns = peek_columns(dataset.original.path, dataset.original_name, settings.MAX_DECODED_BYTES)
            dataset.task = propose_task(columns) or "sft"
        if validation is not None:
            dataset._store_validation(validation)
        dataset.save()
        dataset.request_parse(now=read_now)
        unreadable = dataset.unreadable_file() if dataset.status == REJECTED else None
        if unreadable:
            errors = dataset.errors if unreadable == "file" else dataset.validation_report.get("errors", [])
            dataset.delete_files()
            dataset.delete()
            raise DatasetRejected(dataset.message, errors, field=unreadable)
        return dataset

    def unreadable_file(self) -> str | None:
        """The upload field ("file", "validation_file") whose file yielded no columns at all, so
        that no mapping can make anything of it; None when both could be read."""
        if not self.columns:
            return "file"
        if self.validation_report and not self.validation_report.get("columns"):
            return "validation_file"
        return None

    def replace_file(self, upload: File) -> None:
        """A corrected file in place of the original; read again with the same mapping."""
        self.check_can_change()
        self.original.delete(save=False)
        self.original_name = upload.name[:255]
        self._store_original(upload)
        self.save()
        self.request_parse()

    def set_validation_file(self, upload: File) -> None:
        self.check_can_change()
        self.validation.delete(save=False)
        self._store_validation(upload)
        self.save()
        self.request_parse()

    def remove_validation_file(self) -> None:
        self.check_can_change()
        self.validation.delete(save=False)
        self.validation_rows_path.unlink(missing_ok=True)
        self.validation_name, self.validation_size_bytes, self.validation_report = "", 0, {}
        self.save()
        self.request_parse()

    def set_column_choices(self, choices: dict[str, str]) -> None:
        """Read the file again, each judging column read as the user chose (parsing.COLUMN_CHOICES)."""
        self.check_can_change()
        self.column_choices = choices
        self.save(update_fields=["column_choices"])
        self.request_parse()

    def set_drop_media(self, drop: bool) -> None:
        """Read the file again with its images, audio and video left out (True) or refused (False)."""
        self.check_can_change()
        self.drop_media = drop
        self.save(update_fields=["drop_media"])
        self.request_parse()

    @property
    def media_refused(self) -> int:
        """How many rows were refused for their images, audio or video (the page offers to drop them)."""
        return sum(count for kind, count in self.error_counts.items()
                   if kind.rpartition(": ")[2] == conversations.MEDIA_PROBLEM)

    def set_mapping(self, mapping: dict[str, str] | None) -> None:
        """Read the file again with the user's mapping (canonical field -> column); None detects."""
        self.check_can_change()
        self.user_mapping = mapping
        self.save(update_fields=["user_mapping"])
        self.request_parse()

    def _store_original(self, upload: File) -> None:
        self.size_bytes = upload.size
        self.original.save(upload.name, upload, save=False)

    def _store_validation(self, upload: File) -> None:
        self.validation_name, self.validation_size_bytes = upload.name[:255], upload.size
        self.validation.save(upload.name, upload, save=False)

    # Reading ----------------------------------------------------------------------------
    def request_parse(self, now: bool = False) -> None:
        """Read the files now when they are small (or `now`), else queue the read on the "cpu" queue."""
        if now or self._unpacked_size() <= settings.INLINE_PARSE_BYTES:
            self.transition(PARSING)
            self.parse()
            return
        self.transition(UPLOADED, parse_sent_at=None)
        transaction.on_commit(self.send_parse)

    def send_parse(self) -> bool:
        """Put the dataset's id on the "cpu" queue to be read; False if the broker (Redis) is
        unreachable. The upload is kept either way, and the page says it waits for the queue:
        `resend_waiting` (periodic) sends it again. A second message is harmless: one claim wins."""
        from webapp.celery import send

        if not send("webapp.datasets.parse_dataset", [self.id], queue="cpu"):
            return False
        self.parse_sent_at = timezone.now()
        Dataset.objects.filter(id=self.id, status=UPLOADED).update(parse_sent_at=self.parse_sent_at)
        return True

    @property
    def waits_for_queue(self) -> bool:
        """Waiting to be read, but its id never reached the queue (the broker was down)."""
        return self.status == UPLOADED and self.parse_sent_at is None

    @classmethod
    def resend_waiting(cls, unclaimed_for: timedelta) -> int:
        """Send the datasets waiting to be read whose id never reached the queue, and again those
        still unclaimed `unclaimed_for` after they were sent (a restarted broker may have lost the
        message); how many reached the queue."""
        stale = timezone.now() - unclaimed_for
        waiting = cls.objects.filter(status=UPLOADED).filter(Q(parse_sent_at__isnull=True) | Q(parse_sent_at__lt=stale))
        return sum(dataset.send_parse() for dataset in waiting)

    def _unpacked_size(self) -> int:
        """What reading the files handles: for Parquet its uncompressed size, not the file's, so a
        small file that unpacks large is read on the queue, not in the request."""
        files = [(self.original, self.original_name)]
        if self.has_validation:
            files.append((self.validation, self.validation_name))
        return sum(unpacked_size(file.path, name) for file, name in files)

    def claim_parse(self) -> bool:
        """The background reader takes a dataset that waits to be read (or whose reader died)."""
        return self.transition(PARSING, from_states=BUSY_STATUSES)

    def parse(self) -> None:
        """Read, check and count the files with the current mapping; set the status.

        Both the request (small files) and the background task (large ones) call this. The
        result is stored only while the dataset is still being read, so a dataset deleted
        meanwhile is never brought back.
        """
        self.rows_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            result = self._read_files()
        except Exception:
            log.exception("dataset %s: reading failed", self.id)
            result = {
                "status": REJECTED,
                "message": "Reading the file failed unexpectedly. Upload it again; if it "
                "keeps failing, ask the administrator to look at the server log.",
            }
        for name, value in result.items():
            setattr(self, name, value)
        if not self.transition(result.pop("status"), from_states=[PARSING], **result):
            log.info("dataset %s changed while it was read; its result is dropped", self.id)
            if not Dataset.objects.filter(id=self.id).exists():
                self.delete_files()

    def _read_files(self) -> dict:
        report = parse_dataset(
            self.original.path,
            self.original_name,
            task=self.task,
            mapping=self.user_mapping,
            out_path=self.rows_path,
            max_decoded_bytes=settings.MAX_DECODED_BYTES,
            column_choices=self.column_choices,
            drop_media=self.drop_media,
        )
        result = {
            "format": report.format,
            "chat_format": report.chat_format or "",
            "columns": report.columns,
            "mapping": report.mapping,
            "meaning_columns": report.meaning_columns,
            "media_dropped": report.media_dropped,
            "rows_total": report.rows_total,
            "rows_ok": report.rows_ok,
            "error_counts": report.error_counts,
            "errors": [_error_dict(e) for e in report.errors],
            "preview_rows": report.preview,
            "validation_report": {},
            "message": "",
        }
        problem = self._rows_problem(report)
        validation = self._read_validation(report) if self.has_validation and not problem else {}
        result["validation_report"] = validation
        problem = problem or _validation_problem(validation)
        dropped = report.rows_total - report.rows_ok + validation.get("rows_total", 0) - validation.get("rows_ok", 0)
        if problem:
            self.rows_path.unlink(missing_ok=True)
            result.update(status=REJECTED, message=problem)
        else:
            result["status"] = REVIEW if dropped else READY
        return result

    def _rows_problem(self, report: ParseReport) -> str:
        if report.fatal:
            return report.fatal
        if not report.rows_ok:
            return _no_usable_rows(report)
        return " ".join(checks.problems(self.task, self.rows_path))

    def _read_validation(self, main: ParseReport) -> dict:
        """The validation file, read like the training file: a chat format is detected again,
        any other file must have the columns of the training file's mapping."""
        mapping = None if main.chat_format else main.mapping
        report = parse_dataset(
            self.validation.path,
            self.validation_name,
            task=self.task,
            mapping=mapping,
            out_path=self.validation_rows_path,
            max_decoded_bytes=settings.MAX_DECODED_BYTES,
            column_choices=self.column_choices,
            drop_media=self.drop_media,
        )
        if report.chat_format != main.chat_format and not report.fatal:
            report.fatal = (
                f"The validation file is in {report.chat_format or 'plain columns'} format but the training file is "
                f"in {main.chat_format or 'plain columns'} format; upload them in the same format."
            )
        return {
            "format": report.format,
            "columns": report.columns,
            "rows_total": report.rows_total,
            "rows_ok": report.rows_ok,
            "error_counts": report.error_counts,
            "errors": [_error_dict(e) for e in report.errors],
            "fatal": report.fatal or "",
            "media_dropped": report.media_dropped,
            "in_training": 0 if report.fatal or not report.rows_ok else self._validation_rows_in_training(),
        }

    def _validation_rows_in_training(self) -> int:
        """How many validation rows have an input (worker.rows.row_input) a training row also has:
        they measure memory, not generalisation, and a job may drop them from training."""
        return validation_rows_in_training(self.validation_rows_path, self.rows_path)


def _most_common_first(counts: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def _error_dict(error) -> dict:
    return {"line": error.line, "column": error.column, "problem": error.problem}


def _no_usable_rows(report: ParseReport) -> str:
    first = report.errors[0] if report.errors else None
    where = f" First problem: line {first.line}, {first.column or 'row'}: {first.problem}." if first else ""
    return f"None of the {report.rows_total} rows can be used.{where}"


def _validation_problem(validation: dict) -> str:
    if not validation:
        return ""
    if validation["fatal"]:
        return f"Validation file: {validation['fatal']}"
    if not validation["rows_ok"]:
        first = validation["errors"][0] if validation["errors"] else None
        where = (
            f" First problem: line {first['line']}, {first['column'] or 'row'}: {first['problem']}." if first else ""
        )
        return f"Validation file: none of its {validation['rows_total']} rows can be used.{where}"
    return ""
