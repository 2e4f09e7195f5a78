"""Every URL that takes an id, walked by the owner, another user and an anonymous client."""

import zipfile

import pytest
from django.urls import URLPattern, get_resolver

from webapp.accounts.models import ApiKey
from webapp.datasets.models import Dataset
from webapp.exports.models import Export
from webapp.jobs.models import Job, JobGroup
from webapp.webhooks.models import Delivery, Endpoint

pytestmark = pytest.mark.django_db

POST_ONLY = {
    "cancel_job", "delete_dataset", "dataset_mapping", "dataset_columns", "dataset_media", "accept_dataset_rows",
    "replace_dataset_file", "add_validation_file", "remove_validation_file", "revoke_key", "try_base", "try_tuned",
    "retry_webhook_delivery", "request_export", "cancel_job_group", "evaluate_dataset",
}


@pytest.fixture
def objects(owner, media_root):
    dataset = Dataset.objects.create(owner=owner, name="d", original_name="d.jsonl", format="jsonl")
    group = JobGroup.objects.create(owner=owner, name="sweep")
    job = Job.objects.create(owner=owner, dataset=dataset, name="j", spec={"base_model": "x", "method": "lora"},
                             group=group)
    artifact = media_root / "jobs" / str(job.id) / "specialist-job-adapter.zip"
    artifact.parent.mkdir(parents=True)
    zipfile.ZipFile(artifact, "w").close()
    checkpoint = artifact.with_name("specialist-job-adapter-step-8.zip")
    zipfile.ZipFile(checkpoint, "w").close()
    kept = [{"step": 8, "final": False, "balanced": True, "zip": str(checkpoint),
             "metrics": {"eval_loss": 1.0, "forgetting": 0.1}}]
    Job.objects.filter(id=job.id).update(state="succeeded", result={"artifact_zip": str(artifact), "checkpoints": kept})
    key, _ = ApiKey.issue(owner, "laptop")
    delivery = Delivery.test_event(Endpoint.objects.create(owner=owner, url="https://example.com/hook"))
    export = Export.objects.create(job=job, kind="merged", state="ready", path=str(artifact), size_bytes=22)
    rows_csv = media_root / "jobs" / "rows.csv"
    rows_csv.write_text("row,input\n1,a\n")
    evaluation = Job.objects.create(owner=owner, dataset=dataset, name="e", kind="evaluate", state="succeeded",
                                    spec={"task": "classify", "models": [], "base_model": "x"},
                                    result={"leaderboard": [], "rows_csv": str(rows_csv), "rows_json": "none"})
    return {"dataset_id": dataset.id, "job_id": job.id, "key_id": key.id, "delivery_id": delivery.id,
            "export_id": export.id, "group_id": group.id, "evaluation_id": evaluation.id, "step": 8}


def urls_with_ids(objects) -> list[tuple[str, str]]:
    """(name, path) of every URL pattern that takes an object id; fails on an unknown kind."""
    found = []
    for pattern in get_resolver().url_patterns:
        for inner in getattr(pattern, "url_patterns", [pattern]):
            if not isinstance(inner, URLPattern) or not any(n.endswith("_id") for n in inner.pattern.converters):
                continue
            kwargs = {name: objects[name] for name in inner.pattern.converters}
            found.append((inner.name, "/" + str(inner.pattern).replace("<int:job_id>", str(kwargs.get("job_id")))
                          .replace("<int:dataset_id>", str(kwargs.get("dataset_id")))
                          .replace("<int:key_id>", str(kwargs.get("key_id")))
                          .replace("<int:delivery_id>", str(kwargs.get("delivery_id")))
                          .replace("<int:export_id>", str(kwargs.get("export_id")))
                          .replace("<int:group_id>", str(kwargs.get("group_id")))
                          .replace("<int:evaluation_id>", str(kwargs.get("evaluation_id")))
                          .replace("<int:step>", str(kwargs.get("step")))))
    return found


def request(client, name, path):
    return client.post(path) if name in POST_ONLY else client.get(path)


def test_the_walk_covers_every_object_url(objects):
    names = {name for name, _ in urls_with_ids(objects)}
    assert names == {
        "dataset", "delete_dataset", "job", "job_events", "cancel_job", "download", "dataset_status", "dataset_mapping",
        "dataset_columns", "dataset_media", "accept_dataset_rows", "replace_dataset_file", "add_validation_file",
        "remove_validation_file", "dataset_quality", "revoke_key", "try_base", "try_tuned", "webhook_delivery",
        "retry_webhook_delivery", "request_export", "download_export", "job_group", "job_group_status", "cancel_job_group",
        "evaluate_dataset", "evaluation_rows", "evaluation_csv", "download_checkpoint",
    }


def test_anonymous_clients_are_sent_to_sign_in(anon_client, objects):
    for name, path in urls_with_ids(objects):
        reply = request(anon_client, name, path)
        assert reply.status_code == 302 and reply.url.startswith("/login/"), name


def test_other_users_get_404_for_everything(other_client, objects):
    for name, path in urls_with_ids(objects):
        assert request(other_client, name, path).status_code == 404, name
    assert other_client.get(f"/jobs/new/?from={objects['job_id']}").status_code == 404


def test_the_owner_gets_every_page(owner_client, objects):
    for name, path in urls_with_ids(objects):
        status = request(owner_client, name, path).status_code
        # The playground answers the owner's empty call past the checks: a JSON refusal (400),
        # or 503 (its model's files or an inference server are missing here), never a 404.
        assert status in (200, 302) or (name.startswith("try_") and status in (400, 503)), name


def test_staff_see_other_users_jobs(objects, django_user_model, client):
    staff = django_user_model.objects.create_user("root", password="x", is_staff=True)
    client.force_login(staff)
    assert client.get(f"/jobs/{objects['job_id']}/").status_code == 200


def test_downloads_are_attachments(owner_client, objects):
    for path in (f"/jobs/{objects['job_id']}/download/", f"/jobs/{objects['job_id']}/checkpoints/8/download/"):
        reply = owner_client.get(path)
        assert reply.status_code == 200 and reply["Content-Disposition"].startswith("attachment"), path
    assert owner_client.get(f"/jobs/{objects['job_id']}/checkpoints/9/download/").status_code == 404


def test_no_field_names_another_users_file_or_model(other_client, other_user, objects, media_root):
    """Every form field and parameter that names a file or a model, aimed at the owner's things."""
    job = Job.objects.get(id=objects["job_id"])
    dataset = Dataset.objects.get(id=objects["dataset_id"])
    final = job.output_dir / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    (final / "model.safetensors").write_bytes(b"\0" * 8)
    mine = Dataset.objects.create(owner=other_user, name="b", original_name="b.jsonl", format="jsonl", status="ready",
                                  rows_total=4, rows_ok=4)
    form = {"method": "full", "learning_rate": 1e-4, "epochs": 1, "max_steps": 1, "batch_size": 1, "lora_r": 8,
            "lora_alpha": 16, "lora_dropout": 0, "max_seq_length": 64, "validation_fraction": 0.1}
    attempts = {
        "dataset": {"dataset": dataset.id, "base_model": "smollm2-135m-instruct"},
        "base_model": {"dataset": mine.id, "base_model": f"job:{job.id}"},
        "custom_base_model": {"dataset": mine.id, "base_model": "custom", "custom_base_model": str(final)},
    }
    for field, values in attempts.items():
        reply = other_client.post("/jobs/new/", {**form, **values})
        assert reply.status_code == 200 and field in reply.context["form"].errors, field
    assert not Job.objects.filter(owner=other_user).exists()
    for base in (str(final), str(dataset.rows_path.parent), f"job:{job.id}"):
        reply = other_client.get(f"/datasets/{mine.id}/quality/", {"base_model": base})
        assert reply.status_code == 400, base
