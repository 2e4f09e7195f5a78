"""Jobs: one fine-tune each, with an explicit state machine and a durable event history.

The row is the source of truth; Celery carries only the id. Every change of state goes
through `Job.transition`, a conditional UPDATE that also records the change as an event.
Events get a per-job sequence number under a row lock, so each job's history is gap-free
and ordered; the SSE stream uses that number as its event id.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import models, transaction
from django.db.models import F, Q
from django.urls import reverse
from django.utils import timezone

from webapp.jobs import stream
from worker.spec import TrainSpec

log = logging.getLogger(__name__)

QUEUED = "queued"
PREPARING = "preparing"
TRAINING = "training"
EVALUATING = "evaluating"
EXPORTING = "exporting"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"

RUNNING_STATES = (PREPARING, TRAINING, EVALUATING, EXPORTING)
FINAL_STATES = (SUCCEEDED, FAILED, CANCELLED)
ALLOWED = {
    QUEUED: {PREPARING, FAILED, CANCELLED},
    PREPARING: {TRAINING, QUEUED, FAILED, CANCELLED},
    TRAINING: {EVALUATING, EXPORTING, QUEUED, FAILED, CANCELLED},
    EVALUATING: {TRAINING, EXPORTING, QUEUED, FAILED, CANCELLED},
    EXPORTING: {SUCCEEDED, QUEUED, FAILED, CANCELLED},
}


class Job(models.Model):
    STATES = [(s, s) for s in (QUEUED, *RUNNING_STATES, *FINAL_STATES)]
    ACTIVE_STATES = (QUEUED, *RUNNING_STATES)
    FINAL_STATES = FINAL_STATES

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    dataset = models.ForeignKey("datasets.Dataset", on_delete=models.PROTECT)
    name = models.CharField(max_length=200)
    spec = models.JSONField()
    state = models.CharField(max_length=20, choices=STATES, default=QUEUED, db_index=True)
    message = models.TextField(blank=True, help_text="Why it failed, written for the user.")
    traceback = models.TextField(blank=True, help_text="For staff only.")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    worker_id = models.CharField(max_length=200, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True, help_text="When the job's id last reached the queue.")
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    attempts = models.IntegerField(default=0)
    event_seq = models.IntegerField(default=0)
    step = models.IntegerField(default=0)
    total_steps = models.IntegerField(default=0)
    last_loss = models.FloatField(null=True, blank=True)
    result = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("job", args=[self.id])

    # State ------------------------------------------------------------------------------
    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def is_running(self) -> bool:
        return self.state in RUNNING_STATES

    @property
    def progress_pct(self) -> float:
        if self.state == SUCCEEDED:
            return 100.0
        return 100.0 * self.step / self.total_steps if self.total_steps else 0.0

    def transition(
        self, to: str, *, message: str = "", from_states=None, where: dict | None = None, **fields: Any
    ) -> bool:
        """Move to state `to` if the current state allows it; True if this call moved it.

        The conditional UPDATE makes the check and the change one step: a late success can
        never overwrite a cancel, and two workers can never both claim a job. `where` adds
        conditions: a worker passes {"worker_id": its id} so it can only move a job it holds.
        """
        allowed_from = [s for s, targets in ALLOWED.items() if to in targets]
        if from_states is not None:
            allowed_from = [s for s in allowed_from if s in from_states]
        rows = Job.objects.filter(id=self.id, state__in=allowed_from)
        if where:
            rows = rows.filter(**where)
        now = timezone.now()
        changes: dict[str, Any] = {"state": to, **fields}
        if to in FINAL_STATES:
            # The row keeps why the job ended; other messages live in the event history.
            changes["message"] = message
            changes["finished_at"] = now
        if to == PREPARING:
            changes["started_at"] = now
        moved = rows.update(**changes) == 1
        if moved:
            self.append_events([{"kind": "state", "step": self.step, "t": time.time(), "state": to, "message": message}])
        self.refresh_from_db()
        return moved

    def claim(self, worker_id: str) -> bool:
        """Take a queued job for this worker (the lease); False if someone else has it."""
        return self.transition(
            PREPARING, from_states=[QUEUED], worker_id=worker_id, heartbeat_at=timezone.now(),
            attempts=F("attempts") + 1,
        )

    def enqueue(self) -> None:
        """Send the job's id to the train queue once the current transaction commits."""
        transaction.on_commit(self.send)

    def send(self) -> bool:
        """Put the job's id on the train queue; False if the broker (Redis) is unreachable.

        The job then stays queued, and the page says it waits for the queue: `resend_queued`
        (periodic) sends it again. A second message for one job is harmless: only one claim wins.
        """
        from kombu.exceptions import OperationalError

        from webapp.celery import app

        try:
            # By name: the web side never imports the worker's torch code. Few retries: the page
            # must not hang while the broker is down, and the periodic resend tries again.
            app.send_task("worker.tasks.train_job", args=[self.id], queue="train", retry_policy={"max_retries": 1})
        except (OperationalError, OSError) as exc:
            log.warning("job %s: the queue is unreachable (%s); it will be sent again", self.id, exc)
            Job.objects.filter(id=self.id, state=QUEUED).update(sent_at=None)
            self.sent_at = None
            return False
        self.sent_at = timezone.now()
        Job.objects.filter(id=self.id).update(sent_at=self.sent_at)
        return True

    @property
    def waits_for_queue(self) -> bool:
        """Queued, but its id never reached the queue (the broker was down): it is sent when it is back."""
        return self.state == QUEUED and self.sent_at is None

    @classmethod
    def resend_queued(cls, unclaimed_for: timedelta) -> int:
        """Send the queued jobs whose id never reached the queue (the broker was down), and again
        those still unclaimed `unclaimed_for` after they were sent (the broker may have lost the
        message in a restart); how many reached the queue."""
        stale = timezone.now() - unclaimed_for
        waiting = cls.objects.filter(state=QUEUED).filter(Q(sent_at__isnull=True) | Q(sent_at__lt=stale))
        return sum(job.send() for job in waiting)

    def reap(self, stale_before) -> bool:
        """Requeue a job whose worker stopped renewing its lease, or fail it after too many tries."""
        where = {"heartbeat_at__lt": stale_before}
        if self.attempts < settings.JOB_MAX_ATTEMPTS:
            message = (
                f"The worker stopped responding; the job was queued again "
                f"(attempt {self.attempts + 1} of {settings.JOB_MAX_ATTEMPTS})."
            )
            with transaction.atomic():
                moved = self.transition(QUEUED, where=where, message=message, worker_id="")
                if moved:
                    self.enqueue()
            return moved
        return self.transition(
            FAILED, where=where,
            message=f"The worker running this job stopped responding {self.attempts} times; giving up. "
            "Check the worker machine (memory, disk, GPU) and retry the job.",
        )

    def beat(self, worker_id: str) -> bool:
        """Renew the lease; False when it is gone (cancelled, reaped, finished)."""
        return Job.objects.filter(id=self.id, worker_id=worker_id, state__in=RUNNING_STATES).update(
            heartbeat_at=timezone.now()
        ) == 1

    # Events -----------------------------------------------------------------------------
    def append_events(self, events: list[dict[str, Any]]) -> list[JobEvent]:
        """Record events durably with the next sequence numbers, then publish them live."""
        with transaction.atomic():
            job = Job.objects.select_for_update().get(id=self.id)
            rows = []
            for event in events:
                job.event_seq += 1
                rows.append(JobEvent(job_id=job.id, seq=job.event_seq, kind=event["kind"], step=event.get("step", 0), data=event))
                job._absorb(event)
            JobEvent.objects.bulk_create(rows)
            Job.objects.filter(id=job.id).update(
                event_seq=job.event_seq, step=job.step, total_steps=job.total_steps, last_loss=job.last_loss
            )
            transaction.on_commit(lambda: stream.publish(job.id, [row.payload for row in rows]))
        self.event_seq, self.step, self.total_steps, self.last_loss = job.event_seq, job.step, job.total_steps, job.last_loss
        return rows

    def _absorb(self, event: dict[str, Any]) -> None:
        """Keep the list page's columns (progress, last loss) in step with the events."""
        if event["kind"] == "metric":
            self.step = max(self.step, event["step"])
            self.total_steps = event.get("total_steps", self.total_steps)
            if "loss" in event:
                self.last_loss = event["loss"]

    def recorded_steps(self) -> dict[str, int]:
        """The latest recorded step of each kind of step event ("metric", "eval": 0 is the
        baseline); a kind with no event is absent."""
        latest = self.events.filter(kind__in=("metric", "eval")).values("kind").annotate(last=models.Max("step"))
        return {row["kind"]: row["last"] for row in latest}

    def history(self) -> list[dict[str, Any]]:
        return [e.payload for e in self.events.order_by("seq")]

    # Spec and files ---------------------------------------------------------------------
    @property
    def output_dir(self) -> Path:
        return Path(settings.JOBS_ROOT) / str(self.id)

    def train_spec(self) -> TrainSpec:
        return TrainSpec.from_dict(
            {**self.spec, "job_id": self.id, "dataset_path": str(self.dataset.rows_path), "output_dir": str(self.output_dir)}
        )

    @property
    def artifact_zip(self) -> Path | None:
        path = self.result.get("artifact_zip")
        return Path(path) if path and Path(path).is_file() else None


class JobEvent(models.Model):
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="events")
    seq = models.IntegerField()
    kind = models.CharField(max_length=20)
    step = models.IntegerField(default=0)
    data = models.JSONField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["job", "seq"], name="one_event_per_seq")]
        ordering = ["seq"]

    @property
    def payload(self) -> dict[str, Any]:
        return {**self.data, "seq": self.seq}
