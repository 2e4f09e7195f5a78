"""Celery tasks: claim a job, run its recipe, record the outcome.

The only module of worker/ that touches Django. The task carries nothing but the job id;
the database row says what to do and whether it still needs doing.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import traceback
import uuid
from datetime import timedelta
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


@shared_task(name="worker.tasks.train_job", acks_late=True, ignore_result=True)
def train_job(job_id: int) -> None:
    job = Job.objects.filter(id=job_id).first()
    if job is None:
        log.info("job %s no longer exists; nothing to do", job_id)
        return
    JobRunner(job).run()


@shared_task(name="worker.tasks.reap_stale_jobs", ignore_result=True)
def reap_stale_jobs() -> None:
    """Requeue (or give up on) running jobs whose worker stopped renewing its lease."""
    stale_before = timezone.now() - timedelta(seconds=settings.JOB_LEASE_SECONDS)
    for job in Job.objects.filter(state__in=RUNNING_STATES, heartbeat_at__lt=stale_before):
        if job.reap(stale_before):
            log.warning("job %s: worker %s stopped responding; now %s", job.id, job.worker_id or "?", job.state)


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
        # chart already has those points, so they are not recorded twice.
        self.recorded_until = self.job.step
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
            self._finish(FAILED, message=_internal_error_message(exc), traceback=traceback.format_exc())
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
        self.job.transition(state, where={"worker_id": WORKER_ID}, **fields)

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
            if event["kind"] in ("metric", "eval") and self.recorded_until and event["step"] <= self.recorded_until:
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


def _internal_error_message(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "The disk of the worker is full. Free space (old jobs' checkpoints and artifacts) and retry."
    if "out of memory" in str(exc).lower() or isinstance(exc, MemoryError):
        return (
            "The worker ran out of memory. Lower the batch size or the max sequence length, "
            "or use LoRA instead of a full fine-tune."
        )
    return f"Training stopped with an internal error ({type(exc).__name__}). Staff can see the traceback."

