"""The playground in a real browser against the live stack and its inference server: a chat that
streams the base's and the fine-tune's replies side by side, and a classifier's bar chart."""

from __future__ import annotations

import json

import pytest

from tests.support.model_fixtures import write_jsonl
from tests.support.stack import PASSWORD
from tests.test_browser import ARTIFACTS, browser  # noqa: F401 (browser: the fixture)
from tests.test_classify_recipe import group_rows

pytestmark = [pytest.mark.slow, pytest.mark.serving]

FINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def trained(stack, tiny_llama_dir, tiny_bert_dir, sft_jsonl, tmp_path_factory):
    """paula's finished jobs (a tiny instruction-tuned llama, two tiny classifiers of one dataset
    and base) and the stack's inference server, started while they train."""
    stack.create_user("paula")
    http = stack.session("paula")
    rows = write_jsonl(tmp_path_factory.mktemp("playground") / "groups.jsonl", group_rows())
    sft = stack.submit_job(http, stack.upload_dataset(http, sft_jsonl), tiny_llama_dir, max_steps=12)
    groups = stack.upload_dataset(http, rows, task="classify")
    classifier = {"method": "full", "max_steps": 30, "batch_size": 16, "max_seq_length": 32}
    classify = stack.submit_job(http, groups, tiny_bert_dir, learning_rate=2e-2, **classifier)
    slower = stack.submit_job(http, groups, tiny_bert_dir, learning_rate=1e-3, name="slower", **classifier)
    stack.start_inference()
    for job_id in (sft, classify, slower):
        job = stack.wait_for(job_id, lambda j: j["state"] in FINAL, timeout=400)
        assert job["state"] == "succeeded", (job["message"], stack.log_tail("worker"))
    return {"sft": sft, "classify": classify, "slower": slower}


@pytest.fixture(scope="module")
def page(stack, browser, trained):  # noqa: F811 (browser: the fixture imported above)
    page = browser.new_page()
    page.set_default_timeout(60_000)
    page.goto(f"{stack.base_url}/login/")
    page.fill("input[name=username]", "paula")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{stack.base_url}/")
    yield page
    page.close()


def column_texts(page) -> list[str]:
    return page.eval_on_selector_all(".playground-column .answer", "cells => cells.map(c => c.textContent)")


def test_a_prompt_streams_the_base_and_the_fine_tuned_replies_side_by_side(stack, page, trained):
    page.goto(f"{stack.base_url}/jobs/{trained['sft']}/")
    assert page.text_content("#playground h2") == "Try it"
    # Each column's answer grows piece by piece: count the pieces as they land.
    page.evaluate("""() => {
        window.pieces = [0, 0];
        document.querySelectorAll('.playground-column .answer').forEach((answer, i) =>
            new MutationObserver((changes) => { window.pieces[i] += changes.length; })
                .observe(answer, {characterData: true, childList: true, subtree: true}));
    }""")
    page.get_by_label("Prompt", exact=True).fill("Say the word for 7.")
    page.get_by_label("Max tokens").fill("24")
    page.get_by_role("button", name="Send").click()
    page.wait_for_function("() => window.specialistPlayground.finished >= 1", timeout=120_000)
    base, tuned = column_texts(page)
    assert page.locator(".playground-column .error").count() == 0, (base, tuned, stack.log_tail("inference"))
    assert base.strip() and tuned.strip() and "Waiting" not in base + tuned
    assert min(page.evaluate("() => window.pieces")) > 3  # streamed, not one block at the end
    assert page.text_content("#playground-status") == "Done."
    assert page.is_enabled("#playground-send") and page.is_disabled("#playground-stop")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-chat.png"), full_page=True)


def test_an_unavailable_model_shows_its_error_in_its_own_column(stack, page, trained):
    page.goto(f"{stack.base_url}/jobs/{trained['sft']}/")
    message = "No inference server is running. It starts with `make run`; try again once it is up."
    body = json.dumps({"error": {"message": message, "type": "server_error", "param": None}})
    page.route("**/try/tuned/", lambda route: route.fulfill(status=503, content_type="application/json", body=body))
    try:
        page.get_by_label("Prompt", exact=True).fill("Say the word for 3.")
        page.get_by_label("Prompt", exact=True).press("Control+Enter")  # the keyboard sends too
        page.wait_for_function("() => window.specialistPlayground.finished >= 1", timeout=120_000)
    finally:
        page.unroute("**/try/tuned/")
    base, tuned = column_texts(page)
    assert tuned == message and page.locator(".playground-column .error").count() == 1
    assert base.strip() and "Waiting" not in base


def test_a_classifier_draws_the_label_probabilities_of_base_and_fine_tune(stack, page, trained):
    page.goto(f"{stack.base_url}/jobs/{trained['classify']}/")
    text = page.input_value("#pg-text")
    assert len(text.split()) == 3  # a held-out row of the job, to start from
    page.get_by_role("button", name="Send").click()
    page.wait_for_function("() => window.specialistPlayground.finished >= 1", timeout=120_000)
    assert page.locator(".playground-column .error").count() == 0, column_texts(page)
    traces = page.evaluate(
        "() => document.getElementById('playground-chart').data.map(t => ({type: t.type, name: t.name, x: t.x, y: t.y}))"
    )
    labels = sorted(stack.job(trained["classify"])["result"]["confusion_after"]["labels"])
    assert [t["name"] for t in traces] == ["Base model", "Fine-tuned"]
    for trace in traces:
        assert trace["type"] == "bar" and sorted(trace["x"]) == labels
        assert sum(trace["y"]) == pytest.approx(1, abs=1e-3)
    assert page.locator("#playground-chart svg").count() > 0
    # The fine-tune has learnt the groups: it is sure of the held-out row's label.
    tuned = dict(zip(traces[1]["x"], traces[1]["y"], strict=True))
    assert max(tuned.values()) > 0.5
    assert "(predicted)" in column_texts(page)[1]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-classifier.png"), full_page=True)


def test_two_classifiers_compared_answer_the_same_text_side_by_side(stack, page, trained):
    page.goto(f"{stack.base_url}/")
    page.click("#compare-link")
    page.wait_for_url("**/jobs/compare/")
    group = page.locator("fieldset", has_text="Classification on")
    assert group.locator("input[name=jobs]:checked").count() == 2
    group.get_by_role("button", name="Compare").click()
    page.wait_for_url("**/jobs/compare/?jobs=*")
    page.fill("#pg-text", "apple cherry lemon")
    page.get_by_role("button", name="Send").click()
    page.wait_for_function("() => window.specialistPlayground.finished >= 1", timeout=120_000)
    assert page.locator(".playground-column .error").count() == 0, column_texts(page)
    names = page.evaluate("() => document.getElementById('playground-chart').data.map(t => t.name)")
    assert sorted(names) == sorted([f"Job {trained['classify']}: groups · full", f"Job {trained['slower']}: slower"])
    assert all("(predicted)" in text for text in column_texts(page))


def encoder_job(stack, task: str) -> int:
    """A succeeded job of `task` made straight in the stack's database (no model: its answers are
    played by the test)."""
    code = (
        "from django.contrib.auth import get_user_model\n"
        "from webapp.datasets.models import Dataset\n"
        "from webapp.jobs.models import Job\n"
        "owner = get_user_model().objects.get(username='paula')\n"
        "dataset = Dataset.objects.create(owner=owner, name='d', original_name='d.jsonl', format='jsonl')\n"
        f"job = Job.objects.create(owner=owner, dataset=dataset, name={task!r}, state='succeeded',\n"
        f"                         spec={{'task': {task!r}, 'base_model': 'all-minilm-l6-v2', 'method': 'full'}})\n"
        "print(job.id)\n"
    )
    return int(stack.manage("shell", "-c", code).split()[-1])


def answer_with(page, answers: dict[str, dict]) -> None:
    """Each column's endpoint (…/try/base/, …/try/tuned/) answers with its canned JSON."""
    def fulfil(body: dict):
        return lambda route: route.fulfill(status=200, content_type="application/json", body=json.dumps(body))

    for which, body in answers.items():
        page.route(f"**/try/{which}/", fulfil(body))


def rankings(page) -> list[list[tuple[str, str]]]:
    return page.eval_on_selector_all(".playground-column .answer", """cells => cells.map(c =>
        Array.from(c.querySelectorAll('li')).map(li => [li.querySelector('.score').textContent,
                                                        li.lastChild.textContent]))""")


def test_rankings_of_a_reranker_and_nearest_neighbours_of_an_embedding_model(stack, page, trained):
    page.goto(f"{stack.base_url}/jobs/{encoder_job(stack, 'rerank')}/")
    answer_with(page, {
        "base": {"results": [{"index": 0, "relevance_score": 0.5, "document": {"text": "a cat"}},
                             {"index": 1, "relevance_score": 0.4, "document": {"text": "an apple"}}]},
        "tuned": {"results": [{"index": 1, "relevance_score": 0.93, "document": {"text": "an apple"}},
                              {"index": 0, "relevance_score": 0.02, "document": {"text": "a cat"}}]},
    })
    sent = []
    page.on("request", lambda request: sent.append(request.post_data_json) if "/try/" in request.url else None)
    page.fill("#pg-query", "a fruit")
    page.fill("#pg-documents", "a cat\n\nan apple\n")
    page.get_by_role("button", name="Send").click()
    page.wait_for_function("() => window.specialistPlayground.finished >= 1")
    assert sent == [{"query": "a fruit", "documents": ["a cat", "an apple"]}] * 2
    assert rankings(page) == [[["0.500", "a cat"], ["0.400", "an apple"]],
                              [["0.930", "an apple"], ["0.020", "a cat"]]]
    page.unroute("**/try/base/")
    page.unroute("**/try/tuned/")

    page.goto(f"{stack.base_url}/jobs/{encoder_job(stack, 'embed')}/")
    # The query is index 0; the page ranks the documents by their cosine similarity to it.
    vectors = {"base": [[1, 0], [0, 1], [1, 1]], "tuned": [[1, 0], [1, 0.1], [0, 1]]}
    answer_with(page, {which: {"data": [{"index": i, "embedding": v} for i, v in enumerate(vs)]}
                       for which, vs in vectors.items()})
    page.fill("#pg-query", "a fruit")
    page.fill("#pg-documents", "a cat\nan apple")
    page.get_by_role("button", name="Send").click()
    page.wait_for_function("() => window.specialistPlayground.finished >= 1")
    assert rankings(page) == [[["0.707", "an apple"], ["0.000", "a cat"]],
                              [["0.995", "a cat"], ["0.000", "an apple"]]]
