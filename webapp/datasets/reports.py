"""Quality reports: where they are kept, and the markers of those being computed.

A report is computed for one (base model, max length) and kept as JSON beside the dataset's
files, under a name that also depends on the rows files' size and time, so a dataset read
again (new mapping, replaced file, a validation file) gets a fresh report. While a report is
computed a `.pending` marker stands in its place, recording the request (who asked, for what)
and when its message was sent and the task started. A marker sent or started more than
PENDING_SECONDS ago (a lost message, a worker that died) no longer counts and the report is
queued again. A request the queue did not take (Redis down) waits in its marker until the
periodic `resend_waiting` sends it, like a queued job. A user has at most
QUALITY_REPORTS_PER_USER reports computing at once.

The web process imports this module: it reads and writes JSON only. The report is computed on
the "cpu" queue by webapp/datasets/tasks.py (with worker/quality.py and worker/preflight.py),
which keeps it here through `mark_started` and `keep`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from django.conf import settings

from webapp.datasets.models import Dataset
from worker.catalog import catalog_for
from worker.families import FAMILIES

PENDING_SECONDS = 30 * 60
QUEUE_DOWN = "The queue is unreachable (is Redis running?); the report is computed once it is back."
MIN_LENGTH, MAX_LENGTH = 8, 32768


def base_model_choices(task: str) -> list[tuple[str, str]]:
    """The catalog models that can serve `task` (the only ones a report may name)."""
    kinds = FAMILIES[task].base_kinds
    return [(m.key, m.name) for kind in kinds for m in catalog_for(kind)]


def defaults(task: str) -> tuple[str, int]:
    """(base model, max length) a new job on this task starts with."""
    suggested = FAMILIES[task].suggested
    return suggested.base_model, suggested.max_seq_length


def choice_problem(task: str, base_model: str, max_length: int) -> str | None:
    if base_model not in dict(base_model_choices(task)):
        return f"Choose one of the base models for {FAMILIES[task].name.lower()}."
    if not MIN_LENGTH <= max_length <= MAX_LENGTH:
        return f"The max length must be between {MIN_LENGTH} and {MAX_LENGTH} tokens."
    return None


def report_path(dataset: Dataset, base_model: str, max_length: int) -> Path:
    files = [dataset.rows_path, dataset.validation_rows_path]
    stamps = [[f.stat().st_size, f.stat().st_mtime_ns] if f.is_file() else None for f in files]
    key = hashlib.sha256(json.dumps([base_model, max_length, stamps]).encode()).hexdigest()[:32]
    return dataset.rows_path.parent / "quality" / f"{key}.json"


def request_report(dataset: Dataset, base_model: str, max_length: int, user_id: int) -> dict[str, Any]:
    """The report if it is ready (state "done" or "failed"); else "computing" after queueing it
    (unless it is already on its way), or "waiting" with the reason it cannot be queued now."""
    path = report_path(dataset, base_model, max_length)
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    pending = path.with_suffix(".pending")
    if (marker := _live_marker(pending)) is not None:
        return _pending_state(marker)
    # Marked as being sent from the start, so that the periodic resend leaves it to this request.
    marker = {
        "dataset_id": dataset.id,
        "base_model": base_model,
        "max_length": max_length,
        "user_id": user_id,
        "sent_at": time.time(),
        "started_at": None,
    }
    if not _create_marker(pending, marker):  # another request queued it meanwhile
        return {"state": "computing"}
    # Counted after the marker exists, so that simultaneous requests cannot all pass.
    others = sum(1 for other in _all_markers() if other != pending and _marker_user(other) == user_id)
    if others >= settings.QUALITY_REPORTS_PER_USER:
        pending.unlink(missing_ok=True)
        return {"state": "waiting", "message": f"You have {others} reports computing; wait for one to finish."}
    return _pending_state(_send(pending, marker))


def resend_waiting() -> int:
    """Send the reports whose request never reached the queue (it was down), and again those
    sent JOB_RESEND_SECONDS ago that never started (the broker may have lost the message); drop
    the markers of reports no longer wanted. The number sent."""
    sent = 0
    for pending in _all_markers():
        marker = _live_marker(pending)
        if marker is None:
            continue
        if not _still_wanted(pending, marker):
            pending.unlink(missing_ok=True)
        elif _needs_sending(marker):
            sent += _send(pending, marker)["sent_at"] is not None
    return sent


def mark_started(dataset: Dataset, base_model: str, max_length: int) -> bool:
    """A worker starts computing the report: its marker says when. False (the marker removed)
    when the report is already kept: a second message for one report."""
    pending = report_path(dataset, base_model, max_length).with_suffix(".pending")
    if pending.with_suffix(".json").is_file():
        pending.unlink(missing_ok=True)
        return False
    if (marker := _live_marker(pending)) is not None:
        _write_marker(pending, {**marker, "started_at": time.time()})
    return True


def keep(dataset: Dataset, base_model: str, max_length: int, report: dict[str, Any]) -> None:
    """Keep a computed report (written whole) in place of its marker."""
    path = report_path(dataset, base_model, max_length)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(report), encoding="utf-8")
    os.replace(partial, path)
    path.with_suffix(".pending").unlink(missing_ok=True)


# Markers ------------------------------------------------------------------------------------
def _all_markers() -> list[Path]:
    return sorted((Path(settings.MEDIA_ROOT) / "datasets").glob("*/quality/*.pending"))


def _live_marker(pending: Path) -> dict[str, Any] | None:
    """The marker's record; None (and the marker removed) when it no longer stands for a report
    on its way: sent or started PENDING_SECONDS ago, or unreadable (an older version's)."""
    try:
        marker = json.loads(pending.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError:
        marker = None
    since = marker and (marker.get("started_at") or marker.get("sent_at"))
    if marker is None or (since is not None and time.time() - since > PENDING_SECONDS):
        pending.unlink(missing_ok=True)
        return None
    return marker


def _marker_user(pending: Path) -> int | None:
    marker = _live_marker(pending)
    return marker and marker.get("user_id")


def _pending_state(marker: dict[str, Any]) -> dict[str, str]:
    if marker.get("sent_at") is None:
        return {"state": "waiting", "message": QUEUE_DOWN}
    return {"state": "computing"}


def _needs_sending(marker: dict[str, Any]) -> bool:
    if marker.get("sent_at") is None:
        return True
    return marker.get("started_at") is None and time.time() - marker["sent_at"] > settings.JOB_RESEND_SECONDS


def _still_wanted(pending: Path, marker: dict[str, Any]) -> bool:
    """False once the dataset is gone, was read again (the report's name changed) or has the report."""
    dataset = Dataset.objects.filter(id=marker.get("dataset_id")).first()
    if dataset is None:
        return False
    path = report_path(dataset, marker["base_model"], marker["max_length"])
    return path.with_suffix(".pending") == pending and not path.is_file()


def _create_marker(pending: Path, marker: dict[str, Any]) -> bool:
    """Write the marker whole, unless one exists: only one request queues a report."""
    pending.parent.mkdir(parents=True, exist_ok=True)
    draft = _draft(pending, marker)
    try:
        os.link(draft, pending)
        return True
    except FileExistsError:
        return False
    finally:
        draft.unlink()


def _write_marker(pending: Path, marker: dict[str, Any]) -> None:
    os.replace(_draft(pending, marker), pending)


def _draft(pending: Path, marker: dict[str, Any]) -> Path:
    """The marker written whole beside `pending`, under a name of its own, to be moved into place."""
    draft = pending.with_name(f"{pending.name}.{uuid.uuid4().hex}")
    draft.write_text(json.dumps(marker), encoding="utf-8")
    return draft


def _send(pending: Path, marker: dict[str, Any]) -> dict[str, Any]:
    """Queue the report; the marker records whether the queue took it. Marked sent first: a
    worker that starts at once must not find its marker rewritten behind it."""
    from webapp.celery import send

    marker = {**marker, "sent_at": time.time(), "started_at": None}
    _write_marker(pending, marker)
    args = [marker["dataset_id"], marker["base_model"], marker["max_length"]]
    if not send("webapp.datasets.quality_report", args, queue="cpu"):
        marker["sent_at"] = None
        _write_marker(pending, marker)
    return marker
