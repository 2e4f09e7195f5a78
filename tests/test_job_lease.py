"""The lease fences every write a worker makes: an attempt that was reaped or cancelled records no
event, no state and publishes no model, even when the same worker claims the job again; each
attempt works in a folder of its own and the next one starts from its newest signed checkpoint."""

from datetime import timedelta

import pytest
from django.utils import timezone

from tests.test_checkpoints import make_checkpoint
from webapp.datasets.models import Dataset
from webapp.jobs.models import Job, Lease, LeaseLost
from webapp.jobs.tasks import JobRunner
from worker import attempts
from worker.checkpoints import BASELINE, sign

pytestmark = pytest.mark.django_db

METRIC = {"kind": "metric", "step": 1, "t": 0, "loss": 2.5, "total_steps": 10}


@pytest.fixture
def job(owner, media_root):
    dataset = Dataset.objects.create(owner=owner, name="d", original_name="d.jsonl", format="jsonl")
    return Job.objects.create(owner=owner, dataset=dataset, name="j", spec={"base_model": "x", "method": "lora"})


def reap_and_reclaim(job, worker_id):
    Job.objects.filter(id=job.id).update(heartbeat_at=timezone.now() - timedelta(minutes=5))
    assert job.reap(timezone.now() - timedelta(seconds=60))
    assert job.claim(worker_id)


def test_a_reaped_attempt_records_nothing_even_when_its_worker_claims_the_job_again(job):
    job.claim("w")
    first = Lease("w", job.attempts)
    reap_and_reclaim(job, "w")
    second = Lease("w", job.attempts)
    seq = job.event_seq
    with pytest.raises(LeaseLost):
        job.append_events([METRIC], lease=first)
    assert not job.transition("failed", where=first.where)
    assert not job.beat(first)
    job.refresh_from_db()
    assert job.event_seq == seq and job.state == "preparing"
    job.append_events([METRIC], lease=second)
    assert job.beat(second)


def test_no_event_is_recorded_after_a_cancel(job):
    job.claim("w")
    lease = Lease("w", job.attempts)
    job.append_events([METRIC], lease=lease)
    job.transition("cancelled", message="Cancelled by the user.")
    with pytest.raises(LeaseLost):
        job.append_events([{**METRIC, "step": 2}], lease=lease)
    assert [e["kind"] for e in job.history()][-1] == "state"


def test_the_runner_s_sink_drops_events_after_a_cancel_and_stops_the_recipe(job):
    runner = JobRunner(job)
    try:
        assert job.claim("w")
        runner.lease, runner.recorded_until = Lease("w", job.attempts), {}
        runner.deliver([METRIC])
        Job.objects.get(id=job.id).transition("cancelled")
        runner.deliver([{**METRIC, "step": 2}, {**METRIC, "step": 3}])
    finally:
        runner.reporter.close()
    assert runner.reporter.stop_requested.is_set()
    assert [e["step"] for e in job.history() if e["kind"] == "metric"] == [1]
    assert job.history()[1]["attempt"] == 1


def test_a_new_attempt_starts_from_the_newest_signed_checkpoint_of_the_latest_attempt(job):
    root = job.output_dir
    sign(make_checkpoint(root / "attempt-1", 50), score=None)
    (root / "attempt-1" / BASELINE).write_text("{}")
    sign(make_checkpoint(root / "attempt-2", 100), score=None)
    (root / "attempt-2" / BASELINE).write_text('{"loss": 1}')
    make_checkpoint(root / "attempt-2", 150, content=b"unsigned: its attempt was stopping")

    folder = attempts.prepare(root, 3)
    assert folder == root / "attempt-3"
    assert sorted(p.name for p in folder.iterdir()) == [BASELINE, "checkpoint-100"]
    assert (folder / BASELINE).read_text() == '{"loss": 1}'
    assert sorted(p.name for p in root.iterdir()) == ["attempt-3"], "earlier attempts' folders are gone"


def test_only_what_the_finishing_attempt_made_is_published_and_can_be_taken_back(job):
    folder = job.attempt_dir(2)
    (folder / "final").mkdir(parents=True)
    (folder / "final" / "model.safetensors").write_bytes(b"weights")
    (folder / "eval_predictions.json").write_text("[]")
    (folder / "specialist-job-1-model.zip").write_bytes(b"zip")
    result = attempts.publish(folder, job.output_dir, {"artifact_dir": str(folder / "final"),
                                                       "artifact_zip": str(folder / "specialist-job-1-model.zip")})
    assert result["artifact_dir"] == str(job.final_dir) and (job.final_dir / "model.safetensors").is_file()
    assert result["artifact_zip"] == str(job.output_dir / "specialist-job-1-model.zip")
    attempts.unpublish(job.output_dir, result)
    assert sorted(p.name for p in job.output_dir.iterdir()) == ["attempt-2"]


def test_the_checkpoints_kept_for_download_are_published_with_the_model(job):
    folder = job.attempt_dir(2)
    (folder / "final").mkdir(parents=True)
    (folder / "specialist-job-1-model.zip").write_bytes(b"zip")
    (folder / "specialist-job-1-model-step-10.zip").write_bytes(b"step 10")
    kept = [{"step": 10, "final": False, "zip": str(folder / "specialist-job-1-model-step-10.zip")},
            {"step": 20, "final": True, "zip": None}]
    result = attempts.publish(folder, job.output_dir, {"artifact_dir": str(folder / "final"), "checkpoints": kept,
                                                       "artifact_zip": str(folder / "specialist-job-1-model.zip")})
    published = job.output_dir / "specialist-job-1-model-step-10.zip"
    assert result["checkpoints"][0]["zip"] == str(published) and published.read_bytes() == b"step 10"
    assert result["checkpoints"][1]["zip"] is None
    attempts.unpublish(job.output_dir, result)
    assert not published.exists()


def test_a_resumed_attempt_brings_the_weights_kept_at_earlier_evaluations(job):
    root = job.output_dir
    sign(make_checkpoint(root / "attempt-1", 100), score=None)
    (root / "attempt-1" / BASELINE).write_text("{}")
    kept = root / "attempt-1" / "evaluated"
    kept.mkdir()
    (kept / "step-50.safetensors").write_bytes(b"weights at 50")
    (kept / "step-50.json").write_text('{"accuracy": 0.5, "forgetting": 0.1}')
    folder = attempts.prepare(root, 2)
    assert (folder / "evaluated" / "step-50.safetensors").read_bytes() == b"weights at 50"
    assert sorted(p.name for p in root.iterdir()) == ["attempt-2"]


def test_the_periodic_clean_up_deletes_the_working_files_of_ended_jobs_only(job, owner, settings):
    from webapp.jobs.tasks import discard_finished_work

    running = Job.objects.create(owner=owner, dataset=job.dataset, name="r", spec=job.spec)
    for each in (job, running):
        sign(make_checkpoint(each.attempt_dir(1), 50), score=None)
    (job.output_dir / BASELINE).write_text("{}")
    job.transition("cancelled", message="Cancelled by the user.")
    discard_finished_work()
    assert list(job.output_dir.iterdir()) == []
    assert (running.attempt_dir(1) / "checkpoint-50").is_dir()
