import pytest

from webapp.datasets.models import Dataset
from webapp.jobs.models import Job

pytestmark = pytest.mark.django_db

VALID = {
    "base_model": "smollm2-135m-instruct", "method": "lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
    "lora_target_modules": ["q_proj", "v_proj"], "learning_rate": 2e-3, "epochs": 1, "max_steps": 30,
    "batch_size": 8, "max_seq_length": 512, "validation_fraction": 0.1,
}


@pytest.fixture
def dataset(owner):
    return Dataset.objects.create(owner=owner, name="d", original_name="d.jsonl", format="jsonl", rows_total=10, rows_ok=10,
                                  status="ready")


def test_the_form_offers_the_catalog_with_sizes(owner_client, dataset):
    page = owner_client.get("/jobs/new/").content.decode()
    assert "SmolLM2-135M-Instruct" in page and "134515008" in page.replace(",", "")


def test_a_valid_job_is_saved_queued_and_sent_to_the_train_queue(owner_client, dataset, train_queue, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        reply = owner_client.post("/jobs/new/", {**VALID, "dataset": dataset.id})
    job = Job.objects.get()
    assert reply.status_code == 302 and reply.url == f"/jobs/{job.id}/"
    assert job.state == "queued" and job.spec["lora_target_modules"] == ["q_proj", "v_proj"]
    [message] = train_queue()
    assert message["task"] == "webapp.jobs.train_job" and message["argsrepr"] == f"[{job.id}]"
    assert [e["state"] for e in job.history()] == ["queued"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lora_r", 0, "at least 1"),
        ("learning_rate", 0, "greater than 0"),
        ("learning_rate", -1e-3, "greater than 0"),
        ("max_seq_length", 4, "at least 8"),
        ("validation_fraction", 1.0, "below 1"),
        ("batch_size", 0, "at least 1"),
    ],
)
def test_impossible_settings_are_refused_on_their_field(owner_client, dataset, train_queue, field, value, message):
    reply = owner_client.post("/jobs/new/", {**VALID, "dataset": dataset.id, field: value})
    assert reply.status_code == 200
    errors = reply.context["form"].errors
    assert field in errors and message in errors[field][0]
    assert not Job.objects.exists() and not train_queue()


def test_a_base_model_that_does_not_exist_in_a_registered_folder_is_refused(owner_client, dataset, train_queue,
                                                                            models_root):
    missing = models_root / "no-such-model"
    reply = owner_client.post("/jobs/new/", {**VALID, "dataset": dataset.id, "base_model": "custom",
                                              "custom_base_model": str(missing)})
    assert f"No model directory at {missing}" in reply.context["form"].errors["custom_base_model"][0]
    assert not Job.objects.exists()


def test_a_folder_outside_the_registered_ones_is_refused_without_saying_whether_it_exists(owner_client, dataset):
    for path in ("/no/such/model", "/etc", "/"):
        reply = owner_client.post("/jobs/new/", {**VALID, "dataset": dataset.id, "base_model": "custom",
                                                  "custom_base_model": path})
        [error] = reply.context["form"].errors["custom_base_model"]
        assert "registered by the administrator" in error and path not in error and "config.json" not in error
    assert not Job.objects.exists()


def test_a_clone_link_that_names_no_job_is_not_found(owner_client, dataset):
    assert owner_client.get("/jobs/new/?from=abc").status_code == 404
    assert owner_client.get("/jobs/new/?from=99999").status_code == 404


def test_an_encoder_cannot_be_instruction_tuned(owner_client, dataset, train_queue):
    reply = owner_client.post("/jobs/new/", {**VALID, "dataset": dataset.id, "base_model": "all-minilm-l6-v2"})
    assert reply.status_code == 200 and not Job.objects.exists()


def test_another_users_dataset_cannot_be_used(other_client, dataset, train_queue):
    reply = other_client.post("/jobs/new/", {**VALID, "dataset": dataset.id})
    assert "dataset" in reply.context["form"].errors
    assert not Job.objects.exists()
