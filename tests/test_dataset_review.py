"""Some rows rejected: the dataset waits for the user to drop them or to upload a fixed file."""

from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from webapp.datasets.models import Dataset

pytestmark = pytest.mark.django_db

GOOD = b'{"instruction": "a", "response": "b"}\n{"instruction": "e", "response": "f"}\n'
MIXED = GOOD + b'{"instruction": "c"}\n{"instruction": "g", "response": ""}\n{"instruction": \n'
FIXED = GOOD + b'{"instruction": "c", "response": "d"}\n'


def upload(client, name: str, content: bytes):
    client.post("/datasets/upload/", {"file": SimpleUploadedFile(name, content), "task": "sft"})
    return Dataset.objects.get()


def offered_in_job_form(client, dataset) -> bool:
    return f'<option value="{dataset.id}"' in client.get("/jobs/new/").content.decode()


def test_a_file_with_some_bad_rows_waits_for_the_users_choice(owner_client, media_root):
    dataset = upload(owner_client, "mixed.jsonl", MIXED)
    assert dataset.status == "review" and (dataset.rows_ok, dataset.rows_rejected) == (2, 3)
    page = owner_client.get(f"/datasets/{dataset.id}/").content.decode()
    assert "Train on the 2 usable rows (3 dropped)" in page
    assert "<td>3</td><td>response</td><td>the field is missing</td>" in page
    assert "<td>4</td><td>response</td><td>the value is empty</td>" in page
    assert "1 × invalid JSON; 1 × response: empty; 1 × response: missing" in page
    assert "Train on this dataset" not in page
    assert not offered_in_job_form(owner_client, dataset)


def test_training_on_the_usable_rows_makes_the_dataset_ready(owner_client, media_root):
    dataset = upload(owner_client, "mixed.jsonl", MIXED)
    reply = owner_client.post(f"/datasets/{dataset.id}/accept/")
    dataset.refresh_from_db()
    assert reply.status_code == 302 and dataset.status == "ready"
    assert "jobs train on the 2 usable rows" in owner_client.get(reply.url).content.decode()
    assert dataset.rows_path.read_text().count("\n") == 2
    assert offered_in_job_form(owner_client, dataset)


def test_a_corrected_file_replaces_the_original_and_is_read_again(owner_client, media_root):
    dataset = upload(owner_client, "mixed.jsonl", MIXED)
    reply = owner_client.post(f"/datasets/{dataset.id}/replace/", {"file": SimpleUploadedFile("fixed.jsonl", FIXED)})
    dataset.refresh_from_db()
    assert reply.status_code == 302
    assert (dataset.status, dataset.rows_ok, dataset.rows_total, dataset.errors) == ("ready", 3, 3, [])
    assert dataset.original_name == "fixed.jsonl" and dataset.size_bytes == len(FIXED)
    assert Path(dataset.original.path).read_bytes() == FIXED
    # The old file is gone, not kept beside the new one.
    assert sorted(p.name for p in dataset.rows_path.parent.iterdir()) == ["original.jsonl", "rows.jsonl"]


def test_a_corrected_file_that_is_still_broken_says_where(owner_client, media_root):
    dataset = upload(owner_client, "mixed.jsonl", MIXED)
    still_broken = b'{"instruction": "a", "response": "b"}\n{"instruction": "c", "response": "d"\n' + b"x\n" * 3
    owner_client.post(f"/datasets/{dataset.id}/replace/", {"file": SimpleUploadedFile("v2.jsonl", still_broken)})
    dataset.refresh_from_db()
    assert dataset.status == "review" and dataset.rows_ok == 1
    assert [(e["line"], e["column"]) for e in dataset.errors][:2] == [(2, None), (3, None)]


def test_a_replacement_that_is_not_a_dataset_format_is_a_form_error(owner_client, media_root):
    dataset = upload(owner_client, "mixed.jsonl", MIXED)
    reply = owner_client.post(f"/datasets/{dataset.id}/replace/", {"file": SimpleUploadedFile("notes.docx", b"hi")})
    assert reply.status_code == 400 and "not a dataset format we read" in reply.content.decode()
    dataset.refresh_from_db()
    assert dataset.original_name == "mixed.jsonl" and dataset.status == "review"


def test_a_rejected_dataset_can_be_deleted_with_its_files(owner_client, media_root):
    dataset = upload(owner_client, "odd.csv", b"prompt_text,reply\na,b\n")
    assert dataset.status == "rejected" and dataset.original.path
    reply = owner_client.post(f"/datasets/{dataset.id}/delete/")
    assert reply.status_code == 302 and not Dataset.objects.exists()
    assert not [p for p in media_root.rglob("*") if p.is_file()]


def test_a_ready_dataset_cannot_be_accepted_twice_into_another_state(owner_client, media_root):
    dataset = upload(owner_client, "good.jsonl", GOOD)
    assert dataset.status == "ready"
    owner_client.post(f"/datasets/{dataset.id}/accept/")
    dataset.refresh_from_db()
    assert dataset.status == "ready"
