"""The dataset page's quality report: the JSON endpoint, the pre-flight view, and a report
computed by a real "cpu" worker."""

import html
import json
import re
import time

import pytest
from django.template.loader import render_to_string

from tests.support.model_fixtures import write_jsonl
from webapp.datasets import tasks
from webapp.datasets.models import Dataset
from worker.preflight import preflight_examples

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)> & "quotes"'


def test_the_preflight_marks_exactly_the_tokens_the_worker_trains_on(tmp_path, smollm2_dir):
    from transformers import AutoTokenizer

    from worker.recipes.sft import IGNORE_INDEX, tokenize_example

    rows = [
        {"instruction": "Name a colour.", "response": "Blue, like the sky: 🌤 ok"},
        {"instruction": "Say hi", "response": "hi", "system": "Be short."},
        {"instruction": "word " * 20, "response": "answer " * 30},
    ]
    examples = preflight_examples(write_jsonl(tmp_path / "rows.jsonl", rows), "sft", smollm2_dir, 72)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert [e["row"] for e in examples] == [1, 2, 3]
    for example, row in zip(examples, rows, strict=True):
        (sequence,) = example["sequences"]
        loss = [flag for span in sequence["spans"] for flag in [span["loss"]] * span["tokens"]]
        labels = tokenize_example(row, tokenizer, 10**6)["labels"]
        assert loss == [label != IGNORE_INDEX for label in labels]
        kept = tokenize_example(row, tokenizer, 72)
        assert sequence["trained"] == sum(label != IGNORE_INDEX for label in kept["labels"])
        assert "".join(span["text"] for span in sequence["spans"]) == tokenizer.decode(
            tokenize_example(row, tokenizer, 10**6)["input_ids"]
        )
        cut = [i for i, span in enumerate(sequence["spans"]) if span["at_cutoff"]]
        assert len(cut) == (1 if sequence["cut"] else 0)
    assert examples[2]["sequences"][0]["cut"] == len(tokenize_example(rows[2], tokenizer, 10**6)["input_ids"]) - 72 > 0


def test_the_preflight_of_a_preference_pair_shows_both_answers(tmp_path, smollm2_dir):
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}]
    (example,) = preflight_examples(write_jsonl(tmp_path / "rows.jsonl", rows), "dpo", smollm2_dir, 512)
    chosen, rejected = example["sequences"]
    assert (chosen["name"], rejected["name"]) == ("chosen", "rejected")
    trained = "".join(span["text"] for span in chosen["spans"] if span["loss"])
    assert trained.startswith("4") and "2+2?" not in trained


def test_hostile_text_is_escaped_in_the_preflight_and_the_table(tmp_path, smollm2_dir):
    rows = [{"instruction": HOSTILE, "response": HOSTILE + "<|im_end|>"}] * 2
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    report = {
        "max_length": 64,
        "preflight": preflight_examples(path, "sft", smollm2_dir, 64),
        "problems": [
            {
                "key": "duplicates",
                "title": "Exact duplicate rows",
                "count": 1,
                "examples": [{"row": 2, "same_as": 1, "text": HOSTILE}],
            }
        ],
        "tokens": {},
        "split": {},
    }
    page = render_to_string("datasets/_preflight.html", {"report": report}) + render_to_string(
        "datasets/_quality_table.html", {"report": report}
    )
    assert "<script>" not in page and "<img" not in page
    assert "&lt;script&gt;" in page and "&lt;img src=x" in page
    assert html.unescape(re.sub(r"<[^>]+>", "", page)).count('alert("x")') >= 3


def test_the_table_names_unused_fields_placeholders_and_how_to_drop_an_overlap():
    report = {
        "rows": 5, "max_length": 64, "cutoff": 64, "tokens": {}, "unused_optional": ["system", "input"],
        "split": {"kind": "file", "validation_rows": 3},
        "problems": [
            {"key": "overlap", "title": "Validation rows whose input is also in training", "count": 2,
             "examples": [{"row": 1, "file": "validation", "text": "q3"}]},
            {"key": "placeholders", "title": "Rows with a templating placeholder left in", "count": 1,
             "examples": [{"row": 4, "placeholder": "{{ name }}", "text": "Dear {{ name }}"}]},
        ],
    }
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", render_to_string("datasets/_quality_table.html",
                                                                            {"report": report}))).split())
    assert "No row fills the optional fields system, input." in text
    assert "row 4 · {{ name }}" in text
    assert "a job can leave those inputs out of training" in text


@pytest.mark.django_db
def test_other_users_get_404_and_bad_choices_a_message(owner, owner_client, other_client, media_root):
    dataset = Dataset.objects.create(owner=owner, name="d", original_name="d.jsonl", format="jsonl", status="ready")
    url = f"/datasets/{dataset.id}/quality/"
    assert other_client.get(url).status_code == 404
    reply = owner_client.get(url + "?base_model=all-minilm-l6-v2")
    assert reply.status_code == 400 and "base models" in reply.json()["message"]
    reply = owner_client.get(url + "?max_length=lots")
    assert reply.status_code == 400 and "whole number" in reply.json()["message"]
    assert owner_client.get(url).json()["state"] == "waiting"  # no rows file yet


def test_a_cpu_worker_computes_the_report_and_the_page_serves_it(stack, tmp_path):
    stack.start_cpu_worker()
    stack.create_user("quality")
    http = stack.session("quality")
    rows = [{"instruction": f"Question {n}?", "response": f"Answer {n}."} for n in range(30)]
    rows.append(dict(rows[0]))
    dataset_id = stack.upload_dataset(http, write_jsonl(tmp_path / "quality.jsonl", rows))
    page = http.get(f"{stack.base_url}/datasets/{dataset_id}/").text
    assert 'id="quality"' in page and "dataset.js" in page
    url = f"{stack.base_url}/datasets/{dataset_id}/quality/?base_model=smollm2-135m-instruct&max_length=24"
    deadline = time.monotonic() + 240
    while (reply := http.get(url).json())["state"] in ("computing", "waiting"):
        assert time.monotonic() < deadline, stack.log_tail("cpu")
        time.sleep(1)
    assert reply["state"] == "done", json.dumps(reply)[:2000]
    assert reply["rows"] == 31 and reply["cutoff"] == 24
    duplicates = next(p for p in reply["problems"] if p["key"] == "duplicates")
    assert duplicates["count"] == 1 and duplicates["examples"][0]["same_as"] == 1
    assert "quality-problems" in reply["html"] and "tok loss" in reply["preflight_html"]
    assert http.get(url).json()["seconds"] == reply["seconds"]  # served from the kept JSON


@pytest.mark.django_db
def test_deleting_a_dataset_removes_its_kept_reports(owner, media_root):
    dataset = Dataset.objects.create(owner=owner, name="d", original_name="d.jsonl", format="jsonl")
    report = dataset.rows_path.parent / "quality" / "report.json"
    report.parent.mkdir(parents=True)
    report.write_text("{}")
    dataset.delete_files()
    assert not dataset.rows_path.parent.exists()


def ready_dataset(owner, name="d"):
    dataset = Dataset.objects.create(owner=owner, name=name, original_name="d.jsonl", format="jsonl", status="ready")
    dataset.rows_path.parent.mkdir(parents=True)
    write_jsonl(dataset.rows_path, [{"instruction": "Hi?", "response": "Hello."}])
    return dataset


@pytest.mark.django_db
def test_a_user_has_at_most_three_reports_computing_at_once(
    owner, owner_client, other_user, other_client, media_root, cpu_queue, settings
):
    assert settings.QUALITY_REPORTS_PER_USER == 3
    dataset = ready_dataset(owner)
    url = f"/datasets/{dataset.id}/quality/?max_length="
    assert [owner_client.get(url + str(n)).json() for n in (16, 32, 64)] == [{"state": "computing"}] * 3
    refused = owner_client.get(url + "128")
    assert refused.status_code == 200
    assert refused.json() == {"state": "waiting", "message": "You have 3 reports computing; wait for one to finish."}
    assert len(cpu_queue()) == 3
    other_url = f"/datasets/{ready_dataset(other_user, 'theirs').id}/quality/?max_length=16"
    assert other_client.get(other_url).json() == {"state": "computing"}  # someone else's count
    next((dataset.rows_path.parent / "quality").glob("*.pending")).unlink()  # as a finished report does
    assert owner_client.get(url + "128").json() == {"state": "computing"}
    assert len(cpu_queue()) == 5


@pytest.mark.django_db
def test_the_periodic_resend_sends_lost_requests_again_and_drops_outdated_ones(
    owner, owner_client, media_root, cpu_queue, settings
):
    dataset = ready_dataset(owner)
    assert owner_client.get(f"/datasets/{dataset.id}/quality/?max_length=16").json() == {"state": "computing"}
    (pending,) = (dataset.rows_path.parent / "quality").glob("*.pending")
    tasks.resend_quality_reports()
    assert len(cpu_queue()) == 1  # sent just now: left alone

    def age(**fields):
        marker = json.loads(pending.read_text())
        pending.write_text(json.dumps({**marker, **fields}))

    age(sent_at=time.time() - settings.JOB_RESEND_SECONDS - 1)  # the broker lost it
    tasks.resend_quality_reports()
    assert len(cpu_queue()) == 2
    age(sent_at=time.time() - settings.JOB_RESEND_SECONDS - 1, started_at=time.time())  # a worker has it
    tasks.resend_quality_reports()
    assert len(cpu_queue()) == 2
    write_jsonl(dataset.rows_path, [{"instruction": "Hi again?", "response": "Hello again."}])  # read again
    tasks.resend_quality_reports()
    assert not pending.exists() and len(cpu_queue()) == 2
