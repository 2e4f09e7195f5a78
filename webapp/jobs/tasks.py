"""The jobs' Celery tasks: claim a job, run its recipe, record the outcome; reap and resend.

Glue between the Job model and the worker's recipes, run only inside Celery worker processes
(found by autodiscover_tasks); nothing else in the app imports it. The task carries nothing but the job id;
the database row says what to do and whether it still needs doing.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import threading
import time
import traceback
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery import shared_task
from django import db
from django.conf import settings
from django.utils import timezone

from webapp.jobs.models import CANCELLED, FAILED, FINAL_STATES, RUNNING_STATES, SUCCEEDED, Job, Lease, LeaseLost
from worker.errors import Cancelled, UserError
from worker.events import Reporter
from worker.spec import SpecError

log = logging.getLogger(__name__)

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
DISK_FULL_BYTES = 16 * 1024**2  # a failed job on a disk with less room than this failed for want of it


@shared_task(name="webapp.jobs.train_job", acks_late=True, ignore_result=True)
def train_job(job_id: int) -> None:
    job = Job.objects.filter(id=job_id).first()
    if job is None:
        log.info("job %s no longer exists; nothing to do", job_id)
        return
    JobRunner(job).run()


# The periodic tasks are acknowledged on receipt (acks_late off): a missed run is redone by the
# next one, and a message left unacknowledged when Redis goes away crashes the CPU worker as it
# reconnects (kombu restores unacknowledged messages on a connection that is already gone).
@shared_task(name="webapp.jobs.reap_stale_jobs", ignore_result=True, acks_late=False)
def reap_stale_jobs() -> None:
    """Requeue (or give up on) running jobs whose worker stopped renewing its lease; clear up after ended ones."""
    stale_before = timezone.now() - timedelta(seconds=settings.JOB_LEASE_SECONDS)
    for job in Job.objects.filter(state__in=RUNNING_STATES, heartbeat_at__lt=stale_before):
        if job.reap(stale_before):
            log.warning("job %s: worker %s stopped responding; now %s", job.id, job.worker_id or "?", job.state)
    discard_finished_work()


def discard_finished_work() -> None:
    """Delete the working files (checkpoints) of jobs that ended without their worker cleaning
    up: cancelled while queued or while its worker was away, or the worker died after the end."""
    from worker import attempts

    with_files = attempts.jobs_with_working_files(settings.JOBS_ROOT)
    for job_id in Job.objects.filter(id__in=with_files, state__in=FINAL_STATES).values_list("id", flat=True):
        attempts.discard(Path(settings.JOBS_ROOT) / str(job_id))


@shared_task(name="webapp.jobs.resend_queued_jobs", ignore_result=True, acks_late=False)
def resend_queued_jobs() -> None:
    """Send the queued jobs whose message never reached the broker (it was down) or was lost."""
    sent = Job.resend_queued(unclaimed_for=timedelta(seconds=settings.JOB_RESEND_SECONDS))
    if sent:
        log.info("sent %d queued jobs to the train queue again", sent)


class JobRunner:
    """Runs one claimed job from start to a final state.

    While it runs, two threads watch the lease: the heartbeat renews it, and the watchdog (which
    never touches the database, so a stalled database cannot stall it) stops the recipe when no
    renewal has succeeded for SPECIALIST_LEASE_GRACE_SECONDS, less than the lease: a worker
    that cannot prove it holds the job stops before the reaper can give the job to another.
    Every write (events, the outcome, the published model) is conditional on the lease.
    """

    def __init__(self, job: Job):
        self.job = job
        self.reporter = Reporter(sink=self.deliver, on_thread_exit=db.connections.close_all)
        self.finished = threading.Event()
        self.lease: Lease | None = None
        self.renewed_at = time.monotonic()
        self.stopped_because = ""
        """Why the watchdog stopped the recipe (the lease could not be renewed, the time limit)."""

    def run(self) -> None:
        if not self.job.claim(WORKER_ID):
            log.info("job %s is %s and not ours to run; nothing to do", self.job.id, self.job.state)
            self.reporter.close()
            return
        self.lease = Lease(WORKER_ID, self.job.attempts)
        # A requeued job resumes from its last checkpoint and replays the steps after it; the
        # chart already has those points (and the step-0 baseline), so they are not recorded twice.
        self.recorded_until = self.job.recorded_steps()
        self.started = self.renewed_at = time.monotonic()
        for target, name in ((self._keep_lease, "heartbeat"), (self._watch, "watchdog")):
            threading.Thread(target=target, name=name, daemon=True).start()
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
        from worker import attempts
        from worker.artifacts import artifact_name, zip_dir
        from worker.run import load_recipe

        if self.job.is_evaluation:
            from worker import evaluation

            attempts.prepare(self.job.output_dir, self.lease.attempt)
            return evaluation.run(self.job.eval_spec(), self.reporter)
        try:
            spec = self.job.train_spec()
        except SpecError as exc:
            raise UserError(f"The job cannot start: {exc.message}.") from exc
        recipe = load_recipe(spec.task)
        folder = attempts.prepare(self.job.output_dir, self.lease.attempt)
        result = recipe.run(spec, self.reporter)
        zip_path = folder / f"{artifact_name(spec)}.zip"
        result["artifact_zip"] = str(zip_dir(result["artifact_dir"], zip_path))
        return result

    def _finish(self, state: str, **fields: Any) -> None:
        from worker import attempts

        self.reporter.close()
        if self.stopped_because == LEASE_EXPIRED:
            self._hand_back()
            return
        if self.stopped_because == TIME_LIMIT and state == CANCELLED:
            state, fields = FAILED, {"message": _time_limit_message()}
        if state == SUCCEEDED:
            if not self.job.beat(self.lease):
                log.info("job %s: lease gone before publishing; the model is not published", self.job.id)
                return
            fields["result"] = attempts.publish(self.job.attempt_dir(self.lease.attempt), self.job.output_dir,
                                                fields["result"])
        moved = self.job.transition(state, where=self.lease.where, **fields)
        if not moved and state == SUCCEEDED:
            attempts.unpublish(self.job.output_dir, fields["result"])
        if self.job.is_final:
            # A finished job never resumes: its working files only take disk space. (A job that
            # lost its lease may be resuming elsewhere; the next attempt takes what it needs.)
            attempts.discard(self.job.output_dir)

    def _hand_back(self) -> None:
        """The lease could not be renewed for the grace period and the recipe stopped: queue the
        job again at once if the database is back and the lease still ours, else the reaper will."""
        silent = settings.JOB_LEASE_GRACE_SECONDS
        reason = f"The worker could not reach the database for {silent} s and stopped"
        try:
            if self.job.requeue(reason, where=self.lease.where):
                log.warning("job %s: lease not renewed for %s s; queued again", self.job.id, silent)
        except Exception as exc:  # the database is still away: the reaper requeues it later
            log.warning("job %s: lease not renewed for %s s; stopped (%s)", self.job.id, silent, exc)

    def _keep_lease(self) -> None:
        try:
            while not self.finished.wait(settings.JOB_HEARTBEAT_SECONDS):
                try:
                    held = self.job.beat(self.lease)
                except Exception as exc:  # a stalled or unreachable database: try again, the watchdog decides
                    log.warning("job %s: could not renew the lease (%s)", self.job.id, exc)
                    db.connection.close_if_unusable_or_obsolete()
                    continue
                if not held:
                    log.info("job %s: lease gone (cancelled or reaped); stopping", self.job.id)
                    self.reporter.stop_requested.set()
                    return
                self.renewed_at = time.monotonic()
        finally:
            db.connection.close()

    def _watch(self) -> None:
        while not self.finished.wait(WATCH_SECONDS):
            now = time.monotonic()
            if now - self.renewed_at > settings.JOB_LEASE_GRACE_SECONDS:
                self._stop(LEASE_EXPIRED, "job %s: lease not renewed for %.0f s; stopping", now - self.renewed_at)
                return
            if now - self.started > settings.JOB_MAX_SECONDS:
                self._stop(TIME_LIMIT, "job %s: ran past the limit of %s s; stopping", settings.JOB_MAX_SECONDS)
                return

    def _stop(self, because: str, message: str, value: float) -> None:
        log.warning(message, self.job.id, value)
        self.stopped_because = because
        self.reporter.stop_requested.set()

    def deliver(self, events: list[dict[str, Any]]) -> None:
        """The Reporter's sink: state events become transitions, the rest are appended, each only
        while this attempt holds the lease."""
        pending: list[dict[str, Any]] = []
        try:
            for event in events:
                if self._recorded(event):
                    continue
                if event["kind"] != "state":
                    pending.append({**event, "attempt": self.lease.attempt})
                    continue
                if pending:
                    self.job.append_events(pending, lease=self.lease)
                    pending = []
                if event["state"] != self.job.state and not self.job.transition(event["state"], where=self.lease.where):
                    raise LeaseLost(f"job {self.job.id} left {self.job.state} without us")
            if pending:
                self.job.append_events(pending, lease=self.lease)
        except LeaseLost:
            log.info("job %s: lease gone; %d events not recorded, stopping", self.job.id, len(events))
            self.reporter.stop_requested.set()

    def _recorded(self, event: dict[str, Any]) -> bool:
        """Whether a metric or eval event replays a step the job's history already holds. Per
        kind: a recipe may report a step's evaluation before its loss, and die in between."""
        last = self.recorded_until.get(event["kind"])
        return last is not None and event["step"] <= last


LEASE_EXPIRED, TIME_LIMIT = "lease expired", "time limit"
WATCH_SECONDS = 0.5


def _time_limit_message() -> str:
    hours = settings.JOB_MAX_SECONDS / 3600
    return (
        f"The job ran longer than this server's limit of {hours:g} hours (SPECIALIST_MAX_JOB_SECONDS) and was "
        "stopped. Train fewer steps or epochs, or ask the administrator to raise the limit."
    )


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

