"""Which models a user may build on: the catalog, folders the operator registered, Hub ids in the
server's cache, and their own trained models by job; never a path into the media folder."""

import json

import pytest

from webapp.datasets.models import Dataset
from webapp.jobs.models import Job
from worker.catalog import base_model_problem

pytestmark = pytest.mark.django_db

FULL_SFT = {
    "method": "full", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "lora_target_modules": ["q_proj"],
    "learning_rate": 1e-9, "epochs": 1, "max_steps": 1, "batch_size": 1, "max_seq_length": 64,
    "validation_fraction": 0.1,
}


def fake_model(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    return folder


def ready_dataset(user, task="sft"):
    return Dataset.objects.create(owner=user, name=f"{user.username}'s", original_name="d.jsonl", format="jsonl",
                                  rows_total=10, rows_ok=10, status="ready", task=task)


def succeeded_job(user, spec, final=True):
    job = Job.objects.create(owner=user, dataset=ready_dataset(user), name=f"{user.username}'s model",
                             spec={"task": "sft", **spec})
    Job.objects.filter(id=job.id).update(state="succeeded")
    job.refresh_from_db()
    if final:
        fake_model(job.final_dir)
    return job


@pytest.fixture
def alices_model(owner, media_root):
    return succeeded_job(owner, {"base_model": "smollm2-135m-instruct", "method": "full"})


def new_job(client, dataset, base_model, custom=""):
    return client.post("/jobs/new/", {**FULL_SFT, "dataset": dataset.id, "base_model": base_model,
                                      "custom_base_model": custom})


def test_the_reviewers_attack_another_users_final_folder_as_a_custom_base_is_a_form_error(
    alices_model, other_client, other_user
):
    reply = new_job(other_client, ready_dataset(other_user), "custom", str(alices_model.final_dir))
    [error] = reply.context["form"].errors["custom_base_model"]
    assert "registered by the administrator" in error and str(alices_model.final_dir) not in error
    assert Job.objects.filter(owner=other_user).count() == 0


def test_the_media_folder_stays_closed_even_when_an_operator_registers_a_folder_above_it(
    alices_model, other_client, other_user, settings, media_root
):
    settings.MODEL_DIRS = [media_root.parent]
    reply = new_job(other_client, ready_dataset(other_user), "custom", str(alices_model.final_dir))
    assert "registered by the administrator" in reply.context["form"].errors["custom_base_model"][0]


def test_a_link_from_a_registered_folder_into_the_media_folder_is_refused(
    alices_model, other_client, other_user, models_root
):
    link = models_root / f"looks-innocent-{alices_model.id}"
    link.symlink_to(alices_model.final_dir, target_is_directory=True)
    try:
        reply = new_job(other_client, ready_dataset(other_user), "custom", str(link))
        assert "registered by the administrator" in reply.context["form"].errors["custom_base_model"][0]
    finally:
        link.unlink()


def test_another_users_job_cannot_be_named_as_a_base(alices_model, other_client, other_user):
    reply = new_job(other_client, ready_dataset(other_user), f"job:{alices_model.id}")
    assert "base_model" in reply.context["form"].errors
    assert f"job:{alices_model.id}" not in other_client.get("/jobs/new/").content.decode()
    assert Job.objects.filter(owner=other_user).count() == 0


def test_a_user_builds_on_their_own_trained_model_by_job(alices_model, owner_client, owner, settings):
    page = owner_client.get("/jobs/new/").content.decode()
    assert "Your models" in page and f'value="job:{alices_model.id}"' in page
    reply = new_job(owner_client, ready_dataset(owner), f"job:{alices_model.id}")
    assert reply.status_code == 302, reply.context["form"].errors
    child = Job.objects.exclude(id=alices_model.id).get(owner=owner)
    assert child.spec["base_model"] == f"job:{alices_model.id}"
    assert child.train_spec().base_model == str(alices_model.final_dir)
    assert child.base_kind() == "causal-lm"
    clone = owner_client.get(f"/jobs/new/?from={child.id}").content.decode()
    assert f'value="job:{alices_model.id}" selected' in clone
    page = owner_client.get(f"/jobs/{child.id}/").content.decode()
    assert f'SmolLM2-135M-Instruct → <a href="/jobs/{alices_model.id}/">job {alices_model.id}' in page


def test_the_job_page_shows_the_whole_lineage_of_a_fine_tune_of_a_fine_tune(alices_model, owner, owner_client):
    """SmolLM2 → job 1 → job 2 → this job, each job a link; a job on a catalog base has none."""
    middle = succeeded_job(owner, {"base_model": f"job:{alices_model.id}", "method": "full"})
    last = succeeded_job(owner, {"base_model": f"job:{middle.id}", "method": "lora"}, final=False)
    assert last.lineage() == ("smollm2-135m-instruct", [alices_model, middle])
    page = owner_client.get(f"/jobs/{last.id}/").content.decode()
    shown = page[page.index('<span id="lineage">'):page.index("</span>", page.index('<span id="lineage">'))]
    assert shown.startswith('<span id="lineage">SmolLM2-135M-Instruct → ')
    assert shown.index(f"job {alices_model.id}:") < shown.index(f"job {middle.id}:") and shown.endswith("→ this job")
    assert 'id="lineage"' not in owner_client.get(f"/jobs/{alices_model.id}/").content.decode()


def test_an_adapter_only_job_is_not_offered_as_a_base(owner, owner_client, media_root):
    adapter = succeeded_job(owner, {"base_model": "smollm2-135m-instruct", "method": "lora"}, final=False)
    adapter.final_dir.mkdir(parents=True)
    (adapter.final_dir / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    assert f"job:{adapter.id}" not in owner_client.get("/jobs/new/").content.decode()


def test_an_encoder_job_cannot_be_the_base_of_instruction_tuning(owner, owner_client, media_root):
    encoder = succeeded_job(owner, {"base_model": "all-minilm-l6-v2", "method": "full", "task": "embed"})
    reply = new_job(owner_client, ready_dataset(owner), f"job:{encoder.id}")
    assert "encoder model" in reply.context["form"].errors["base_model"][0]


def test_a_registered_model_folder_can_be_named(owner, owner_client, models_root):
    folder = fake_model(models_root / "operators-llama")
    reply = new_job(owner_client, ready_dataset(owner), "custom", str(folder))
    assert reply.status_code == 302, reply.context["form"].errors
    assert Job.objects.get(owner=owner).spec["base_model"] == str(folder)


@pytest.mark.parametrize("name", ["var/media", "a/..", "../jobs", "./var/media/jobs/1/final", "~/models"])
def test_relative_paths_and_look_alike_hub_ids_are_refused(name, tmp_path):
    problem = base_model_problem(name, model_dirs=[tmp_path], forbidden=[])
    assert problem is not None
    assert "config.json" not in problem
