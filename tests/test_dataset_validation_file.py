"""An uploaded validation file: read like the training file, held out instead of a share of the rows."""

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from tests.test_job_new import VALID
from webapp.datasets.models import Dataset
from webapp.jobs.models import Job

pytestmark = pytest.mark.django_db

TRAIN = b"question,answer\n" + b"".join(b"q%d,a%d\n" % (i, i) for i in range(20))
HELD_OUT = b"question,answer\nv1,w1\nv2,w2\nv3,w3\n"


def upload(client, validation: bytes | None, name: str = "held-out.csv"):
    files = {"file": SimpleUploadedFile("train.csv", TRAIN), "task": "sft"}
    if validation is not None:
        files["validation_file"] = SimpleUploadedFile(name, validation)
    return client.post("/datasets/upload/", files)


def test_a_validation_file_is_read_with_the_training_files_mapping_and_stored_under_a_generated_name(owner_client,
                                                                                                     media_root):
    reply = upload(owner_client, HELD_OUT, name="my secret eval.csv")
    dataset = Dataset.objects.get()
    assert reply.status_code == 302 and dataset.status == "ready"
    assert dataset.validation_rows_ok == 3 and dataset.validation_name == "my secret eval.csv"
    assert dataset.validation_rows_path.read_text().splitlines()[0] == '{"instruction": "v1", "response": "w1"}'
    assert not any("secret" in p.name for p in media_root.rglob("*"))
    page = owner_client.get(reply.url).content.decode()
    assert "3 rows held out" in page and "jobs train on all 20 rows" in page


def test_without_a_validation_file_the_page_says_how_many_rows_a_job_holds_out(owner_client, media_root):
    reply = upload(owner_client, None)
    assert "holds out about 2 of the 20 rows" in owner_client.get(reply.url).content.decode()


def test_a_validation_file_with_bad_rows_is_reviewed_with_their_line_and_column(owner_client, media_root):
    reply = upload(owner_client, b"question,answer\nv1,w1\nv2,\nv3,w3\n")
    dataset = Dataset.objects.get()
    assert dataset.status == "review" and (dataset.validation_rows_ok, dataset.validation_rows_rejected) == (2, 1)
    page = owner_client.get(reply.url).content.decode()
    assert "Rejected rows of the validation file" in page
    assert "<td>3</td><td>answer</td><td>the value is empty</td>" in page
    assert "Train on the 20 usable rows (1 dropped)" in page


def test_a_validation_file_without_the_mapped_columns_rejects_the_dataset_and_says_why(owner_client, media_root):
    upload(owner_client, b"question,reply\nv1,w1\n")
    dataset = Dataset.objects.get()
    assert dataset.status == "rejected"
    assert dataset.message.startswith("Validation file: Column 'answer' (chosen for response) is not in the file.")


def test_a_validation_file_that_cannot_be_read_is_refused_on_its_field(owner_client, media_root):
    reply = upload(owner_client, b'[{"question": "v1", "answer": "w1"}, {"question": \n', name="v.json")
    assert reply.status_code == 400
    errors = reply.context["form"].errors
    assert "validation_file" in errors and "Validation file" in errors["validation_file"][0]
    assert "file" not in errors and not Dataset.objects.exists()


def test_a_validation_file_can_be_added_and_removed_on_the_dataset_page(owner_client, media_root):
    upload(owner_client, None)
    dataset = Dataset.objects.get()
    reply = owner_client.post(f"/datasets/{dataset.id}/validation/", {"file": SimpleUploadedFile("v.csv", HELD_OUT)})
    dataset.refresh_from_db()
    assert reply.status_code == 302 and dataset.has_validation and dataset.validation_rows_ok == 3
    owner_client.post(f"/datasets/{dataset.id}/validation/remove/")
    dataset.refresh_from_db()
    assert not dataset.has_validation and not dataset.validation_rows_path.exists()
    assert dataset.status == "ready"


def test_the_job_sends_the_validation_files_rows_to_the_worker(owner_client, media_root, train_queue):
    upload(owner_client, HELD_OUT)
    dataset = Dataset.objects.get()
    page = owner_client.get("/jobs/new/").content.decode()
    assert "20 rows + 3 validation rows" in page and f"[{dataset.id}]" in page
    reply = owner_client.post("/jobs/new/", {**VALID, "dataset": dataset.id})
    job = Job.objects.get()
    assert reply.status_code == 302 and job.spec["validation_path"] == str(dataset.validation_rows_path)
    assert job.train_spec().validation_path == str(dataset.validation_rows_path)


def test_validation_rows_whose_input_is_in_training_are_counted_on_the_dataset_page(owner_client, media_root):
    reply = upload(owner_client, b"question,answer\nq3,other\nnew,w\n q5  ,w\n")
    dataset = Dataset.objects.get()
    assert dataset.validation_overlap == 2
    page = owner_client.get(reply.url).content.decode()
    assert "2 validation rows have an input that is also in the training file" in page
    assert "Drop the validation file's inputs from training" in page


def test_a_validation_file_of_new_inputs_gets_no_warning(owner_client, media_root):
    reply = upload(owner_client, HELD_OUT)
    assert Dataset.objects.get().validation_overlap == 0
    assert 'id="validation-overlap"' not in owner_client.get(reply.url).content.decode()


def test_the_job_can_drop_the_validation_files_inputs_from_training(owner_client, media_root, train_queue):
    upload(owner_client, b"question,answer\nq3,other\n")
    dataset = Dataset.objects.get()
    assert "Drop the validation file" in owner_client.get("/jobs/new/").content.decode()
    owner_client.post("/jobs/new/", {**VALID, "dataset": dataset.id, "drop_validation_overlap": "on"})
    job = Job.objects.get()
    assert job.spec["drop_validation_overlap"] is True and job.train_spec().drop_validation_overlap
    page = owner_client.get(f"/jobs/{job.id}/").content.decode()
    assert "the dataset's validation file; training rows whose input it holds were dropped" in page


def test_the_job_page_says_when_validation_inputs_were_trained_on(owner_client, media_root, train_queue):
    upload(owner_client, b"question,answer\nq3,other\n")
    owner_client.post("/jobs/new/", {**VALID, "dataset": Dataset.objects.get().id})
    page = owner_client.get(f"/jobs/{Job.objects.get().id}/").content.decode()
    assert "1 of its inputs is also trained on (not dropped)" in page


def test_a_job_without_a_validation_file_holds_out_a_share(owner_client, media_root, train_queue):
    upload(owner_client, None)
    owner_client.post("/jobs/new/", {**VALID, "dataset": Dataset.objects.get().id})
    assert Job.objects.get().spec["validation_path"] == ""
    assert Job.objects.get().spec["drop_validation_overlap"] is False
    page = owner_client.get(f"/jobs/{Job.objects.get().id}/").content.decode()
    assert "of the rows (seeded; rows with the same input on one side)" in page


def test_no_validation_file_can_be_added_once_a_job_used_the_dataset(owner_client, owner, media_root):
    upload(owner_client, None)
    dataset = Dataset.objects.get()
    Job.objects.create(owner=owner, dataset=dataset, name="j", spec={"base_model": "x", "method": "lora"})
    owner_client.post(f"/datasets/{dataset.id}/validation/", {"file": SimpleUploadedFile("v.csv", HELD_OUT)})
    dataset.refresh_from_db()
    assert not dataset.has_validation
