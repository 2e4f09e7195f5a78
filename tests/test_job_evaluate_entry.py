"""The job page's "Evaluate on a test set": the owner's ready datasets of the job's task, each
opening the dataset's Evaluate form with this job ticked."""

import pytest

from webapp.datasets.models import Dataset
from webapp.jobs.models import Job

pytestmark = pytest.mark.django_db


def ready(owner, name, task="classify", rows=10):
    return Dataset.objects.create(owner=owner, name=name, original_name=f"{name}.jsonl", format="jsonl", task=task,
                                  status="ready", rows_total=rows, rows_ok=rows)


@pytest.fixture
def job(owner, media_root):
    trained_on = ready(owner, "train")
    job = Job.objects.create(owner=owner, dataset=trained_on, name="j",
                             spec={"task": "classify", "base_model": "all-minilm-l6-v2", "method": "lora"})
    final = job.final_dir
    final.mkdir(parents=True)
    (final / "config.json").write_text('{"id2label": {"0": "no", "1": "yes"}}')
    Job.objects.filter(id=job.id).update(state="succeeded")
    return Job.objects.get(id=job.id)


def test_the_job_page_offers_the_owners_test_sets_of_its_task_its_own_last(owner, other_user, owner_client, job):
    test = ready(owner, "held-out test")
    ready(owner, "instructions", task="sft")
    ready(other_user, "someone else's")
    html = owner_client.get(f"/jobs/{job.id}/").content.decode()
    section = html[html.index('id="evaluate-on"'):html.index("</section>", html.index('id="evaluate-on"'))]
    assert section.index("held-out test") < section.index(">train<") and "what it trained on" in section
    assert f'href="/datasets/{test.id}/?evaluate={job.id}#evaluate"' in section
    assert "instructions" not in section and "someone else" not in section


def test_the_dataset_page_ticks_the_job_it_was_opened_for(owner, owner_client, job):
    test = ready(owner, "held-out test")
    form = owner_client.get(f"/datasets/{test.id}/?evaluate={job.id}").context["evaluate_form"]
    assert form.initial["jobs"] == [job.id]
    assert "jobs" not in owner_client.get(f"/datasets/{test.id}/?evaluate=999").context["evaluate_form"].initial


def test_without_a_test_set_the_page_says_to_upload_one(owner, owner_client, job):
    Dataset.objects.filter(id=job.dataset_id).update(task="sft")
    html = owner_client.get(f"/jobs/{job.id}/").content.decode()
    assert "Upload a test set of this task" in html


def test_the_evaluate_form_offers_the_checkpoints_a_job_kept_and_scores_only_those_ticked(owner, job):
    from webapp.jobs.evaluations import EvaluateForm

    kept = job.output_dir / "specialist-job-model-step-10.zip"
    kept.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    checkpoints = [
        {"step": 10, "final": False, "balanced": True, "zip": str(kept), "metrics": {"accuracy": 0.8, "forgetting": 0.02}},
        {"step": 20, "final": True, "balanced": False, "zip": None, "metrics": {"accuracy": 0.9, "forgetting": 0.3}},
    ]
    Job.objects.filter(id=job.id).update(result={"checkpoints": checkpoints})
    test = ready(owner, "held-out test")
    form = EvaluateForm(dataset=test)
    assert [label for _, label in form.fields["checkpoints"].choices] == [
        f"Job {job.id}: j · step 10 (accuracy 0.8, forgetting 0.02) · best trade-off"]
    form = EvaluateForm({"checkpoints": [f"{job.id}:10"], "include_base": "on"}, dataset=test)
    assert form.is_valid(), form.errors
    models = form.spec()["models"]
    assert [m["label"] for m in models] == ["Base model", f"Job {job.id}: j · step 10"]
    assert models[1]["checkpoint_zip"] == str(kept) and models[1]["step"] == 10 and "final_dir" not in models[1]
    assert not EvaluateForm({"checkpoints": [f"{job.id}:20"]}, dataset=test).is_valid()  # the final is the job itself
