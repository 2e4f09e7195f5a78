"""Per-user and per-job limits: how many jobs one user may have queued or running, how large a
setting may be, and how long one attempt may run."""

import pytest

from tests.support.model_fixtures import sft_rows, write_jsonl
from tests.test_job_new import VALID
from webapp.datasets.models import Dataset
from webapp.jobs.models import Job
from webapp.jobs.tasks import JobRunner
from worker.spec import SpecError, TrainSpec

pytestmark = pytest.mark.django_db


@pytest.fixture
def dataset(owner, media_root):
    dataset = Dataset.objects.create(owner=owner, name="d", original_name="d.jsonl", format="jsonl", rows_total=64,
                                     rows_ok=64, status="ready")
    dataset.rows_path.parent.mkdir(parents=True)
    write_jsonl(dataset.rows_path, sft_rows())
    return dataset


def test_a_user_with_the_most_active_jobs_is_told_to_wait(owner_client, owner, dataset, settings, train_queue,
                                                           other_client, django_user_model):
    settings.MAX_ACTIVE_JOBS_PER_USER = 2
    for state in ("queued", "training", "succeeded"):
        Job.objects.create(owner=owner, dataset=dataset, name=state, spec={"base_model": "x"}, state=state)
    reply = owner_client.post("/jobs/new/", {**VALID, "dataset": dataset.id})
    assert reply.status_code == 200
    [error] = reply.context["form"].non_field_errors()
    assert "You have 2 jobs queued or running" in error and "cancel one" in error
    assert Job.objects.count() == 3 and not train_queue()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("max_steps", 10**7, "at most 1,000,000"), ("batch_size", 10**5, "at most 4,096"),
     ("epochs", 1e6, "at most 1000"), ("max_seq_length", 10**7, "at most 131,072"), ("lora_r", 4096, "at most 1,024")],
)
def test_settings_past_their_bounds_are_refused_on_their_field(field, value, message, owner_client, dataset):
    overrides = {field: value, **({"max_steps": ""} if field == "epochs" else {})}
    reply = owner_client.post("/jobs/new/", {**VALID, "dataset": dataset.id, **overrides})
    assert message in reply.context["form"].errors[field][0]
    with pytest.raises(SpecError, match=message):
        TrainSpec(base_model="m", dataset_path="", output_dir="", **{field: value, "max_steps": None}
                  if field == "epochs" else {field: value})


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_an_attempt_that_runs_past_the_time_limit_fails_saying_so(owner, dataset, tiny_llama_dir, settings):
    settings.JOB_MAX_SECONDS = 4
    spec = {"base_model": str(tiny_llama_dir), "method": "lora", "max_steps": 100_000, "batch_size": 4,
            "max_seq_length": 96, "lora_target_modules": ["q_proj", "v_proj"], "eval_every": 100_000}
    job = Job.objects.create(owner=owner, dataset=dataset, name="long", spec=spec)
    JobRunner(job).run()
    job.refresh_from_db()
    assert job.state == "failed"
    assert "longer than this server's limit" in job.message and "SPECIALIST_MAX_JOB_SECONDS" in job.message
    assert 0 < job.step < 100_000
    assert not list(job.output_dir.rglob("checkpoint-*")), "a failed job keeps its working files"
