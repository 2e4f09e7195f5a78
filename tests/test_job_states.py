import pytest

from webapp.datasets.models import Dataset
from webapp.jobs.models import Job

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
    job.transition("training", lease="worker-a")
    Job.objects.get(id=job.id).transition("cancelled", message="Cancelled by the user.")
    assert not job.transition("succeeded", lease="worker-a")
    assert job.state == "cancelled"


def test_a_worker_that_lost_its_lease_cannot_move_the_job(job):
    job.claim("worker-a")
    assert not job.transition("failed", lease="worker-b")
    assert job.transition("failed", lease="worker-a", message="bad data")
    assert job.message == "bad data"


def test_every_transition_is_an_event_with_gap_free_sequence_numbers(job):
    job.claim("w")
    job.append_events([{"kind": "metric", "step": 1, "t": 0, "loss": 2.5, "total_steps": 10}])
    job.transition("training", lease="w")
    history = job.history()
    assert [e["seq"] for e in history] == [1, 2, 3]
    assert [(e["kind"], e.get("state")) for e in history] == [("state", "preparing"), ("metric", None), ("state", "training")]
    job.refresh_from_db()
    assert (job.step, job.total_steps, job.last_loss) == (1, 10, 2.5)


def test_the_heartbeat_fails_once_the_job_is_cancelled(job):
    job.claim("w")
    assert job.beat("w")
    job.transition("cancelled")
    assert not job.beat("w")
