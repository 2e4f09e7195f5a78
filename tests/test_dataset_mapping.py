"""The column mapping on the dataset page: shown as a form, changed by the user, read again."""

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from webapp.datasets.models import Dataset
from webapp.jobs.models import Job

pytestmark = pytest.mark.django_db

ODD_COLUMNS = b"prompt_text,reply,notes\nwhat is 2+2?,4,easy\nname a colour,red,\n"


def upload(client, name: str, content: bytes, task: str = "sft"):
    reply = client.post("/datasets/upload/", {"file": SimpleUploadedFile(name, content), "task": task})
    assert reply.status_code == 302, reply.content.decode()[:2000]
    return Dataset.objects.get()


def remap(client, dataset, **mapping):
    return client.post(f"/datasets/{dataset.id}/mapping/", mapping)


def test_the_page_shows_the_columns_and_the_proposed_mapping_as_a_form(owner_client, media_root):
    dataset = upload(owner_client, "qa.csv", b"question,answer,source\nwhat?,that,web\n")
    page = owner_client.get(f"/datasets/{dataset.id}/").content.decode()
    assert "<code>question</code>, <code>answer</code>, <code>source</code>" in page
    assert 'name="instruction"' in page and 'name="response"' in page and 'name="system"' in page
    assert '<option value="question" selected>question</option>' in page
    assert "(required)" in page and "(optional)" in page


def test_a_file_whose_columns_are_not_recognised_is_kept_and_read_again_with_the_chosen_columns(owner_client,
                                                                                                media_root):
    dataset = upload(owner_client, "odd.csv", ODD_COLUMNS)
    assert dataset.status == "rejected" and "instruction" in dataset.message
    reply = remap(owner_client, dataset, instruction="prompt_text", response="reply")
    assert reply.status_code == 302
    dataset.refresh_from_db()
    assert (dataset.status, dataset.rows_ok) == ("ready", 2)
    assert dataset.user_mapping == dataset.mapping == {"instruction": "prompt_text", "response": "reply"}
    assert dataset.rows_path.read_text().splitlines()[0] == '{"instruction": "what is 2+2?", "response": "4"}'


def test_an_optional_field_can_be_mapped_and_rows_without_it_still_count(owner_client, media_root):
    dataset = upload(owner_client, "odd.csv", ODD_COLUMNS)
    remap(owner_client, dataset, instruction="prompt_text", response="reply", input="notes")
    dataset.refresh_from_db()
    assert dataset.rows_ok == 2
    assert [row.get("input") for row in dataset.preview_rows] == ["easy", None]


def test_mapping_one_column_to_two_fields_is_a_form_error(owner_client, media_root):
    dataset = upload(owner_client, "odd.csv", ODD_COLUMNS)
    reply = remap(owner_client, dataset, instruction="prompt_text", response="prompt_text")
    assert reply.status_code == 400
    assert "Column &#x27;prompt_text&#x27; is already mapped to instruction" in reply.content.decode()
    dataset.refresh_from_db()
    assert dataset.user_mapping is None and dataset.status == "rejected"


def test_leaving_a_required_field_unmapped_is_a_form_error(owner_client, media_root):
    dataset = upload(owner_client, "odd.csv", ODD_COLUMNS)
    reply = remap(owner_client, dataset, instruction="prompt_text", response="")
    assert reply.status_code == 400
    assert "Choose the column that holds the response." in reply.content.decode()


def test_a_column_that_is_not_in_the_file_is_refused(owner_client, media_root):
    dataset = upload(owner_client, "odd.csv", ODD_COLUMNS)
    reply = remap(owner_client, dataset, instruction="prompt_text", response="nope")
    assert reply.status_code == 400 and "Select a valid choice" in reply.content.decode()


def test_detect_automatically_goes_back_to_the_proposed_mapping(owner_client, media_root):
    dataset = upload(owner_client, "qa.csv", b"question,answer,query\nwhat?,that,p\nwho?,them,q\n")
    remap(owner_client, dataset, instruction="query", response="answer")
    dataset.refresh_from_db()
    assert dataset.mapping["instruction"] == "query"
    owner_client.post(f"/datasets/{dataset.id}/mapping/", {"detect": "1"})
    dataset.refresh_from_db()
    assert dataset.user_mapping is None and dataset.mapping["instruction"] == "question"


def test_a_chat_file_shows_its_format_and_a_mapping_reads_it_as_plain_columns(owner_client, media_root):
    rows = b'{"instruction": "a", "input": "x", "output": "b", "answer": "c"}\n' * 2
    dataset = upload(owner_client, "alpaca.jsonl", rows)
    assert dataset.chat_format == "alpaca" and dataset.preview_rows[0] == {"instruction": "a\n\nx", "response": "b"}
    assert "chat format: alpaca" in owner_client.get(f"/datasets/{dataset.id}/").content.decode()
    remap(owner_client, dataset, instruction="instruction", response="answer")
    dataset.refresh_from_db()
    assert dataset.chat_format == "" and dataset.preview_rows[0] == {"instruction": "a", "response": "c"}


def test_a_classification_dataset_maps_its_own_fields(owner_client, media_root):
    dataset = upload(owner_client, "intents.csv", b"utterance,intent\nhi,greet\nbye,leave\nhello,greet\n", "classify")
    assert dataset.status == "rejected"
    remap(owner_client, dataset, text="utterance", label="intent")
    dataset.refresh_from_db()
    assert dataset.status == "ready" and dataset.rows_ok == 3


def test_a_dataset_a_job_used_cannot_be_remapped(owner_client, owner, media_root):
    dataset = upload(owner_client, "qa.csv", b"question,answer,query\nwhat?,that,p\nwho?,them,q\n")
    Job.objects.create(owner=owner, dataset=dataset, name="j", spec={"base_model": "x", "method": "lora"})
    reply = remap(owner_client, dataset, instruction="query", response="answer")
    dataset.refresh_from_db()
    assert dataset.mapping["instruction"] == "question"
    assert "can no longer change" in owner_client.get(reply.url).content.decode()
    assert 'id="mapping-form"' not in owner_client.get(f"/datasets/{dataset.id}/").content.decode()


LABELLED_REPLIES = b"".join(
    (f'{{"messages": [{{"role": "user", "content": "q{n}"}}, {{"role": "assistant", "content": "a{n}"}}], '
     f'"label": {"true" if n % 2 else "false"}}}\n').encode() for n in range(6))


def test_a_column_that_judges_each_row_is_never_dropped_silently(owner_client, media_root):
    # KTO-shaped data uploaded for instruction tuning: training on it as is would teach the
    # replies marked bad as targets, so the file waits for the user's choice.
    dataset = upload(owner_client, "kto.jsonl", LABELLED_REPLIES)
    assert dataset.status == "rejected" and "Column 'label' says something about each row" in dataset.message
    page = owner_client.get(f"/datasets/{dataset.id}/").content.decode()
    assert 'id="columns-form"' in page and "Train on the rows it marks desirable only" in page

    assert owner_client.post(f"/datasets/{dataset.id}/columns/", {}).status_code == 400
    owner_client.post(f"/datasets/{dataset.id}/columns/", {"label": "desirable"})
    dataset.refresh_from_db()
    assert (dataset.rows_ok, dataset.rows_total) == (3, 6)
    assert [row["response"] for row in dataset.preview_rows] == ["a1", "a3", "a5"]
    assert dataset.error_counts == {"label: marked undesirable": 3}

    owner_client.post(f"/datasets/{dataset.id}/columns/", {"label": "ignore"})
    dataset.refresh_from_db()
    assert (dataset.status, dataset.rows_ok, dataset.column_choices) == ("ready", 6, {"label": "ignore"})


def test_another_users_dataset_columns_are_not_found(owner_client, other_client, media_root):
    dataset = upload(owner_client, "kto.jsonl", LABELLED_REPLIES)
    assert other_client.post(f"/datasets/{dataset.id}/columns/", {"label": "ignore"}).status_code == 404


def test_the_page_says_when_the_columns_look_made_for_another_task(owner_client, media_root):
    dataset = upload(owner_client, "pairs.csv", b"prompt,chosen,rejected\nhi,hello,go away\nbye,goodbye,whatever\n")
    page = owner_client.get(f"/datasets/{dataset.id}/").content.decode()
    assert 'id="suggested-task"' in page and "Preference tuning (DPO)" in page
    dataset = Dataset.objects.create(owner=dataset.owner, name="d", task="dpo", columns=["prompt", "chosen", "rejected"])
    assert dataset.suggested_family is None


def test_the_validation_file_is_read_with_the_same_column_choice(owner_client, media_root):
    reply = owner_client.post("/datasets/upload/", {
        "file": SimpleUploadedFile("kto.jsonl", LABELLED_REPLIES), "task": "sft",
        "validation_file": SimpleUploadedFile("held.jsonl", LABELLED_REPLIES)})
    assert reply.status_code == 302
    dataset = Dataset.objects.get()
    owner_client.post(f"/datasets/{dataset.id}/columns/", {"label": "desirable"})
    dataset.refresh_from_db()
    assert dataset.rows_ok == 3 and dataset.validation_report["rows_ok"] == 3


PICTURE_CHATS = b"\n".join(json.dumps(row).encode() for row in [
    {"messages": [{"role": "user", "content": "<image>Who is this?"}, {"role": "assistant", "content": "A cat."}],
     "images": ["cat.jpg"]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Read this."},
                                               {"type": "image_url", "image_url": {"url": "a.png"}}]},
                  {"role": "assistant", "content": "It says hello."}]},
    {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "..."}}]},
                  {"role": "assistant", "content": "Music."}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
]) + b"\n"


def test_images_are_refused_until_the_user_chooses_to_drop_them_and_the_count_is_shown(owner_client, media_root):
    dataset = upload(owner_client, "pictures.jsonl", PICTURE_CHATS)
    assert (dataset.rows_ok, dataset.rows_total) == (1, 4)
    assert dataset.error_counts == {"images: images or audio": 1, "messages: images or audio": 2}
    assert "choose on this dataset's page to drop them" in dataset.errors[0]["problem"]
    page = owner_client.get(f"/datasets/{dataset.id}/").content.decode()
    assert 'id="media-form"' in page and "3 rows hold images, audio or video" in page

    owner_client.post(f"/datasets/{dataset.id}/media/", {"media": "drop"})
    dataset.refresh_from_db()
    # The audio-only turn leaves its row out; the others train on their text, placeholder removed.
    assert (dataset.rows_ok, dataset.rows_total, dataset.media_dropped) == (3, 4, {"items": 2, "rows": 2})
    assert dataset.error_counts == {"messages: only images or audio": 1}
    assert [row["instruction"] for row in dataset.preview_rows] == ["Who is this?", "Read this.", "Hi"]
    page = owner_client.get(f"/datasets/{dataset.id}/").content.decode()
    assert 'id="media-dropped"' in page and "2 items left out of 2 rows" in page and 'id="media-form"' not in page

    owner_client.post(f"/datasets/{dataset.id}/media/", {"media": "refuse"})
    dataset.refresh_from_db()
    assert (dataset.rows_ok, dataset.drop_media, dataset.media_dropped) == (1, False, {})


def test_another_users_dataset_media_choice_is_not_found(owner_client, other_client, media_root):
    dataset = upload(owner_client, "pictures.jsonl", PICTURE_CHATS)
    assert other_client.post(f"/datasets/{dataset.id}/media/", {"media": "drop"}).status_code == 404
    dataset.refresh_from_db()
    assert not dataset.drop_media
