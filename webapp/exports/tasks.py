"""The exports' Celery task, on the "cpu" queue: build one export of a succeeded job.

Glue between the Export model and the worker's export code (worker.exports, worker.gguf_export:
torch, peft, gguf), run only inside Celery worker processes (found by autodiscover_tasks);
nothing else in the app imports it. The web side queues it by name (Export.send).
"""

from __future__ import annotations

import logging
import threading
import time

from celery import shared_task

from webapp.exports.models import Export
from worker.errors import UserError
from worker.spec import SpecError

log = logging.getLogger(__name__)

_BUILDING = threading.Lock()
"""The cpu worker runs its tasks on threads: one export at a time holds a whole model in memory
(and transformers' lazy imports are not thread-safe)."""


@shared_task(name="webapp.exports.build_export", acks_late=True, ignore_result=True)
def build_export(export_id: int) -> None:
    """Build a queued export; one already claimed (a duplicate delivery) or deleted is left alone."""
    export = Export.objects.select_related("job").filter(id=export_id).first()
    if export is None or not export.claim():
        log.info("export %s is not waiting to be built; nothing to do", export_id)
        return
    started = time.monotonic()
    try:
        with _BUILDING:
            zip_path = _build(export)
    except (UserError, SpecError) as exc:
        export.fail(str(exc))
        log.info("export %s refused: %s", export_id, exc)
        return
    except Exception:
        log.exception("export %s failed", export_id)
        export.fail("The export failed on the server (an internal error, logged for the administrator). Try again.")
        return
    export.finish(zip_path)
    log.info("export %s ready in %.1f s: %s (%d bytes)", export_id, time.monotonic() - started, zip_path,
             export.size_bytes)


def _build(export: Export):
    from worker.exports import build

    job = export.job
    return build(export.kind, job.final_dir, job.train_spec().base_model, export.folder, export.name)
