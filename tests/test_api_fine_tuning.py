"""The OpenAI-compatible fine-tuning API on the Django side: files read by the upload form's
reader, jobs validated by the new-job form, the objects, paging, events and errors in OpenAI's
shapes. The official client drives it against the live stack in test_api_fine_tuning_client."""

import asyncio
import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import get_resolver

from webapp.accounts.models import ApiKey
from webapp.api import openapi
from webapp.api.fine_tuning import HYPERPARAMETERS, SPECIALIST_SETTINGS
from webapp.datasets.models import Dataset
from webapp.jobs.models import Job
from worker.events import make_event
from worker.families import FAMILIES
from worker.spec import TrainChoices

pytestmark = pytest.mark.django_db

CHAT = b"".join(json.dumps({"messages": [
    {"role": "system", "content": "Answer in French."}, {"role": "user", "content": f"Say {n}."},
    {"role": "assistant", "content": f"Je dis {n}."}]}).encode() + b"\n" for n in range(12))
PREFERENCE = b"".join(json.dumps({
    "input": {"messages": [{"role": "user", "content": f"Greet {n}."}]},
    "preferred_output": [{"role": "assistant", "content": f"Hello {n}!"}],
    "non_preferred_output": [{"role": "assistant", "content": "Go away."}]}).encode() + b"\n" for n in range(12))
CLASSES = b"text,label\n" + b"".join(b"item %d,%s\n" % (n, b"even" if n % 2 == 0 else b"odd") for n in range(20))


@pytest.fixture
def api(owner, media_root):
    _, secret = ApiKey.issue(owner, "script")
    return Client(HTTP_AUTHORIZATION=f"Bearer {secret}")


@pytest.fixture
def other_api(other_user, media_root):
    _, secret = ApiKey.issue(other_user, "script")
    return Client(HTTP_AUTHORIZATION=f"Bearer {secret}")


def upload(client, content: bytes, name: str = "chat.jsonl", **fields) -> dict:
    reply = client.post("/v1/files", {"file": SimpleUploadedFile(name, content), "purpose": "fine-tune", **fields})
    assert reply.status_code == 200, reply.content.decode()
    return reply.json()


async def read_all(chunks) -> bytes:
    return b"".join([chunk async for chunk in chunks])


def create(client, **body):
    return client.post("/v1/fine_tuning/jobs", json.dumps(body), content_type="application/json")


def refused(reply, status: int, param: str | None) -> str:
    assert reply.status_code == status, reply.content.decode()
    problem = reply.json()["error"]
    assert problem["param"] == param, problem
    return problem["message"]


# Files -------------------------------------------------------------------------------------


def test_a_file_is_a_dataset_read_by_the_upload_forms_reader_with_its_task_proposed(api):
    chat, pairs = upload(api, CHAT), upload(api, PREFERENCE, "pairs.jsonl")
    classes = upload(api, CLASSES, "classes.csv")
    assert chat["object"] == "file" and chat["purpose"] == "fine-tune" and chat["status"] == "processed"
    assert chat["bytes"] == len(CHAT) and chat["filename"] == "chat.jsonl" and chat["status_details"] is None
    assert [f["specialist"]["task"] for f in (chat, pairs, classes)] == ["sft", "dpo", "classify"]
    # OpenAI's preference format reads into prompt / chosen / rejected, as on the upload form.
    dataset = Dataset.objects.get(id=int(pairs["id"].removeprefix("file-")))
    assert dataset.chat_format == "openai-preference" and dataset.rows_ok == 12
    assert dataset.preview_rows[0] == {"prompt": "Greet 0.", "chosen": "Hello 0!", "rejected": "Go away."}
    # The task can be named (the client's extra_body).
    assert upload(api, CLASSES, "c.csv", task="sft")["status"] == "error"


def test_a_files_row_errors_are_its_status_details_and_a_broken_file_creates_nothing(api):
    broken = CHAT + b'{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": oops}\n'
    reviewed = upload(api, broken)
    assert reviewed["status"] == "processed" and reviewed["specialist"]["rows_ok"] == 12
    assert "12 of 14 rows can be trained on" in reviewed["status_details"]
    assert "line 13" in reviewed["status_details"] and "line 14" in reviewed["status_details"]

    count = Dataset.objects.count()
    message = refused(api.post("/v1/files", {"file": SimpleUploadedFile("x.jsonl", b"\x00\x01binary"),
                                             "purpose": "fine-tune"}), 400, "file")
    assert "binary" in message
    refused(api.post("/v1/files", {"file": SimpleUploadedFile("x.jsonl", CHAT), "purpose": "assistants"}), 400,
            "purpose")
    refused(api.post("/v1/files", {"purpose": "fine-tune"}), 400, "file")
    assert Dataset.objects.count() == count


def test_files_page_newest_first_and_only_the_owners(api, other_api):
    ids = [upload(api, CHAT, f"f{n}.jsonl")["id"] for n in range(3)]
    first = api.get("/v1/files?limit=2").json()
    assert [f["id"] for f in first["data"]] == ids[::-1][:2] and first["has_more"]
    rest = api.get(f"/v1/files?limit=2&after={first['last_id']}").json()
    assert [f["id"] for f in rest["data"]] == [ids[0]] and not rest["has_more"]
    assert [f["id"] for f in api.get("/v1/files?order=asc").json()["data"]] == ids
    refused(api.get("/v1/files?limit=0"), 400, "limit")
    refused(api.get("/v1/files?after=ftjob-1"), 400, "after")
    assert other_api.get("/v1/files").json()["data"] == []
    refused(other_api.get(f"/v1/files/{ids[0]}"), 404, "file_id")
    refused(other_api.get(f"/v1/files/{ids[0]}/content"), 404, "file_id")
    refused(other_api.delete(f"/v1/files/{ids[0]}"), 404, "file_id")


def test_a_files_content_is_the_upload_byte_for_byte_and_a_used_file_is_kept(api, train_queue):
    file = upload(api, CHAT)
    content = api.get(f"/v1/files/{file['id']}/content")
    assert b"".join(content.streaming_content) == CHAT
    create(api, model="smollm2-135m-instruct", training_file=file["id"])
    assert "used by a fine-tuning job" in refused(api.delete(f"/v1/files/{file['id']}"), 400, "file_id")
    spare = upload(api, CHAT)
    assert api.delete(f"/v1/files/{spare['id']}").json() == {"id": spare["id"], "object": "file", "deleted": True}
    refused(api.get(f"/v1/files/{spare['id']}"), 404, "file_id")


# Creating jobs -----------------------------------------------------------------------------


def test_a_job_from_only_a_model_and_a_file_is_the_job_the_new_job_form_starts(
        api, owner_client, train_queue, django_capture_on_commit_callbacks):
    file = upload(api, CHAT)
    with django_capture_on_commit_callbacks(execute=True):
        reply = create(api, model="smollm2-135m-instruct", training_file=file["id"])
    assert reply.status_code == 200, reply.content.decode()
    made = reply.json()
    assert made["object"] == "fine_tuning.job" and made["status"] == "queued" and made["fine_tuned_model"] is None
    assert made["training_file"] == file["id"] and made["method"]["type"] == "supervised"
    assert made["hyperparameters"] == {"n_epochs": "auto", "batch_size": 8, "learning_rate_multiplier": 1.0}

    # The browser's form, with the settings its page suggests for the task.
    suggested = FAMILIES["sft"].suggested
    defaults = TrainChoices.defaults()
    form = {**{k: v for k, v in defaults.items() if k in ("lora_r", "lora_alpha", "lora_dropout", "epochs",
                                                            "validation_fraction", "dpo_beta", "dpo_sft_weight",
                                                            "loss_on_turns")},
            "lora_target_modules": defaults["lora_target_modules"], "dataset": made["training_file"][5:],
            "base_model": suggested.base_model, "method": suggested.method, "learning_rate": suggested.learning_rates["lora"],
            "max_steps": suggested.max_steps, "batch_size": suggested.batch_size, "max_seq_length": suggested.max_seq_length}
    with django_capture_on_commit_callbacks(execute=True):
        assert owner_client.post("/jobs/new/", form).status_code == 302
    by_api, by_form = Job.objects.order_by("id")
    assert by_api.spec == by_form.spec
    assert len(train_queue()) == 2  # both were queued


def test_openai_hyperparameters_and_specialist_settings_become_the_jobs_settings(api, train_queue):
    chat, pairs = upload(api, CHAT), upload(api, PREFERENCE, "pairs.jsonl")
    made = create(api, model="smollm2-135m-instruct", training_file=chat["id"], validation_file=upload(api, CHAT)["id"],
                  suffix="french-v1", seed=7, metadata={"team": "support"},
                  method={"type": "supervised", "supervised": {"hyperparameters": {
                      "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}}},
                  specialist={"lora_r": 4, "lora_target_modules": ["q_proj", "v_proj"], "max_seq_length": 256}).json()
    job = Job.objects.get(id=int(made["id"].removeprefix("ftjob-")))
    assert (job.spec["epochs"], job.spec["max_steps"], job.spec["batch_size"]) == (2, None, 4)
    assert job.spec["learning_rate"] == pytest.approx(1e-3) and job.spec["seed"] == 7
    assert (job.spec["lora_r"], job.spec["lora_target_modules"], job.spec["max_seq_length"]) == (4, ["q_proj", "v_proj"], 256)
    assert job.spec["validation_path"] == str(job.validation_dataset.rows_path)
    assert (job.suffix, job.metadata) == ("french-v1", {"team": "support"})
    assert made["hyperparameters"] == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}
    assert made["metadata"] == {"team": "support"} and made["seed"] == 7

    dpo = create(api, model="smollm2-135m-instruct", training_file=pairs["id"],
                 method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25}}}).json()
    job = Job.objects.get(id=int(dpo["id"].removeprefix("ftjob-")))
    assert job.spec["task"] == "dpo" and job.spec["dpo_beta"] == 0.25
    assert dpo["method"] == {"type": "dpo", "dpo": {"hyperparameters": dpo["hyperparameters"]}}

    classes = upload(api, CLASSES, "classes.csv")
    head = create(api, model="all-minilm-l6-v2", training_file=classes["id"], specialist={"method": "head"}).json()
    job = Job.objects.get(id=int(head["id"].removeprefix("ftjob-")))
    assert (job.spec["task"], job.spec["method"]) == ("classify", "head")
    assert job.spec["learning_rate"] == FAMILIES["classify"].suggested.learning_rates["head"]


BAD_REQUESTS = {
    "no model": ({"model": None}, "model", "model is required"),
    "an OpenAI model": ({"model": "gpt-4o-mini-2024-07-18"}, "model", "Models on this server"),
    "a fine-tune that is not there": ({"model": "ft:smollm2-135m-instruct:alice:999"}, "model", "does not exist"),
    "an unknown file": ({"training_file": "file-999999"}, "training_file", "No such file"),
    "not a file id": ({"training_file": 12}, "training_file", "No such file"),
    "an unknown method type": ({"method": {"type": "magic"}}, "method.type", "supervised, dpo, kto"),
    "reinforcement": ({"method": {"type": "reinforcement"}}, "method.type", "not available"),
    "dpo on chat rows": ({"method": {"type": "dpo"}}, "training_file", "Use method type supervised"),
    "a bad epoch count": ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
                          "method.supervised.hyperparameters.n_epochs", "at least 1"),
    "a text multiplier": ({"hyperparameters": {"learning_rate_multiplier": "fast"}},
                          "hyperparameters.learning_rate_multiplier", "'auto' or a number"),
    "an unknown hyperparameter": ({"hyperparameters": {"warmup": 3}}, "hyperparameters.warmup", "Unknown"),
    "beta without preferences": ({"hyperparameters": {"beta": 0.1}}, "hyperparameters.beta", "dpo and kto"),
    "a learning rate the form refuses": ({"hyperparameters": {"learning_rate_multiplier": 1000}},
                                         "hyperparameters.learning_rate_multiplier", "below 1"),
    "an unknown Specialist setting": ({"specialist": {"warp": 9}}, "specialist.warp", "not a Specialist setting"),
    "a Specialist setting the form refuses": ({"specialist": {"lora_r": 0}}, "specialist.lora_r", ""),
    "another task": ({"specialist": {"task": "classify"}}, "specialist.task", "upload it again"),
    "a suffix with a colon": ({"suffix": "a:b"}, "suffix", "letters, digits"),
    "too much metadata": ({"metadata": {str(n): "x" for n in range(17)}}, "metadata", "at most 16"),
    "an unknown parameter": ({"model_version": 2}, "model_version", "Unknown parameter"),
    "a bad seed": ({"seed": "lucky"}, "seed", "whole number"),
}


@pytest.mark.parametrize(("change", "param", "says"), BAD_REQUESTS.values(), ids=BAD_REQUESTS)
def test_a_bad_job_request_is_a_400_naming_its_parameter_and_creates_nothing(
        api, train_queue, django_capture_on_commit_callbacks, change, param, says):
    file = upload(api, CHAT)
    body = {"model": "smollm2-135m-instruct", "training_file": file["id"], **change}
    with django_capture_on_commit_callbacks(execute=True):
        assert says in refused(create(api, **body), 400, param)
    assert not Job.objects.exists() and train_queue() == []


def test_files_of_another_user_or_that_failed_to_read_or_have_rejected_rows_start_no_job(api, other_api, train_queue):
    theirs = upload(other_api, CHAT)
    assert "No such file" in refused(create(api, model="smollm2-135m-instruct", training_file=theirs["id"]), 400,
                                     "training_file")
    failed = upload(api, CLASSES, "c.csv", task="sft")
    assert "could not be read" in refused(create(api, model="smollm2-135m-instruct", training_file=failed["id"]), 400,
                                          "training_file")
    partly = upload(api, CHAT + b'{"messages": oops}\n')
    message = refused(create(api, model="smollm2-135m-instruct", training_file=partly["id"]), 400, "training_file")
    assert "12 of 13 rows" in message and "line 13" in message
    assert not Job.objects.exists()
    made = create(api, model="smollm2-135m-instruct", training_file=partly["id"],
                  specialist={"accept_rejected_rows": True})
    assert made.status_code == 200 and Dataset.objects.get(id=int(partly["id"][5:])).status == "ready"


# Reading jobs ------------------------------------------------------------------------------


def test_jobs_page_newest_first_filter_by_metadata_and_only_the_owners(api, other_api, train_queue):
    file = upload(api, CHAT)
    ids = [create(api, model="smollm2-135m-instruct", training_file=file["id"],
                  metadata={"run": str(n % 2)}).json()["id"] for n in range(3)]
    page = api.get("/v1/fine_tuning/jobs?limit=2").json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
    assert [j["id"] for j in api.get(f"/v1/fine_tuning/jobs?after={page['last_id']}").json()["data"]] == [ids[0]]
    assert [j["id"] for j in api.get("/v1/fine_tuning/jobs?metadata[run]=0").json()["data"]] == [ids[2], ids[0]]
    refused(api.get("/v1/fine_tuning/jobs?status=running"), 400, "status")
    assert api.get(f"/v1/fine_tuning/jobs/{ids[0]}").json()["id"] == ids[0]
    for path in ("", "/events", "/checkpoints"):
        refused(other_api.get(f"/v1/fine_tuning/jobs/{ids[0]}{path}"), 404, "fine_tuning_job_id")
    refused(other_api.post(f"/v1/fine_tuning/jobs/{ids[0]}/cancel"), 404, "fine_tuning_job_id")
    assert other_api.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_cancelling_twice_is_a_400_that_the_client_does_not_retry(api, train_queue):
    made = create(api, model="smollm2-135m-instruct", training_file=upload(api, CHAT)["id"]).json()
    cancelled = api.post(f"/v1/fine_tuning/jobs/{made['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"]
    message = refused(api.post(f"/v1/fine_tuning/jobs/{made['id']}/cancel"), 400, "fine_tuning_job_id")
    assert "already cancelled" in message


def test_events_are_newest_first_with_the_step_metrics_in_data(api, train_queue):
    made = create(api, model="smollm2-135m-instruct", training_file=upload(api, CHAT)["id"]).json()
    job = Job.objects.get(id=int(made["id"][6:]))
    job.append_events([
        make_event("eval", 0, baseline=True, eval_loss=3.0, perplexity=20.1),
        make_event("metric", 1, loss=2.5, total_steps=2, learning_rate=1e-3, tokens=480),
        make_event("metric", 2, loss=1.5, total_steps=2, learning_rate=5e-4, tokens=960),
        make_event("eval", 2, final=True, eval_loss=1.2, perplexity=3.3),
    ])
    events = api.get(f"/v1/fine_tuning/jobs/{made['id']}/events?limit=3").json()
    assert events["has_more"] and [e["type"] for e in events["data"]] == ["metrics", "metrics", "metrics"]
    final, step = events["data"][0], events["data"][1]
    assert final["data"]["valid_loss"] == 1.2 and "after training" in final["message"]
    assert step["data"] == {"step": 2, "train_loss": 1.5, "total_steps": 2, "learning_rate": 5e-4, "tokens": 960}
    rest = api.get(f"/v1/fine_tuning/jobs/{made['id']}/events?after={events['last_id']}").json()
    assert [e["type"] for e in rest["data"]] == ["metrics", "message"] and not rest["has_more"]
    assert rest["data"][-1]["message"] == "Job queued"


def test_a_succeeded_job_names_its_model_its_checkpoint_and_its_result_file(api, train_queue):
    made = create(api, model="smollm2-135m-instruct", training_file=upload(api, CHAT)["id"], suffix="fr").json()
    job = Job.objects.get(id=int(made["id"][6:]))
    job.append_events([make_event("metric", 30, loss=0.5, total_steps=30, tokens=9000),
                       make_event("eval", 30, final=True, eval_loss=0.4)])
    Job.objects.filter(id=job.id).update(state="succeeded", finished_at=job.created_at, step=30, last_loss=0.5)
    done = api.get(f"/v1/fine_tuning/jobs/{made['id']}").json()
    assert done["status"] == "succeeded" and done["fine_tuned_model"] == f"ft:smollm2-135m-instruct:alice:fr:{job.id}"
    assert done["trained_tokens"] == 9000 and done["result_files"] == [f"file-results-{job.id}"]
    assert api.get(f"/v1/models/{done['fine_tuned_model']}").json()["id"] == done["fine_tuned_model"]
    checkpoint = api.get(f"/v1/fine_tuning/jobs/{made['id']}/checkpoints").json()["data"][0]
    assert checkpoint["fine_tuned_model_checkpoint"] == done["fine_tuned_model"] and checkpoint["step_number"] == 30
    assert checkpoint["metrics"]["valid_loss"] == 0.4 and checkpoint["metrics"]["train_loss"] == 0.5
    results = api.get(f"/v1/files/file-results-{job.id}/content").content.decode()
    assert results.splitlines() == ["step,train_loss,valid_loss,learning_rate,tokens", "30,0.5,0.4,,9000"]
    assert api.get(f"/v1/files/file-results-{job.id}").json()["purpose"] == "fine-tune-results"


def test_the_openapi_description_covers_every_v1_route_and_every_setting(api):
    described = set(api.get("/v1/openapi.json").json()["paths"])
    routes = set()
    for pattern in get_resolver().url_patterns:
        for inner in getattr(pattern, "url_patterns", [pattern]):
            route = str(inner.pattern)
            if route.startswith("v1/"):
                routes.add("/" + route.replace("<path:model>", "{model}").replace("<str:file>", "{file_id}")
                           .replace("<str:fine_tuning_job>", "{fine_tuning_job_id}")
                           .replace("<str:export>", "{export_id}"))
    assert described == routes
    schemas = openapi.document()["components"]["schemas"]
    assert set(schemas["SpecialistSettings"]["properties"]) == SPECIALIST_SETTINGS
    assert set(schemas["Hyperparameters"]["properties"]) == HYPERPARAMETERS
    assert Client().get("/v1/openapi.json").status_code == 401


def test_a_succeeded_jobs_exports_are_asked_for_followed_and_downloaded(
        api, other_api, cpu_queue, django_capture_on_commit_callbacks):
    made = create(api, model="smollm2-135m-instruct", training_file=upload(api, CHAT)["id"]).json()
    job = Job.objects.get(id=int(made["id"][6:]))
    path = f"/v1/fine_tuning/jobs/{made['id']}/exports"
    assert "only a succeeded job" in refused(api.post(path, {"kind": "merged"}, content_type="application/json"), 400,
                                             "kind")
    job.final_dir.mkdir(parents=True)
    Job.objects.filter(id=job.id).update(state="succeeded")
    with django_capture_on_commit_callbacks(execute=True):
        asked = api.post(path, {"kind": "gguf-q8_0"}, content_type="application/json").json()
    assert asked["object"] == "fine_tuning.job.export" and asked["state"] == "queued" and asked["download_url"] is None
    assert asked["fine_tuning_job_id"] == made["id"] and [h["task"] for h in cpu_queue()] == ["webapp.exports.build_export"]
    again = api.post(path, {"kind": "gguf-q8_0"}, content_type="application/json").json()
    assert again["id"] == asked["id"]  # made once
    refused(api.post(path, {"kind": "onnx"}, content_type="application/json"), 400, "kind")
    refused(other_api.post(path, {"kind": "merged"}, content_type="application/json"), 404, "fine_tuning_job_id")
    content = f"/v1/exports/{asked['id']}/content"
    assert "queued, not ready" in refused(api.get(content), 400, "export_id")

    built = job.output_dir / "exports" / "specialist-job-gguf.zip"
    built.parent.mkdir(parents=True)
    built.write_bytes(b"PK zip bytes")
    export = job.exports.get()
    export.claim() and export.finish(built)
    listed = api.get(path).json()["data"]
    assert [e["state"] for e in listed] == ["ready"] and listed[0]["size_bytes"] == 12
    download = api.get(listed[0]["download_url"])
    assert download.status_code == 200 and download["Content-Length"] == "12"
    assert asyncio.run(read_all(download.streaming_content)) == b"PK zip bytes"
    refused(other_api.get(content), 404, "export_id")


def test_a_job_stored_before_its_settings_existed_still_lists(api, owner):
    dataset = Dataset.objects.create(owner=owner, name="d", original_name="d.jsonl", format="jsonl")
    old = Job.objects.create(owner=owner, dataset=dataset, name="old", spec={"base_model": "x", "method": "lora"})
    listed = api.get("/v1/fine_tuning/jobs").json()["data"]
    assert [j["id"] for j in listed] == [f"ftjob-{old.id}"] and listed[0]["hyperparameters"]["batch_size"] == 8
