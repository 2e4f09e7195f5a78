import json

import pytest
import redis
from django.core.files.uploadedfile import SimpleUploadedFile

from webapp.datasets.models import Dataset

pytestmark = pytest.mark.django_db


def upload(client, name: str, content: bytes, **extra):
    return client.post("/datasets/upload/", {"file": SimpleUploadedFile(name, content), "task": "sft", **extra})


def test_a_jsonl_upload_shows_its_row_count_and_first_rows(owner_client, media_root):
    rows = b"".join(b'{"instruction": "say %d", "response": "%d"}\n' % (i, i) for i in range(7))
    reply = upload(owner_client, "numbers.jsonl", rows)
    dataset = Dataset.objects.get()
    assert reply.status_code == 302 and reply.url == f"/datasets/{dataset.id}/"
    page = owner_client.get(reply.url).content.decode()
    assert "7 usable" in page and "say 0" in page
    assert dataset.rows_path.read_text().count("\n") == 7


def test_a_csv_upload_is_mapped_to_instruction_and_response(owner_client, media_root):
    reply = upload(owner_client, "qa.csv", b"question,answer\nwhat?,that\nwho?,them\n")
    assert reply.status_code == 302
    assert Dataset.objects.get().mapping == {"instruction": "question", "response": "answer"}


TWO_ROWS = b'{"instruction": "a", "response": "b"}\n{"instruction": "c", "response": "d"}\n'


def test_files_are_stored_under_generated_names(owner_client, media_root):
    upload(owner_client, "my secret plans.jsonl", TWO_ROWS)
    stored = [p.name for p in media_root.rglob("*") if p.is_file()]
    assert not any("secret" in name for name in stored)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", b"", "empty"),
        ("bad.jsonl", b'{"instruction": "a", "response": "b"\n', "line 1"),
        ("latin1.csv", "instruction,response\ncafé,ok\n".encode("latin-1"), "UTF-8"),
        ("notes.docx", b"hello", "not a dataset format"),
        ("notes.txt", b"hello", "domain adaptation only"),
        ("fake.parquet", b"this is not parquet", "Parquet"),
    ],
)
def test_bad_files_are_refused_with_a_message_that_says_where(owner_client, media_root, name, content, message):
    reply = upload(owner_client, name, content)
    assert reply.status_code == 400
    assert message.lower() in reply.content.decode().lower()
    assert not Dataset.objects.exists()


def test_rejected_rows_are_listed_with_their_line_and_the_rest_is_kept(owner_client, media_root):
    good = b'{"instruction": "a", "response": "b"}\n'
    other = b'{"instruction": "e", "response": "f"}\n'
    reply = upload(owner_client, "mixed.jsonl", good + b'{"instruction": "c"}\n' + other + b'{"instruction": \n')
    dataset = Dataset.objects.get()
    assert (dataset.rows_ok, dataset.rows_rejected) == (2, 2)
    page = owner_client.get(reply.url).content.decode()
    assert "2 rejected" in page
    assert [(e["line"], e["column"]) for e in dataset.errors] == [(2, "response"), (4, None)]


def test_an_upload_over_the_size_limit_is_refused(owner_client, media_root, settings):
    settings.MAX_UPLOAD_BYTES = 1000
    reply = upload(owner_client, "big.jsonl", b'{"instruction": "a", "response": "b"}\n' * 100)
    assert reply.status_code == 400 and "larger than the limit" in reply.content.decode()
    assert not Dataset.objects.exists()


def test_another_user_cannot_see_the_dataset(owner_client, other_client, media_root):
    upload(owner_client, "d.jsonl", TWO_ROWS)
    dataset = Dataset.objects.get()
    assert other_client.get(f"/datasets/{dataset.id}/").status_code == 404
    assert other_client.post(f"/datasets/{dataset.id}/delete/").status_code == 404
    assert "d.jsonl" not in other_client.get("/datasets/").content.decode()


@pytest.mark.parametrize(
    ("task", "content", "message"),
    [
        ("sft", b'{"instruction": "a", "response": "same"}\n{"instruction": "b", "response": "same"}\n', "same response"),
        ("classify", b'{"text": "a", "label": "spam"}\n{"text": "b", "label": "spam"}\n', "one"),
        ("dpo", b'{"prompt": "p", "chosen": "x", "rejected": "x"}\n' * 3, "chosen"),
        ("rerank", b'{"query": "q", "document": "d", "relevance": 0}\n{"query": "q", "document": "e", "relevance": 0}\n',
         "relevant"),
    ],
)
def test_data_that_cannot_train_the_task_is_kept_rejected_with_its_reason(owner_client, media_root, task, content,
                                                                          message):
    reply = upload(owner_client, f"{task}.jsonl", content, task=task)
    dataset = Dataset.objects.get()
    assert reply.status_code == 302 and dataset.status == "rejected"
    assert message in owner_client.get(reply.url).content.decode()
    assert dataset.original.path and not dataset.rows_path.exists()


def test_a_file_without_a_required_column_is_kept_so_the_mapping_can_be_chosen(owner_client, media_root):
    reply = upload(owner_client, "missing.csv", b"instruction,text\na,b\n")
    dataset = Dataset.objects.get()
    assert reply.status_code == 302 and dataset.status == "rejected"
    page = owner_client.get(reply.url).content.decode()
    assert "Missing the required column for &#x27;response&#x27;" in page
    assert 'id="mapping-form"' in page and "<option value=\"text\">text</option>" in page


@pytest.mark.parametrize("task", ["sft", "classify", "pair", "rerank", "embed", "dpo"])
def test_every_task_has_sample_data_that_passes_its_checks(owner_client, media_root, task):
    reply = owner_client.post(f"/datasets/samples/{task}/")
    dataset = Dataset.objects.get()
    assert reply.status_code == 302 and reply.url == f"/jobs/new/?dataset={dataset.id}"
    assert dataset.task == task and dataset.rows_ok >= 100 and dataset.rows_rejected == 0


def test_an_upload_above_the_inline_size_is_sent_to_the_cpu_queue_not_read_in_the_request(
    owner_client, media_root, settings, django_capture_on_commit_callbacks
):
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    broker.delete("cpu", "train")
    settings.INLINE_PARSE_BYTES = 100
    try:
        with django_capture_on_commit_callbacks(execute=True):
            reply = upload(owner_client, "big.jsonl", TWO_ROWS * 10)
        dataset = Dataset.objects.get()
        assert reply.status_code == 302 and dataset.status == "uploaded" and dataset.rows_total == 0
        [message] = [json.loads(m)["headers"] for m in broker.lrange("cpu", 0, -1)]
        assert message["task"] == "webapp.datasets.parse_dataset" and message["argsrepr"] == f"[{dataset.id}]"
        assert broker.llen("train") == 0
        assert "Waiting for a CPU worker" in owner_client.get(reply.url).content.decode()
        assert owner_client.get(f"/datasets/{dataset.id}/status/").json()["busy"] is True
    finally:
        broker.delete("cpu", "train")
