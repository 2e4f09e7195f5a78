"""Celery tasks: claim a job, run its recipe, record the outcome.

The only module of worker/ that touches Django. The task carries nothing but the job id;
the database row says what to do and whether it still needs doing.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import threading
import traceback
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery import shared_task
from django import db
from django.conf import settings
from django.utils import timezone

from webapp.jobs.models import CANCELLED, FAILED, RUNNING_STATES, SUCCEEDED, Job
from worker.errors import Cancelled, UserError
from worker.events import Reporter

log = logging.getLogger(__name__)

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
DISK_FULL_BYTES = 16 * 1024**2  # a failed job on a disk with less room than this failed for want of it


@shared_task(name="worker.tasks.train_job", acks_late=True, ignore_result=True)
def train_job(job_id: int) -> None:
    job = Job.objects.filter(id=job_id).first()
    if job is None:
        log.info("job %s no longer exists; nothing to do", job_id)
        return
    JobRunner(job).run()


# The periodic tasks are acknowledged on receipt (acks_late off): a missed run is redone by the
# next one, and a message left unacknowledged when Redis goes away crashes the CPU worker as it
# reconnects (kombu restores unacknowledged messages on a connection that is already gone).
@shared_task(name="worker.tasks.reap_stale_jobs", ignore_result=True, acks_late=False)
def reap_stale_jobs() -> None:
    """Requeue (or give up on) running jobs whose worker stopped renewing its lease."""
    stale_before = timezone.now() - timedelta(seconds=settings.JOB_LEASE_SECONDS)
    for job in Job.objects.filter(state__in=RUNNING_STATES, heartbeat_at__lt=stale_before):
        if job.reap(stale_before):
            log.warning("job %s: worker %s stopped responding; now %s", job.id, job.worker_id or "?", job.state)


@shared_task(name="worker.tasks.resend_queued_jobs", ignore_result=True, acks_late=False)
def resend_queued_jobs() -> None:
    """Send the queued jobs whose message never reached the broker (it was down) or was lost."""
    sent = Job.resend_queued(unclaimed_for=timedelta(seconds=settings.JOB_RESEND_SECONDS))
    if sent:
        log.info("sent %d queued jobs to the train queue again", sent)


class JobRunner:
    """Runs one claimed job from start to a final state."""

    def __init__(self, job: Job):
        self.job = job
        self.reporter = Reporter(sink=self.deliver, on_thread_exit=db.connections.close_all)
        self.finished = threading.Event()

    def run(self) -> None:
        if not self.job.claim(WORKER_ID):
            log.info("job %s is %s and not ours to run; nothing to do", self.job.id, self.job.state)
            self.reporter.close()
            return
        # A requeued job resumes from its last checkpoint and replays the steps after it; the
        # chart already has those points (and the step-0 baseline), so they are not recorded twice.
        self.recorded_until = self.job.recorded_steps()
        heartbeat = threading.Thread(target=self._keep_lease, name="heartbeat", daemon=True)
        heartbeat.start()
        try:
            result = self._run_recipe()
        except Cancelled:
            self._finish(CANCELLED, message="Cancelled.")
        except UserError as exc:
            self._finish(FAILED, message=str(exc))
        except Exception as exc:
            log.exception("job %s crashed", self.job.id)
            message = _internal_error_message(exc, self.job.output_dir)
            self._finish(FAILED, message=message, traceback=traceback.format_exc())
        else:
            self._finish(SUCCEEDED, result=result)
        finally:
            self.finished.set()

    def _run_recipe(self) -> dict[str, Any]:
        # Imported here: torch loads in the worker process only when a job runs.
        from worker.artifacts import artifact_name, zip_dir
        from worker.run import run_spec

        spec = self.job.train_spec()
        self.job.output_dir.mkdir(parents=True, exist_ok=True)
        result = run_spec(spec, self.reporter)
        zip_path = self.job.output_dir / f"{artifact_name(spec)}.zip"
        result["artifact_zip"] = str(zip_dir(result["artifact_dir"], zip_path))
        return result

    def _finish(self, state: str, **fields: Any) -> None:
        self.reporter.close()
        if self.job.transition(state, where={"worker_id": WORKER_ID}, **fields):
            # A finished job never resumes: its checkpoints only take disk space. (A job that
            # lost its lease may be resuming on another worker; its checkpoints stay.)
            from worker.checkpoints import discard

            discard(self.job.output_dir)

    def _keep_lease(self) -> None:
        try:
            while not self.finished.wait(settings.JOB_HEARTBEAT_SECONDS):
                if not self.job.beat(WORKER_ID):
                    log.info("job %s: lease gone (cancelled or reaped); stopping", self.job.id)
                    self.reporter.stop_requested.set()
                    return
        finally:
            db.connection.close()

    def deliver(self, events: list[dict[str, Any]]) -> None:
        """The Reporter's sink: state events become transitions, the rest are appended."""
        pending: list[dict[str, Any]] = []
        for event in events:
            if self._recorded(event):
                continue
            if event["kind"] != "state":
                pending.append(event)
                continue
            if pending:
                self.job.append_events(pending)
                pending = []
            if event["state"] != self.job.state and not self.job.transition(event["state"], where={"worker_id": WORKER_ID}):
                self.reporter.stop_requested.set()
        if pending:
            self.job.append_events(pending)

    def _recorded(self, event: dict[str, Any]) -> bool:
        """Whether a metric or eval event replays a step the job's history already holds. Per
        kind: a recipe may report a step's evaluation before its loss, and die in between."""
        last = self.recorded_until.get(event["kind"])
        return last is not None and event["step"] <= last


def _internal_error_message(exc: Exception, output_dir: Path) -> str:
    if _disk_full(exc, output_dir):
        return (
            f"The disk is full on the worker (where jobs write checkpoints and models: {settings.JOBS_ROOT}). "
            "Free space there (the folders of old jobs you no longer need) or give the worker a larger disk, then retry."
        )
    if "out of memory" in str(exc).lower() or isinstance(exc, MemoryError):
        return (
            "The worker ran out of memory. Lower the batch size or the max sequence length, "
            "or use LoRA instead of a full fine-tune."
        )
    return f"Training stopped with an internal error ({type(exc).__name__}). Staff can see the traceback."


def _disk_full(exc: BaseException | None, output_dir: Path) -> bool:
    """ENOSPC anywhere in the exception's chain, however a library reworded it (safetensors says
    "os error 28"), or no room left on the job's disk after the failure (torch.save's message
    names no cause: "unexpected pos 5120 vs 5012")."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if any(words in str(exc) for words in ("No space left on device", "os error 28")):
            return True
        exc = exc.__cause__ or exc.__context__
    try:
        return shutil.disk_usage(output_dir).free < DISK_FULL_BYTES
    except OSError:
        return False

