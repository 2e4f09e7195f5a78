from datetime import timedelta

import pytest
from django.utils import timezone

from webapp.datasets.models import Dataset
from webapp.jobs.models import Job, Lease

pytestmark = pytest.mark.django_db


@pytest.fixture
def job(owner):
    dataset = Dataset.objects.create(owner=owner, name="d", original_name="d.jsonl", format="jsonl")
    return Job.objects.create(owner=owner, dataset=dataset, name="j", spec={"base_model": "x", "method": "lora"})


def test_only_one_worker_can_claim_a_job(job):
    assert job.claim("worker-a")
    assert not Job.objects.get(id=job.id).claim("worker-b")
    job.refresh_from_db()
    assert job.state == "preparing" and job.worker_id == "worker-a" and job.attempts == 1


def test_final_states_never_change(job):
    assert job.transition("cancelled")
    for state in ("queued", "preparing", "training", "succeeded", "failed"):
        assert not job.transition(state)
    assert job.state == "cancelled"


def test_a_late_success_cannot_overwrite_a_cancel(job):
    job.claim("worker-a")
    job.transition("training", where={"worker_id": "worker-a"})
    Job.objects.get(id=job.id).transition("cancelled", message="Cancelled by the user.")
    assert not job.transition("succeeded", where={"worker_id": "worker-a"})
    assert job.state == "cancelled"


def test_a_worker_that_lost_its_lease_cannot_move_the_job(job):
    job.claim("worker-a")
    assert not job.transition("failed", where={"worker_id": "worker-b"})
    assert job.transition("failed", where={"worker_id": "worker-a"}, message="bad data")
    assert job.message == "bad data"


def test_every_transition_is_an_event_with_gap_free_sequence_numbers(job):
    job.claim("w")
    job.append_events([{"kind": "metric", "step": 1, "t": 0, "loss": 2.5, "total_steps": 10}])
    job.transition("training", where={"worker_id": "w"})
    history = job.history()
    assert [e["seq"] for e in history] == [1, 2, 3]
    assert [(e["kind"], e.get("state")) for e in history] == [("state", "preparing"), ("metric", None), ("state", "training")]
    job.refresh_from_db()
    assert (job.step, job.total_steps, job.last_loss) == (1, 10, 2.5)


def test_the_heartbeat_fails_once_the_job_is_cancelled(job):
    job.claim("w")
    assert job.beat(Lease("w", job.attempts))
    job.transition("cancelled")
    assert not job.beat(Lease("w", job.attempts))


def test_the_reaper_requeues_a_job_whose_worker_went_silent(
    job, settings, train_queue, django_capture_on_commit_callbacks
):
    job.claim("w")
    Job.objects.filter(id=job.id).update(heartbeat_at=timezone.now() - timedelta(minutes=5))
    with django_capture_on_commit_callbacks(execute=True):
        assert job.reap(timezone.now() - timedelta(seconds=settings.JOB_LEASE_SECONDS))
    assert job.state == "queued" and job.worker_id == ""
    assert [m["argsrepr"] for m in train_queue()] == [f"[{job.id}]"]
    assert "queued again (attempt 2 of 3)" in job.history()[-1]["message"]


def test_the_reaper_leaves_a_job_with_a_fresh_heartbeat_alone(job, settings):
    job.claim("w")
    assert not job.reap(timezone.now() - timedelta(seconds=settings.JOB_LEASE_SECONDS))
    assert job.state == "preparing"


def test_the_reaper_gives_up_after_the_last_attempt(job, settings):
    settings.JOB_MAX_ATTEMPTS = 1
    job.claim("w")
    Job.objects.filter(id=job.id).update(heartbeat_at=timezone.now() - timedelta(minutes=5))
    assert job.reap(timezone.now() - timedelta(seconds=settings.JOB_LEASE_SECONDS))
    assert job.state == "failed" and "stopped responding 1 times" in job.message


def test_a_state_change_and_its_event_are_recorded_together(job, monkeypatch):
    def fail(events, lease=None):
        raise RuntimeError("the event could not be recorded")

    monkeypatch.setattr(job, "append_events", fail)
    with pytest.raises(RuntimeError):
        job.transition("cancelled")
    stored = Job.objects.get(id=job.id)
    assert stored.state == "queued" and not stored.events.exists()
