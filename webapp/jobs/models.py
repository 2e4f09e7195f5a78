"""Jobs: one fine-tune each, with an explicit state machine and a durable event history.

The row is the source of truth; Celery carries only the id. Every change of state goes
through `Job.transition`, a conditional UPDATE that also records the change as an event.
Events get a per-job sequence number under a row lock, so each job's history is gap-free
and ordered; the SSE stream uses that number as its event id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import models, transaction
from django.db.models import F, Q
from django.urls import reverse
from django.utils import timezone

from webapp.jobs import stream
from webapp.jobs.signals import job_finished
from worker.events import make_event
from worker.spec import EvalSpec, SpecError, TrainSpec

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
TRAIN = "train"
EVALUATE = "evaluate"
"""Job kinds: a fine-tune (a recipe), or an evaluation of models on a test set (worker.evaluation)."""
FINAL_STATES = (SUCCEEDED, FAILED, CANCELLED)
JOB_BASE_PREFIX = "job:"
"""A base model named by job: `job:<id>`, one of the owner's own succeeded jobs."""
ALLOWED = {
    QUEUED: {PREPARING, FAILED, CANCELLED},
    PREPARING: {TRAINING, EVALUATING, QUEUED, FAILED, CANCELLED},  # an evaluation job goes straight to evaluating
    TRAINING: {EVALUATING, EXPORTING, QUEUED, FAILED, CANCELLED},
    EVALUATING: {TRAINING, EXPORTING, QUEUED, FAILED, CANCELLED},
    EXPORTING: {SUCCEEDED, QUEUED, FAILED, CANCELLED},
}


class LeaseLost(Exception):
    """The worker no longer holds the job (cancelled, reaped, or taken by another attempt)."""


@dataclass(frozen=True)
class Lease:
    """What a worker holds while it runs a job: its id and the attempt it claimed. Every write the
    worker makes is conditional on both, so an attempt that was reaped can write nothing more
    even after the same worker claims the job again."""

    worker_id: str
    attempt: int

    @property
    def where(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "attempts": self.attempt, "state__in": RUNNING_STATES}


class JobGroup(models.Model):
    """The runs of one sweep: jobs that differ in the swept settings only, compared on one page."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    name = models.CharField(max_length=200)
    swept = models.JSONField(default=dict, help_text="Setting -> the values the sweep tried.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("job_group", args=[self.id])

    def cancel(self) -> int:
        """Cancel every run still queued or running; how many it cancelled."""
        return sum(job.transition(CANCELLED, message="Cancelled with its sweep.")
                   for job in self.jobs.filter(state__in=Job.ACTIVE_STATES))


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
    # What the fine-tuning API was given besides the settings (webapp/api/fine_tuning.py).
    suffix = models.CharField(max_length=64, blank=True, help_text="Part of the fine-tuned model's name.")
    metadata = models.JSONField(default=dict, blank=True, help_text="The API caller's key-value pairs.")
    kind = models.CharField(max_length=10, choices=[(TRAIN, "training"), (EVALUATE, "evaluation")], default=TRAIN,
                            db_index=True, help_text="A fine-tune, or an evaluation of models on the dataset.")
    group = models.ForeignKey(JobGroup, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs",
                              help_text="The sweep this job is a run of.")
    validation_dataset = models.ForeignKey(
        "datasets.Dataset", null=True, blank=True, on_delete=models.PROTECT, related_name="validation_jobs",
        help_text="A separate file held out (the API's validation_file); else the dataset's own, or a share.",
    )

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("job", args=[self.id])

    @classmethod
    def start(cls, owner, dataset, spec: dict[str, Any], name: str, **fields: Any) -> Job:
        """A new queued job with its first event, sent to the train queue once the transaction
        commits: the one way the new-job form and the fine-tuning API start a job."""
        with transaction.atomic():
            job = cls.objects.create(owner=owner, dataset=dataset, spec=spec, name=name, **fields)
            job.append_events([make_event("state", 0, t=job.created_at.timestamp(), state=job.state, message="")])
            job.enqueue()
        return job

    # State ------------------------------------------------------------------------------
    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

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
        # One transaction: nobody reads the new state without the event that records it (a page
        # or a test could see "succeeded" while the history still ended at "exporting").
        with transaction.atomic():
            moved = rows.update(**changes) == 1
            if moved:
                self.append_events([make_event("state", self.step, state=to, message=message)])
                if to in FINAL_STATES:
                    transaction.on_commit(lambda: job_finished.send(sender=Job, job=self))
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
        from webapp.celery import send

        if not send("webapp.jobs.train_job", [self.id], queue="train"):
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
        return self.requeue("The worker stopped responding", where={"heartbeat_at__lt": stale_before})

    def requeue(self, reason: str, where: dict[str, Any]) -> bool:
        """Queue a running job again (`where` decides whether it still may be), or fail it once it
        has had all its attempts; True if this call moved it."""
        if self.attempts < settings.JOB_MAX_ATTEMPTS:
            message = f"{reason}; the job was queued again (attempt {self.attempts + 1} of {settings.JOB_MAX_ATTEMPTS})."
            with transaction.atomic():
                moved = self.transition(QUEUED, where=where, message=message, worker_id="")
                if moved:
                    self.enqueue()
            return moved
        return self.transition(
            FAILED, where=where,
            message=f"{reason} {self.attempts} times; giving up. "
            "Check the worker machine (memory, disk, GPU, its connection to the database) and retry the job.",
        )

    def beat(self, lease: Lease) -> bool:
        """Renew the lease; False when it is gone (cancelled, reaped, finished)."""
        return Job.objects.filter(id=self.id, **lease.where).update(heartbeat_at=timezone.now()) == 1

    # Events -----------------------------------------------------------------------------
    def append_events(self, events: list[dict[str, Any]], lease: Lease | None = None) -> list[JobEvent]:
        """Record events durably with the next sequence numbers, then publish them live.

        A worker passes its `lease`: the events are recorded only while it still holds the job,
        checked under the same row lock that numbers them (else LeaseLost, and nothing is written).
        """
        with transaction.atomic():
            job = Job.objects.select_for_update().filter(id=self.id, **(lease.where if lease else {})).first()
            if job is None:
                raise LeaseLost(f"job {self.id} is no longer held by {lease}")
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

    def attempt_dir(self, attempt: int) -> Path:
        """The working folder of one attempt (checkpoints, the model before it is published): a
        reaped attempt that still runs can never overwrite what the next one writes."""
        from worker.attempts import folder_of

        return folder_of(self.output_dir, attempt)

    @property
    def final_dir(self) -> Path:
        """Where a succeeded job's model (or adapter) lives."""
        return self.output_dir / "final"

    @property
    def holds_model(self) -> bool:
        """Whether the job's result is a whole model (not an adapter) that a new job can build on."""
        return (self.final_dir / "config.json").is_file() and any(self.final_dir.glob("*.safetensors"))

    @classmethod
    def models_of(cls, user, limit: int = 50) -> list[Job]:
        """The user's succeeded jobs that a new job can use as its base, newest first."""
        jobs = cls.objects.filter(owner=user, state=SUCCEEDED, kind=TRAIN).order_by("-finished_at", "-id")[:limit]
        return [job for job in jobs if job.holds_model]

    def parent(self) -> Job | None:
        """The job whose model this job builds on (base_model "job:<id>"), the owner's own only."""
        base = self.spec.get("base_model", "")
        if not base.startswith(JOB_BASE_PREFIX) or not base[len(JOB_BASE_PREFIX):].isdigit():
            return None
        return Job.objects.filter(
            id=int(base[len(JOB_BASE_PREFIX):]), id__lt=self.id, owner_id=self.owner_id, state=SUCCEEDED
        ).first()

    def lineage(self) -> tuple[str, list[Job]]:
        """Where the job's model descends from: the root base (a catalog key or a folder) and the
        jobs in between, oldest first (base → job 12 → job 31 for job 31 built on job 12)."""
        ancestors: list[Job] = []
        job = self.parent()
        while job is not None and job not in ancestors:
            ancestors.insert(0, job)
            job = job.parent()
        root = (ancestors[0] if ancestors else self).spec.get("base_model", "")
        return root, ancestors

    def base_kind(self) -> str | None:
        """The catalog kind (causal-lm, encoder) the job's model descends from; None if unknown."""
        from worker.catalog import CATALOG

        base = self.spec.get("base_model", "")
        if base in CATALOG:
            return CATALOG[base].kind
        parent = self.parent()
        return parent.base_kind() if parent else None

    def train_spec(self) -> TrainSpec:
        """The spec the worker runs: the job's own settings and files, the working folder of its
        current attempt, and a base named by job resolved to that job's model folder."""
        base = self.spec["base_model"]
        if base.startswith(JOB_BASE_PREFIX):
            parent = self.parent()
            if parent is None or not parent.holds_model:
                raise SpecError("base_model", f"the model of job {base[len(JOB_BASE_PREFIX):]}, which this job "
                                              "builds on, is no longer there")
            base = str(parent.final_dir)
        return TrainSpec.from_dict({
            **self.spec, "base_model": base, "job_id": self.id, "dataset_path": str(self.dataset.rows_path),
            "output_dir": str(self.attempt_dir(self.attempts)),
        })

    @property
    def is_evaluation(self) -> bool:
        return self.kind == EVALUATE

    def eval_spec(self):
        """The evaluation the worker runs (worker.evaluation.EvalSpec): the spec's models, the
        dataset's rows as the test set, the current attempt's folder."""
        return EvalSpec.from_dict({
            **{key: self.spec[key] for key in ("task", "models", "batch_size", "max_seq_length")},
            "dataset_path": str(self.dataset.rows_path), "output_dir": str(self.attempt_dir(self.attempts)),
            "job_id": self.id,
        })

    @property
    def artifact_zip(self) -> Path | None:
        path = self.result.get("artifact_zip")
        return Path(path) if path and Path(path).is_file() else None

    def checkpoint_zip(self, step: int) -> Path | None:
        """The zip of the checkpoint at `step` the job kept for download (worker.snapshots), if any."""
        for entry in self.result.get("checkpoints") or []:
            if entry.get("step") == step and entry.get("zip") and Path(entry["zip"]).is_file():
                return Path(entry["zip"])
        return None


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
