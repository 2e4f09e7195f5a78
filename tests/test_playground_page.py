"""The job page's "Try it" playground and the compare page, drawn by the views (no inference
server: the browser test asks the models)."""

import json
import re

import pytest

from webapp.datasets.models import Dataset
from webapp.jobs.models import Job

pytestmark = pytest.mark.django_db


def make_job(owner, task="sft", state="succeeded", base="all-minilm-l6-v2", result=None, predictions=None, name="j"):
    dataset = Dataset.objects.create(owner=owner, name="d", original_name="d.jsonl", format="jsonl")
    job = Job.objects.create(owner=owner, dataset=dataset, name=name,
                             spec={"task": task, "base_model": base, "method": "full"})
    Job.objects.filter(id=job.id).update(state=state, result=result or {})
    if predictions is not None:
        job.output_dir.mkdir(parents=True, exist_ok=True)
        (job.output_dir / "eval_predictions.json").write_text(json.dumps(predictions))
    return Job.objects.get(id=job.id)


def page(client, url) -> str:
    reply = client.get(url)
    assert reply.status_code == 200, reply.status_code
    return reply.content.decode()


def field_value(html: str, name: str) -> str:
    match = re.search(rf'<textarea[^>]*name="{name}"[^>]*>(.*?)</textarea>', html, re.S) or \
        re.search(rf'<input[^>]*name="{name}"[^>]*value="([^"]*)"', html)
    assert match, f"no field {name}"
    return match.group(1)


def labelled(html: str, field_id: str) -> bool:
    return f'<label for="{field_id}">' in html and f'id="{field_id}"' in html


# The job page ------------------------------------------------------------------------------------


def test_a_succeeded_instruction_job_offers_a_chat_with_its_base_and_its_fine_tune(owner, owner_client, media_root):
    job = make_job(owner, "sft", base="smollm2-135m-instruct",
                   result={"samples": [{"instruction": "Say the word for 7.", "reference": "WORD: seven."}]})
    html = page(owner_client, f"/jobs/{job.id}/")
    assert 'id="playground" data-form="chat"' in html
    assert f'data-url="/jobs/{job.id}/try/base/"' in html and f'data-url="/jobs/{job.id}/try/tuned/"' in html
    assert ">Base model</h3>" in html and ">Fine-tuned</h3>" in html
    for field_id in ("pg-system", "pg-prompt", "pg-temperature", "pg-top-p", "pg-max-tokens"):
        assert labelled(html, field_id), field_id
    assert field_value(html, "prompt") == "Say the word for 7."
    assert html.count('aria-live="polite"') == 2
    assert 'id="playground-send"' in html and 'id="playground-stop"' in html and "playground.js" in html
    assert 'name="csrfmiddlewaretoken"' in html


def test_a_preference_job_gets_the_chat_too(owner, owner_client, media_root):
    job = make_job(owner, "dpo", base="smollm2-135m-instruct")
    html = page(owner_client, f"/jobs/{job.id}/")
    assert 'data-form="chat"' in html and field_value(html, "prompt") == ""


@pytest.mark.parametrize("state", ["queued", "training", "exporting"])
def test_a_job_that_has_not_succeeded_says_the_playground_comes_later(owner, owner_client, state):
    job = make_job(owner, "sft", state=state)
    html = page(owner_client, f"/jobs/{job.id}/")
    assert 'id="playground"' not in html and "playground.js" not in html
    assert 'id="playground-pending"' in html and "Once the job succeeds" in html


@pytest.mark.parametrize("state", ["failed", "cancelled"])
def test_a_job_that_ended_otherwise_has_no_playground(owner, owner_client, state):
    html = page(owner_client, f"/jobs/{make_job(owner, 'classify', state=state).id}/")
    assert 'id="playground"' not in html and 'id="playground-pending"' not in html


def test_a_classifier_asks_for_a_text_and_draws_a_chart(owner, owner_client, media_root):
    predictions = [{"text": "apple pear plum", "label": "fruit", "predicted": "fruit", "probabilities": {}}]
    job = make_job(owner, "classify", predictions=predictions)
    html = page(owner_client, f"/jobs/{job.id}/")
    assert 'data-form="classify"' in html and labelled(html, "pg-text") and 'id="playground-chart"' in html
    assert field_value(html, "text") == "apple pear plum"
    assert 'name="text_pair"' not in html and 'name="prompt"' not in html


def test_a_pair_classifier_asks_for_two_texts(owner, owner_client, media_root):
    job = make_job(owner, "pair", predictions=[{"text_a": "apple", "text_b": "cat", "label": "unsupported"}])
    html = page(owner_client, f"/jobs/{job.id}/")
    assert 'data-form="pair"' in html and labelled(html, "pg-text") and labelled(html, "pg-text-pair")
    assert (field_value(html, "text"), field_value(html, "text_pair")) == ("apple", "cat")


def test_a_reranker_starts_from_a_held_out_query_and_its_documents(owner, owner_client, media_root):
    predictions = [
        {"query": "fruit?", "document": "an apple", "relevance": 1.0, "score": 0.9},
        {"query": "fruit?", "document": "a cat\nthat purrs", "relevance": 0.0, "score": 0.1},
        {"query": "animal?", "document": "a dog", "relevance": 1.0, "score": 0.8},
    ]
    job = make_job(owner, "rerank", predictions=predictions)
    html = page(owner_client, f"/jobs/{job.id}/")
    assert 'data-form="rerank"' in html and labelled(html, "pg-query") and labelled(html, "pg-documents")
    assert field_value(html, "query") == "fruit?"
    assert field_value(html, "documents") == "an apple\na cat that purrs"
    assert 'id="playground-chart"' not in html


def test_an_embedding_model_starts_from_a_query_and_a_corpus_holding_its_positives(owner, owner_client, media_root):
    corpus = [f"document {n}" for n in range(30)]
    predictions = {"corpus": corpus, "queries": [{"query": "q", "positives": ["document 25"], "top": []}]}
    job = make_job(owner, "embed", predictions=predictions)
    html = page(owner_client, f"/jobs/{job.id}/")
    assert 'data-form="embed"' in html and "Corpus" in html
    documents = field_value(html, "documents").split("\n")
    assert documents[0] == "document 25" and len(documents) == 20 and len(set(documents)) == 20


def test_without_held_out_predictions_the_boxes_start_empty_with_a_hint(owner, owner_client, media_root):
    job = make_job(owner, "rerank")
    html = page(owner_client, f"/jobs/{job.id}/")
    assert field_value(html, "documents") == "" and 'placeholder="One document a line' in html


def test_predictions_of_another_shape_do_not_break_the_page(owner, owner_client, media_root):
    job = make_job(owner, "embed", predictions=[{"unexpected": True}])
    assert field_value(page(owner_client, f"/jobs/{job.id}/"), "documents") == ""


def test_staff_reading_another_users_job_get_no_playground(owner, django_user_model, client, media_root):
    job = make_job(owner, "classify")
    staff = django_user_model.objects.create_user("sam", password="x-long-password-1", is_staff=True)
    client.force_login(staff)
    assert 'id="playground"' not in page(client, f"/jobs/{job.id}/")


# The compare page ---------------------------------------------------------------------------------


def test_the_jobs_list_links_to_the_compare_page_once_two_jobs_succeeded(owner, owner_client):
    make_job(owner, "classify")
    assert 'id="compare-link"' not in page(owner_client, "/")
    make_job(owner, "classify")
    assert 'id="compare-link"' in page(owner_client, "/")


def test_the_compare_page_offers_the_succeeded_jobs_by_task_and_base(owner, owner_client, other_user):
    first, second = make_job(owner, "classify", name="one"), make_job(owner, "classify", name="two")
    lonely = make_job(owner, "rerank", name="alone")
    make_job(owner, "classify", state="failed", name="broken")
    make_job(other_user, "classify", name="theirs")
    html = page(owner_client, "/jobs/compare/")
    assert "Classification on all-MiniLM-L6-v2" in html and "Reranker on all-MiniLM-L6-v2" in html
    assert f'name="jobs" value="{first.id}"' in html and f'name="jobs" value="{second.id}"' in html
    assert f'name="jobs" value="{lonely.id}"' not in html and "the only succeeded job" in html
    assert "broken" not in html and "theirs" not in html


def test_compared_jobs_each_answer_in_a_column_of_their_own(owner, owner_client, media_root):
    jobs = [make_job(owner, "classify", name=f"run {n}") for n in range(3)]
    html = page(owner_client, f"/jobs/compare/?jobs={jobs[2].id},{jobs[0].id},{jobs[1].id}")
    urls = re.findall(r'data-url="([^"]+)"', html)
    assert urls == [f"/jobs/{job.id}/try/tuned/" for job in (jobs[2], jobs[0], jobs[1])]
    assert 'data-form="classify"' in html and 'id="playground-chart"' in html and "plotly.min.js" in html
    assert f">Job {jobs[2].id}: run 2</h3>" in html


def test_checkboxes_name_the_jobs_one_parameter_each(owner, owner_client, media_root):
    jobs = [make_job(owner, "sft", base="smollm2-135m-instruct") for _ in range(2)]
    html = page(owner_client, f"/jobs/compare/?jobs={jobs[0].id}&jobs={jobs[1].id}")
    assert 'data-form="chat"' in html and len(re.findall(r"data-url=", html)) == 2


@pytest.mark.parametrize(
    ("choose", "message"),
    [
        (lambda owner: [make_job(owner, "classify") for _ in range(5)], "Choose two to 4 jobs"),
        (lambda owner: [make_job(owner, "classify")], "Choose two to 4 jobs"),
        (lambda owner: [make_job(owner, "classify"), make_job(owner, "rerank")], "same task on the same base"),
        (lambda owner: [make_job(owner, "classify"), make_job(owner, "classify", base="tiny")], "same base"),
        (lambda owner: [make_job(owner, "classify"), make_job(owner, "classify", state="training")],
         "Only succeeded jobs"),
    ],
    ids=["more-than-four", "only-one", "mixed-task", "mixed-base", "not-succeeded"],
)
def test_jobs_that_cannot_be_compared_are_refused_with_the_reason(owner, owner_client, choose, message):
    ids = ",".join(str(job.id) for job in choose(owner))
    reply = owner_client.get(f"/jobs/compare/?jobs={ids}")
    assert reply.status_code == 400
    refusal = re.search(r'<p class="flash error" id="refusal" role="alert">(.*?)</p>', reply.content.decode(), re.S)
    assert refusal and message in refusal.group(1)


def test_a_compare_link_that_names_no_job_number_is_refused(owner_client):
    reply = owner_client.get("/jobs/compare/?jobs=3,x")
    assert reply.status_code == 400 and "named by their numbers" in reply.content.decode()


def test_another_users_job_is_not_found(owner, owner_client, other_user):
    mine, theirs = make_job(owner, "classify"), make_job(other_user, "classify")
    assert owner_client.get(f"/jobs/compare/?jobs={mine.id},{theirs.id}").status_code == 404


def test_anonymous_visitors_are_sent_to_sign_in(owner, anon_client):
    jobs = [make_job(owner, "classify") for _ in range(2)]
    reply = anon_client.get(f"/jobs/compare/?jobs={jobs[0].id},{jobs[1].id}")
    assert reply.status_code == 302 and reply.url.startswith("/login/")
