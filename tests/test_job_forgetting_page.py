"""The job page's forgetting meter: the trade-off chart's data (each evaluation's primary metric and
forgetting, in the page's event history) and the general answers table from the job's result."""

import asyncio
import json
import re

import pytest

from webapp.datasets.models import Dataset
from webapp.jobs.models import Job
from worker.events import make_event

pytestmark = pytest.mark.django_db

ANSWERS = [{"prompt": "What is the capital of France?", "before": "Paris.", "after": "WORD: Paris."},
           {"prompt": "What is 12 + 7?", "before": "19", "after": "WORD: <nineteen>"}]


def make_job(owner, result: dict) -> Job:
    dataset = Dataset.objects.create(owner=owner, name="d", original_name="d.jsonl", format="jsonl")
    job = Job.objects.create(owner=owner, dataset=dataset, name="j",
                             spec={"task": "sft", "base_model": "smollm2-135m-instruct", "method": "full"})
    Job.objects.filter(id=job.id).update(state="succeeded", result=result)
    job.append_events([
        make_event("eval", 0, baseline=True, eval_loss=2.5, forgetting=0.0, general_perplexity=17.4),
        make_event("eval", 10, eval_loss=1.2, forgetting=0.03, general_perplexity=18.1),
        make_event("eval", 20, final=True, eval_loss=0.9, forgetting=0.08, general_perplexity=19.6,
                   general_answers=result.get("general_answers", [])),
    ])
    return Job.objects.get(id=job.id)


def test_the_page_holds_each_evaluations_metric_and_forgetting_for_the_trade_off_chart(owner, owner_client):
    job = make_job(owner, {"general_answers": ANSWERS})
    html = owner_client.get(f"/jobs/{job.id}/").content.decode()
    assert 'id="tradeoff-chart"' in html and 'data-primary-metric="eval_loss"' in html
    history = json.loads(re.search(r'<script id="job-history" type="application/json">(.*?)</script>', html, re.S)[1])
    points = [(e["step"], e["eval_loss"], e["forgetting"]) for e in history if e["kind"] == "eval"]
    assert points == [(0, 2.5, 0.0), (10, 1.2, 0.03), (20, 0.9, 0.08)]


def test_the_general_answers_table_shows_each_prompt_before_and_after(owner, owner_client):
    job = make_job(owner, {"general_answers": ANSWERS})
    html = owner_client.get(f"/jobs/{job.id}/").content.decode()
    table = html[html.index('id="general-answers"'):]
    assert "General answers, before and after" in html and 'class="panel" id="general-answers"' in html
    for answer in ANSWERS:
        assert answer["prompt"] in table and answer["before"] in table
    assert "WORD: &lt;nineteen&gt;" in table  # escaped


def test_a_job_without_general_answers_keeps_the_table_hidden(owner, owner_client):
    job = make_job(owner, {})
    html = owner_client.get(f"/jobs/{job.id}/").content.decode()
    assert 'class="panel hidden" id="general-answers"' in html


async def read_all(chunks) -> bytes:
    return b"".join([chunk async for chunk in chunks])


def test_the_kept_checkpoints_are_listed_with_the_best_trade_off_marked_and_download(owner, owner_client, media_root):
    job = make_job(owner, {})
    kept = job.output_dir / "specialist-job-1-model-step-10.zip"
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    final = job.output_dir / "specialist-job-1-model.zip"
    final.write_bytes(b"PK\x05\x06" + b"\0" * 18 + b"final")
    checkpoints = [
        {"step": 10, "final": False, "balanced": True, "zip": str(kept), "metrics": {"eval_loss": 1.2, "forgetting": 0.03}},
        {"step": 20, "final": True, "balanced": False, "zip": None, "metrics": {"eval_loss": 0.9, "forgetting": 0.08}},
    ]
    Job.objects.filter(id=job.id).update(result={"checkpoints": checkpoints, "artifact_zip": str(final)})
    html = owner_client.get(f"/jobs/{job.id}/").content.decode()
    table = html[html.index('id="checkpoints"'):html.index("</table>", html.index('id="checkpoints"'))]
    rows = table.split("<tr")[2:]
    assert "Step 10" in rows[0] and "best trade-off" in rows[0] and 'class="best"' in rows[0]
    assert "1.2000" in rows[0] and "0.0300" in rows[0]
    assert f'/jobs/{job.id}/checkpoints/10/download/' in rows[0]
    assert "Step 20 (the final model)" in rows[1] and "best trade-off" not in rows[1]
    assert f'href="/jobs/{job.id}/download/"' in rows[1]
    reply = owner_client.get(f"/jobs/{job.id}/checkpoints/10/download/")
    assert asyncio.run(read_all(reply.streaming_content)) == kept.read_bytes()
    assert reply["Content-Disposition"] == 'attachment; filename="specialist-job-1-model-step-10.zip"'
    assert owner_client.get(f"/jobs/{job.id}/checkpoints/20/download/").status_code == 404  # the final is /download/


def test_a_running_job_lists_no_checkpoints(owner, owner_client):
    job = make_job(owner, {})
    Job.objects.filter(id=job.id).update(state="running", result={})
    assert 'id="checkpoints"' not in owner_client.get(f"/jobs/{job.id}/").content.decode()
