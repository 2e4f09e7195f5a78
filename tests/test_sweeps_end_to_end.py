"""Sweeps through the real stack: the new-job form queues three runs that the Celery worker trains,
the group page marks the best, the compare page overlays their curves in a real browser, and
cancelling a sweep ends the runs still queued or running."""

from __future__ import annotations

import re

import pytest

from tests.support.model_fixtures import number_word, write_jsonl
from tests.support.stack import LLAMA_LINEAR, PASSWORD, metric_steps
from tests.test_browser import browser  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.slow, pytest.mark.long]

USER = "sweeper"
FINAL = ("succeeded", "failed", "cancelled")


def start_sweep(stack, http, dataset_id: int, base_dir, **fields) -> int:
    url = f"{stack.base_url}/jobs/new/"
    form = {
        "csrfmiddlewaretoken": stack.csrf(http, "/jobs/new/"), "dataset": dataset_id, "base_model": "custom",
        "custom_base_model": str(base_dir), "method": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "lora_target_modules": LLAMA_LINEAR, "learning_rate": 2e-3, "epochs": 1, "batch_size": 4,
        "max_seq_length": 64, "validation_fraction": 0.2, **fields,
    }
    reply = http.post(url, data=form, headers={"Referer": url})
    match = re.search(r"/jobs/groups/(\d+)/$", reply.url)
    assert match, f"the sweep was not started ({reply.status_code}): {reply.text[:3000]}"
    return int(match.group(1))


def group_status(stack, http, group_id: int) -> dict:
    return http.get(f"{stack.base_url}/jobs/groups/{group_id}/status/").json()


@pytest.fixture(scope="module")
def swept(stack, tiny_llama_dir, tmp_path_factory):
    stack.create_user(USER)
    http = stack.session(USER)
    data = write_jsonl(tmp_path_factory.mktemp("sweep") / "words.jsonl", [
        {"instruction": f"Say the word for {n}.", "response": f"WORD: {number_word(n)}."} for n in range(40)])
    dataset = stack.upload_dataset(http, data)
    group = start_sweep(stack, http, dataset, tiny_llama_dir, max_steps=6, sweep_learning_rate="2e-2, 5e-3, 1e-4")
    jobs = [job["id"] for job in group_status(stack, http, group)["jobs"]]
    for job_id in jobs:
        job = stack.wait_for(job_id, lambda j: j["state"] in FINAL, timeout=400)
        assert job["state"] == "succeeded", (job["message"], stack.log_tail("worker"))
    return {"http": http, "dataset": dataset, "group": group, "jobs": jobs}


def test_three_runs_train_and_the_group_marks_the_best(stack, swept):
    status = group_status(stack, swept["http"], swept["group"])
    assert [job["state"] for job in status["jobs"]] == ["succeeded"] * 3 and not status["active"]
    losses = {job["id"]: job["after"] for job in status["jobs"]}
    assert status["best"] == min(losses, key=losses.get)  # eval_loss: lower is better
    assert status["best"] == swept["jobs"][0]  # the highest learning rate learns most in 6 steps
    page = swept["http"].get(f"{stack.base_url}/jobs/groups/{swept['group']}/").text
    assert f'<tr id="run-{status["best"]}" class="best">' in page and 'id="cancel-group"' not in page


def test_the_compare_page_overlays_three_jobs_curves_in_a_browser(stack, swept, browser):  # noqa: F811
    page = browser.new_page()
    page.set_default_timeout(60_000)
    page.goto(f"{stack.base_url}/login/")
    page.fill("input[name=username]", USER)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{stack.base_url}/")
    page.goto(f"{stack.base_url}/jobs/compare/?jobs={','.join(map(str, swept['jobs']))}")
    page.wait_for_selector("#loss-curves .scatterlayer .trace")
    assert page.eval_on_selector_all("#loss-curves .scatterlayer .trace", "t => t.length") == 3
    assert page.eval_on_selector_all("#metric-curves .scatterlayer .trace", "t => t.length") == 3
    legend = page.eval_on_selector_all("#loss-curves .legendtext", "t => t.map(x => x.textContent)")
    assert [name.split(":")[0] for name in legend] == [f"Job {job}" for job in swept["jobs"]]
    rows = page.eval_on_selector_all("#differing-settings tbody tr td:first-child", "t => t.map(x => x.textContent)")
    assert rows == ["learning_rate"]
    assert page.text_content("#final-metrics .best .badge") == "best"
    page.close()


def test_cancelling_a_sweep_ends_the_runs_still_queued_or_running(stack, swept, tiny_llama_dir):
    http = swept["http"]
    group = start_sweep(stack, http, swept["dataset"], tiny_llama_dir, max_steps=400, sweep_lora_r="4, 8")
    jobs = [job["id"] for job in group_status(stack, http, group)["jobs"]]
    stack.wait_for(jobs[0], lambda j: metric_steps(j), timeout=300, what="the first run trains")
    stack.post(http, f"/jobs/groups/{group}/cancel/")
    for job_id in jobs:
        assert stack.wait_for(job_id, lambda j: j["state"] in FINAL, timeout=120)["state"] == "cancelled"
    assert not group_status(stack, http, group)["active"]
